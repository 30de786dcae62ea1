"""The low-data draw: which labelled train sources a run keeps, one mechanism for every stage.

Ingest (``--subset``) and seg (``data.real_fraction``) both call :func:`draw_subset`, so
the same ``(fraction, seed)`` keeps the same scenes wherever it is applied: a seg run on
the full real set with ``real_fraction: 1/16, subset_seed: s`` trains on exactly the
scenes that ``ingest --subset 1/16`` with ``subset_seed: s`` writes. Before this was one
function, the two drew different scenes from the same seed (3 shared of 128), and a
learning curve and a headline measured on "the 1/16 draw" were measured on different data.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def draw_subset(source_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """``round(fraction * n)`` (at least 1) of the ``n`` distinct ids, drawn by ``seed``.

    The ids are sorted first, so the draw does not depend on the order a reader lists
    them in; they are taken from the front of one seeded permutation, so smaller fractions
    of the same seed are nested inside larger ones (a learning curve adds data, it does
    not swap it).
    """
    ids = sorted(set(source_ids))
    if fraction >= 1.0 or not ids:
        return set(ids)
    k = max(1, round(fraction * len(ids)))
    return {ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:k]}
