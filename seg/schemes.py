"""λ-aware sampling schemes: which encode ratios a synthetic sample may have, when.

The paper's schemes differ only in the set of λ values a synthetic sample is drawn
from at a given point of training. Keeping that choice a pure function of
``(config, available λ values, progress in [0, 1])`` makes the curriculum testable
without any data, and lets the streaming side stay ignorant of schemes.

- ``real``: no synthetic data; every sample is real (λ = 0).
- ``fixed``: every synthetic sample has one λ (``fixed_lambda``).
- ``uniform``: λ uniform over the generated set, per synthetic sample.
- ``adaptive``: a curriculum; ``linear`` lets the largest allowed λ grow linearly from
  ``lam_min`` to the largest available λ over ``ramp_fraction`` of training (all λ up to
  it allowed, uniformly); ``step`` (the paper's code) orders the synthetic sets by λ and
  switches from one set to the next at the given epochs (``curriculum`` takes the paper's
  ``--curriculum 0,20,40`` list as it is). The paper's released trainer never advances its
  curriculum (it sets the epoch on the DataLoader, not on the dataset, so the first set is
  used throughout); this module implements the schedule the paper describes.

The paper's other options (its ``--aug-scheme``, rloss ``pascal.py``) draw a synthetic
sample from the pool of every given set at once, each set weighted by its size (so every
synthetic sample is as likely as any other, as in the paper's concatenated dataset); they
differ in how many of a batch are synthetic, and when:

- ``append``: ``aug_ratio`` K synthetic samples a real one per epoch (``--aug-ratio``, with
  ``--aug-use-all``): a share of K / (K + 1), every batch.
- ``best_k``: the same over only the ``best_k`` samples a source that the dictionary
  ``best_dict`` ranks best (``--aug-scheme best --aug-best-dict``; :mod:`seg.best`).
- ``replacement``: every sample is replaced by a synthetic one with probability
  ``replace_p`` (``--aug-scheme replacement``), one coin per sample; with ``replace_from:
  source`` (the paper's) by one fixed synthetic sample of its own source, else by one from the pool.
- ``synth_only``: the first ``synth_fraction`` of the steps are all synthetic, the rest all
  real (``--aug-scheme synth-only``, then a real run resumed from its checkpoint); the
  learning-rate schedule restarts at the switch, as the paper's ``--lr-start`` makes it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from engine.errors import BadInputError

LAMBDA_SCHEMES = ("real", "fixed", "uniform", "adaptive")  # the λ-aware comparison (the sweep's default study)
REPLACE_FROM = ("pool", "source")  # replacement: any synthetic sample, or the replaced sample's own source's
POOL_SCHEMES = ("synth_only", "replacement", "best_k", "append")  # the paper's other options: λ by set size
SCHEMES = LAMBDA_SCHEMES + POOL_SCHEMES
SCHEDULES = ("linear", "step")
SHARES = ("fraction", "paper_epoch")
LAM_DECIMALS = 4  # λ values are grouped after rounding, so 0.1 and 0.1000000001 are one set


def lam_key(lam: float) -> float:
    """Canonical form of a λ value, used as a dictionary key everywhere in ``seg``."""
    return round(float(lam), LAM_DECIMALS)


@dataclass
class AdaptiveConfig:
    """The curriculum of the ``adaptive`` scheme."""

    schedule: str = "linear"
    # linear: max λ goes from lam_min (None = smallest available) to the largest
    # available λ over the first ramp_fraction of training, then stays there.
    lam_min: float | None = None
    ramp_fraction: float = 0.8
    # step: training is `epochs` epochs long (progress * epochs = current epoch); at each
    # epoch in switch_epochs it moves to the next λ set in increasing order. Empty list:
    # the sets get equal shares of training.
    epochs: float = 60.0
    switch_epochs: list[float] = field(default_factory=list)
    # step, in the paper's own format (its ``--curriculum "0,20,40"``): the epoch at which
    # each λ set, in increasing λ order, takes over; one entry per set, the first 0.
    # Given, it replaces switch_epochs (= its entries after the first).
    curriculum: str | list[float] | None = None

    def boundaries(self) -> list[float]:
        """The switch epochs of the step schedule, from ``curriculum`` when given."""
        if self.curriculum is None:
            return list(self.switch_epochs)
        return parse_curriculum(self.curriculum)[1:]

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"scheme.adaptive.schedule={self.schedule!r}", f"unknown schedule; choose one of {list(SCHEDULES)}")
        if self.lam_min is not None and not 0.0 <= self.lam_min <= 1.0:
            raise BadInputError(f"scheme.adaptive.lam_min={self.lam_min}", "must be null or in [0, 1]")
        if not 0.0 < self.ramp_fraction <= 1.0:
            raise BadInputError(f"scheme.adaptive.ramp_fraction={self.ramp_fraction}", "must be in (0, 1]")
        if self.epochs <= 0:
            raise BadInputError(f"scheme.adaptive.epochs={self.epochs}", "must be > 0")
        if any(b <= a for a, b in zip(self.switch_epochs, self.switch_epochs[1:])):
            raise BadInputError(f"scheme.adaptive.switch_epochs={self.switch_epochs}", "must be strictly increasing")
        if self.curriculum is not None:
            parse_curriculum(self.curriculum)


def parse_curriculum(spec: str | Sequence[float]) -> list[float]:
    """The paper's ``--curriculum`` list (``"0,20,40"`` or ``[0, 20, 40]``): start epochs,
    the first 0, strictly increasing."""
    where = f"scheme.adaptive.curriculum={spec!r}"
    try:
        epochs = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise BadInputError(where, "expected comma-separated epochs such as 0,20,40") from None
    if not epochs or epochs[0] != 0:
        raise BadInputError(where, "the first λ set must start at epoch 0", "e.g. 0,20,40 for three λ sets")
    if any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise BadInputError(where, "epochs must be strictly increasing")
    return epochs


@dataclass
class SchemeConfig:
    """Which scheme, its λ parameters and the real/synthetic mix of every batch."""

    name: str = "real"
    # expected share of synthetic samples per batch (ignored by `real`); synth_only: the share of the steps
    # that are all synthetic, before the real ones
    synth_fraction: float = 0.5
    # fraction: synth_fraction; paper_epoch: the share of the paper's epoch, synthetic / (real + synthetic)
    # (K / (K + 1) for uniform over K sets; seg.budget)
    synth_share: str = "fraction"
    fixed_lambda: float | None = None
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    replace_p: float = 0.5  # replacement: probability that a sample is synthetic
    # replacement: what a replaced real sample becomes: 'source', one fixed synthetic sample of
    # its own source (the paper's); 'pool', any synthetic sample, streamed like the other
    # schemes' (no per-source index in memory)
    replace_from: str = "pool"
    aug_ratio: int = 1  # append: K synthetic samples a real one per epoch (the paper's 1, 2, 4, 8)
    best_dict: str = ""  # best_k: JSON file, source id -> its synthetic keys best first (or key -> score)
    best_k: int = 1  # best_k: how many of each source's best samples are used

    def validate(self) -> None:
        if self.name not in SCHEMES:
            raise BadInputError(f"scheme {self.name!r}", f"unknown scheme; choose one of {list(SCHEMES)}")
        if self.fixed_lambda is not None and not 0.0 < self.fixed_lambda <= 1.0:
            raise BadInputError(f"scheme.fixed_lambda={self.fixed_lambda}", "encode ratios lie in (0, 1]")
        if not 0.0 <= self.synth_fraction <= 1.0:
            raise BadInputError(f"scheme.synth_fraction={self.synth_fraction}", "must be in [0, 1]")
        if self.synth_share not in SHARES:
            raise BadInputError(f"scheme.synth_share={self.synth_share!r}", f"choose one of {list(SHARES)}")
        if not 0.0 <= self.replace_p <= 1.0:
            raise BadInputError(f"scheme.replace_p={self.replace_p}", "a probability: must be in [0, 1]")
        if self.replace_from not in REPLACE_FROM:
            raise BadInputError(f"scheme.replace_from={self.replace_from!r}", f"choose one of {list(REPLACE_FROM)}")
        for key in ("aug_ratio", "best_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadInputError(f"scheme.{key}={value!r}", "must be an integer >= 1 (the paper's 1, 2, 4, 8)")
        if self.name == "best_k" and not self.best_dict:
            raise BadInputError("scheme.best_dict", "scheme best_k needs the dictionary of each source's best samples",
                                "e.g. --set scheme.best_dict=best.json (source id -> keys, best first)")
        self.adaptive.validate()

    @property
    def uses_synthetic(self) -> bool:
        return self.name in POOL_SCHEMES or (self.name != "real" and self.synth_fraction > 0.0)


def check_available(cfg: SchemeConfig, available: Sequence[float]) -> list[float]:
    """Sorted canonical λ values, after checking that ``cfg`` can run on them.

    Raises (naming what is available) when a synthetic scheme has no synthetic data,
    the fixed λ was not generated, or the step schedule lists more switches than sets.
    """
    cfg.validate()
    lams = sorted({lam_key(x) for x in available if lam_key(x) > 0.0})
    if not cfg.uses_synthetic:
        return lams
    if not lams:
        raise BadInputError(
            f"scheme {cfg.name!r}",
            "needs synthetic samples (λ > 0) but none of the given manifests has any",
            "pass a synthetic manifest written by the generate job after the real one",
        )
    if cfg.name == "fixed":
        if cfg.fixed_lambda is None:
            raise BadInputError("scheme.fixed_lambda", f"not set; available λ values: {lams}", "e.g. --set scheme.fixed_lambda=0.5")
        if lam_key(cfg.fixed_lambda) not in lams:
            raise BadInputError(f"scheme.fixed_lambda={cfg.fixed_lambda}", f"no synthetic samples at this λ; available λ values: {lams}")
    ad = cfg.adaptive
    if cfg.name == "adaptive" and ad.schedule == "step" and ad.curriculum is not None and len(ad.boundaries()) != len(lams) - 1:
        raise BadInputError(  # the paper asserts one entry per synthetic set
            f"scheme.adaptive.curriculum={ad.curriculum!r}",
            f"{len(ad.boundaries()) + 1} start epochs for {len(lams)} λ sets {lams}", "give one start epoch per λ set",
        )
    if cfg.name == "adaptive" and ad.schedule == "step" and len(ad.boundaries()) > len(lams) - 1:
        raise BadInputError(
            f"scheme.adaptive.switch_epochs={ad.switch_epochs}",
            f"{len(ad.switch_epochs)} switches but only {len(lams)} λ sets {lams} (at most {len(lams) - 1} switches)",
        )
    return lams


def _linear_max(cfg: AdaptiveConfig, lams: list[float], progress: float) -> float:
    lo = lams[0] if cfg.lam_min is None else max(lams[0], cfg.lam_min)
    ramp = min(1.0, progress / cfg.ramp_fraction)
    return lo + (lams[-1] - lo) * ramp


def _step_index(cfg: AdaptiveConfig, n_sets: int, progress: float) -> int:
    if cfg.boundaries():
        return min(bisect.bisect_right(cfg.boundaries(), progress * cfg.epochs), n_sets - 1)
    return min(int(progress * n_sets), n_sets - 1)


def pool_weights(lams: list[float], sizes: dict[float, int] | None) -> list[float]:
    """Each set's probability in the pool schemes: its share of all synthetic samples (equal
    shares when the sizes are not known)."""
    counts = [float(sizes[x]) for x in lams] if sizes else [1.0] * len(lams)
    return [c / sum(counts) for c in counts]


def allowed_lambdas(cfg: SchemeConfig, available: Sequence[float], progress: float,
                    sizes: dict[float, int] | None = None) -> tuple[list[float], list[float]]:
    """λ values a synthetic sample may be drawn from at ``progress`` and their probabilities.

    ``progress`` is the fraction of training done (step / total steps). For ``real`` the
    answer is ``([0.0], [1.0])``: every sample comes from the real data. ``sizes`` (λ ->
    samples at it, canonical keys) weights the sets of the pool schemes.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    lams = check_available(cfg, available)
    if not cfg.uses_synthetic:
        return [0.0], [1.0]
    if cfg.name in POOL_SCHEMES:
        return lams, pool_weights(lams, sizes)
    if cfg.name == "fixed":
        chosen = [lam_key(cfg.fixed_lambda)]  # type: ignore[arg-type]
    elif cfg.name == "uniform":
        chosen = lams
    elif cfg.adaptive.schedule == "linear":
        top = _linear_max(cfg.adaptive, lams, progress)
        chosen = [x for x in lams if x <= top + 1e-9] or lams[:1]
    else:
        chosen = [lams[_step_index(cfg.adaptive, len(lams), progress)]]
    return chosen, [1.0 / len(chosen)] * len(chosen)


