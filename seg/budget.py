"""The paper's epoch, and the step budget and synthetic share that follow from it.

The paper's trainer (rloss ``pascal.py``) concatenates the real set and the synthetic
images it uses, shuffles them, and calls one pass over the whole an epoch: ``len`` is
``(1 + K) · len(real)`` with K synthetic images a source (one per λ set with 'append' over
K sets; one with a curriculum, whose sets take turns). An augmented 60-epoch run
therefore takes (1 + K) times the steps of a real-only one, with the poly decay over that
span, and a synthetic share of K / (K + 1). ``train.budget: paper_epochs`` and
``scheme.synth_share: paper_epoch`` reproduce that; ``steps`` and ``fraction`` (the
defaults) keep a fixed step budget and per-batch share, so schemes compare at equal compute.

The paper's other options define their epoch and share themselves: ``append`` K synthetic
samples a real one (``--aug-ratio`` K: share K / (K + 1) whatever ``synth_share``),
``best_k`` the selected samples, ``replacement`` the real set alone (its share is
``replace_p``), ``synth_only`` an epoch of every synthetic sample and one of the real ones
(its share is the synthetic phase's part of the run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from seg.schemes import SchemeConfig, check_available, lam_key


@dataclass(frozen=True)
class Budget:
    """What a run takes: its steps, the steps of one paper epoch, the synthetic share of a batch."""

    steps: int
    steps_per_epoch: int
    synth_fraction: float


def epoch_samples(scheme: SchemeConfig, real: int, synthetic: dict[float, int]) -> tuple[int, int]:
    """(real, synthetic) samples one paper epoch covers, for this scheme.

    ``synthetic`` maps λ to the number of synthetic samples at it. ``fixed`` uses its one
    set; ``uniform`` uses every set at once (as ``append`` with K = the number of sets when each holds one sample a source);
    ``adaptive`` uses one set at a time (the paper's curriculum), counted as their mean size;
    ``append`` K = ``aug_ratio`` a real sample; ``best_k`` and ``synth_only`` every (selected)
    synthetic sample; ``replacement`` none on top of the real ones (it swaps them).
    """
    lams = check_available(scheme, list(synthetic))
    sizes = {lam_key(k): v for k, v in synthetic.items()}
    if not scheme.uses_synthetic:
        return real, 0
    if scheme.name == "fixed":
        return real, sizes[lam_key(scheme.fixed_lambda)]  # type: ignore[arg-type]
    if scheme.name == "append":
        return real, scheme.aug_ratio * real
    if scheme.name == "replacement":
        return real, 0
    if scheme.name in ("uniform", "best_k", "synth_only"):
        return real, sum(sizes[x] for x in lams)
    return real, round(sum(sizes[x] for x in lams) / len(lams))


def plan_budget(scheme: SchemeConfig, budget: str, steps: int, epochs: int, samples_per_step: int,
                real: int, synthetic: dict[float, int]) -> Budget:
    """The run's budget: ``steps`` as given (``budget: steps``) or ``epochs`` paper epochs of
    ``ceil(epoch samples / samples_per_step)`` steps each (the paper's DataLoader keeps the
    last, smaller batch, and its poly schedule spans ``epochs x iterations per epoch``)."""
    n_real, n_synth = epoch_samples(scheme, real, synthetic)
    per_epoch = max(1, math.ceil((n_real + n_synth) / samples_per_step))
    return Budget(epochs * per_epoch if budget == "paper_epochs" else steps, per_epoch, synthetic_share(scheme, n_real, n_synth))


def synthetic_share(scheme: SchemeConfig, n_real: int, n_synth: int) -> float:
    """The synthetic share a batch is drawn with: the epoch's for ``append`` and ``best_k``
    (and any scheme under ``synth_share: paper_epoch``), ``replace_p`` for ``replacement``,
    else ``synth_fraction``."""
    if scheme.name == "replacement":
        return scheme.replace_p
    if n_synth and (scheme.name in ("append", "best_k") or scheme.synth_share == "paper_epoch"):
        return n_synth / (n_real + n_synth)
    return scheme.synth_fraction
