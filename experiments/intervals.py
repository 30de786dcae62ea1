"""The t interval of a mean over labelled draws, shared by the headline's summary
(:mod:`experiments.draws`) and its report's seed-noise floor (:mod:`experiments.report`),
which must not import each other."""

from __future__ import annotations

import math


def t_interval(mean: float, sd: float, n: int, level: float) -> list[float]:
    """``mean ± t · sd / √n``, t at ``level`` with n − 1 degrees of freedom."""
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return [mean - half, mean + half]