def synthetic_count(batch_size: int, cfg: SchemeConfig, rng: np.random.Generator, progress: float = 0.0) -> int:
    """How many of a batch's samples are synthetic: ``batch * synth_fraction``, rounded
    stochastically so that the long-run share is exact for any batch size.

    ``replacement`` tosses one coin per sample (binomial, as the paper's per-sample
    ``torch.rand``); ``synth_only`` is all synthetic before the switch (``synth_fraction``
    of training) and all real after it.
    """
    if not cfg.uses_synthetic:
        return 0
    if cfg.name == "replacement":
        return int(rng.binomial(batch_size, cfg.replace_p))
    if cfg.name == "synth_only":
        return batch_size if progress < cfg.synth_fraction else 0
    expected = batch_size * cfg.synth_fraction
    base = int(np.floor(expected))
    return min(batch_size, base + int(rng.random() < expected - base))


def lr_progress(cfg: SchemeConfig, progress: float) -> float:
    """Where the learning-rate schedule stands at ``progress``: the run's own progress, except
    for ``synth_only``, whose schedule restarts at the switch. The paper's real phase is a
    second run resumed with ``--lr-start 60 --epochs 120``: its poly decay starts again from
    the base rate over its own 60 epochs (``LR_Scheduler``: N = (120 - 60) x iterations)."""
    f = cfg.synth_fraction
    if cfg.name != "synth_only" or not 0.0 < f < 1.0:
        return progress
    return progress / f if progress < f else (progress - f) / (1.0 - f)


def draw_lambdas(cfg: SchemeConfig, available: Sequence[float], progress: float, n: int, rng: np.random.Generator,
                 sizes: dict[float, int] | None = None) -> list[float]:
    """``n`` λ values for the synthetic samples of one batch at ``progress``."""
    if n == 0:
        return []
    lams, probs = allowed_lambdas(cfg, available, progress, sizes)
    return [lams[i] for i in rng.choice(len(lams), size=n, p=probs)]
