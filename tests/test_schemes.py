"""λ-aware sampling schemes: the λ distribution at the start, middle and end of training."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from engine.errors import BadInputError
from seg.schemes import AdaptiveConfig, SchemeConfig, allowed_lambdas, draw_lambdas, synthetic_count

LAMS = [round(0.1 * i, 1) for i in range(1, 11)]  # the paper's 0.1 ... 1.0
N = 20_000


def freq(cfg: SchemeConfig, progress: float, lams=LAMS, seed: int = 0) -> dict[float, float]:
    drawn = draw_lambdas(cfg, lams, progress, N, np.random.default_rng(seed))
    return {k: v / N for k, v in Counter(drawn).items()}


def test_real_scheme_is_only_lambda_zero():
    cfg = SchemeConfig(name="real")
    for p in (0.0, 0.5, 1.0):
        assert allowed_lambdas(cfg, LAMS, p) == ([0.0], [1.0])
        assert allowed_lambdas(cfg, [], p) == ([0.0], [1.0])  # needs no synthetic data
    assert synthetic_count(16, cfg, np.random.default_rng(0)) == 0


def test_fixed_scheme_only_the_chosen_lambda():
    cfg = SchemeConfig(name="fixed", fixed_lambda=0.3)
    for p in (0.0, 0.5, 1.0):
        assert freq(cfg, p) == {0.3: 1.0}


def test_uniform_scheme_equal_frequencies_all_along():
    cfg = SchemeConfig(name="uniform")
    for p in (0.0, 0.5, 1.0):
        f = freq(cfg, p, seed=int(p * 10))
        assert sorted(f) == LAMS
        assert max(abs(v - 0.1) for v in f.values()) < 0.012


def test_adaptive_linear_grows_from_smallest_to_all():
    cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="linear", ramp_fraction=1.0))
    assert freq(cfg, 0.0) == {0.1: 1.0}
    mid = freq(cfg, 0.5)
    midpoint = 0.1 + (1.0 - 0.1) * 0.5  # 0.55
    assert sorted(mid) == [x for x in LAMS if x <= midpoint] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert max(abs(v - 0.2) for v in mid.values()) < 0.015
    end = freq(cfg, 1.0)
    assert sorted(end) == LAMS
    assert max(abs(v - 0.1) for v in end.values()) < 0.012
    # The largest allowed λ never decreases.
    tops = [max(allowed_lambdas(cfg, LAMS, p)[0]) for p in np.linspace(0, 1, 50)]
    assert tops == sorted(tops)


def test_adaptive_linear_ramp_fraction_and_lam_min():
    cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="linear", ramp_fraction=0.5, lam_min=0.3))
    assert allowed_lambdas(cfg, LAMS, 0.0)[0] == [0.1, 0.2, 0.3]
    assert allowed_lambdas(cfg, LAMS, 0.5)[0] == LAMS  # full range reached at half of training
    assert allowed_lambdas(cfg, LAMS, 0.75)[0] == LAMS


def test_adaptive_step_switches_sets_at_epochs():
    cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="step", epochs=30, switch_epochs=[10, 20]))
    lams = [1.0, 0.2, 0.5]  # order given does not matter: sets are sorted by λ
    assert freq(cfg, 0.0, lams) == {0.2: 1.0}
    assert freq(cfg, 9.9 / 30, lams) == {0.2: 1.0}
    assert freq(cfg, 0.5, lams) == {0.5: 1.0}  # epoch 15
    assert freq(cfg, 20 / 30, lams) == {1.0: 1.0}
    assert freq(cfg, 1.0, lams) == {1.0: 1.0}


def paper_set_at(curriculum: list[int], epoch: int) -> int:
    """The paper's dataset index at ``epoch``, transcribed from its pascal.py loop."""
    idx = 0
    while idx != len(curriculum) and epoch >= curriculum[idx]:
        idx += 1
    return idx - 1


@pytest.mark.parametrize("spec", ["0,10,20", "0, 10, 20", [0, 10, 20]])
def test_paper_curriculum_list_matches_the_papers_own_rule(spec):
    cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="step", epochs=30, curriculum=spec))
    lams = [0.2, 0.5, 1.0]
    for epoch in range(30):
        assert allowed_lambdas(cfg, lams, epoch / 30)[0] == [lams[paper_set_at([0, 10, 20], epoch)]]


def test_paper_curriculum_is_validated():
    def run(spec, lams=(0.2, 0.5)):
        cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="step", curriculum=spec))
        return allowed_lambdas(cfg, list(lams), 0.0)

    with pytest.raises(BadInputError, match="start at epoch 0"):
        run("5,10")
    with pytest.raises(BadInputError, match="strictly increasing"):
        run("0,10,10")
    with pytest.raises(BadInputError, match="comma-separated"):
        run("0,ten")
    with pytest.raises(BadInputError, match=r"3 start epochs for 2 λ sets"):
        run("0,10,20")


def test_adaptive_step_default_equal_shares():
    cfg = SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="step"))
    lams = [0.2, 0.5, 1.0]
    got = [allowed_lambdas(cfg, lams, p)[0] for p in (0.0, 0.32, 0.34, 0.65, 0.67, 1.0)]
    assert got == [[0.2], [0.2], [0.5], [0.5], [1.0], [1.0]]


def test_synthetic_count_long_run_share():
    cfg = SchemeConfig(name="uniform", synth_fraction=0.3)
    rng = np.random.default_rng(0)
    counts = [synthetic_count(5, cfg, rng) for _ in range(4000)]
    assert set(counts) == {1, 2}  # 5 * 0.3 = 1.5: stochastic rounding
    assert abs(np.mean(counts) / 5 - 0.3) < 0.01


def test_errors_name_the_problem():
    with pytest.raises(BadInputError, match="unknown scheme"):
        allowed_lambdas(SchemeConfig(name="curriculum"), LAMS, 0.0)
    with pytest.raises(BadInputError, match=r"available λ values: \[0.2, 0.5\]"):
        allowed_lambdas(SchemeConfig(name="fixed", fixed_lambda=0.3), [0.5, 0.2], 0.0)
    with pytest.raises(BadInputError, match="synthetic manifest"):
        allowed_lambdas(SchemeConfig(name="uniform"), [0.0], 0.0)
    with pytest.raises(BadInputError, match="at most 1 switches"):
        allowed_lambdas(SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="step", switch_epochs=[1, 2])), [0.2, 0.5], 0.0)
    with pytest.raises(BadInputError, match="unknown schedule"):
        allowed_lambdas(SchemeConfig(name="adaptive", adaptive=AdaptiveConfig(schedule="cosine")), [0.2], 0.0)
