"""The headline result (``docs/results/headline.json``) rendered: tables and a verdict computed
from the numbers, on hand-made files: target met, not met, and not yet judgeable."""

from __future__ import annotations

import copy

from experiments.report import Page, headline_markdown, headline_verdict, render_headline
from test_report import _row

LAMBDA_AWARE = ["fixed", "uniform", "adaptive"]


def _stats(per_draw: list[float], ci: list[float] | None) -> dict:
    return {"n_draws": len(per_draw), "mean": sum(per_draw) / len(per_draw), "ci95": ci, "per_draw": per_draw}


def met() -> dict:
    """3 complete draws; fixed gains 4 points (interval [1.5, 6.5]); the control loses against fixed."""
    return {
        "split": "test", "commit": "a" * 40, "config": "configs/sweeps/headline.yaml", "frozen_commit": "b" * 40,
        "draws": [1, 2, 3], "seg_seeds": [0, 1], "baseline": "real_classical",
        "interval": "t interval over draws (mean of each draw's seeds), 95 %",
        "arms": {
            "real_classical": {"per_draw": [[29.0, 29.0], [28.0, 28.0], [30.0, 30.0]]},
            "fixed": {"per_draw": [[33.0, 33.0], [32.5, 31.5], [34.0, 34.0]]},
            "uniform": {"per_draw": [[30.0, 31.0], [29.0, 29.0], [31.0, 31.0]]},
            "adaptive": {"per_draw": [[32.0, 32.0], [31.0, 31.0], [33.0, 33.0]]},
            "mismatched": {"per_draw": [[28.0, 28.0], [27.0, 27.0], [29.0, 29.0]]},
        },
        "paired": {"fixed": _stats([4.0, 4.0, 4.0], [1.5, 6.5]), "uniform": _stats([1.5, 1.0, 1.0], [0.4, 2.2]),
                   "adaptive": _stats([3.0, 3.0, 3.0], [2.0, 4.0]), "mismatched": _stats([-1.0, -1.0, -1.0], [-1.5, -0.5])},
        "contrasts": {"adaptive - fixed": _stats([-1.0, -1.0, -1.0], [-2.0, 0.3]),
                      "fixed - mismatched": _stats([5.0, 5.0, 5.0], [3.0, 7.0])},
        "target": {"points": 3.0, "lambda_aware": LAMBDA_AWARE},
    }


def not_met() -> dict:
    """The best arm's mean is above 3 but its interval reaches below 0; the control is not separated."""
    data = met()
    data["paired"]["fixed"] = _stats([6.0, -0.5, 4.0], [-4.5, 10.5])
    data["paired"]["adaptive"] = _stats([2.0, 2.5, 2.0], [1.5, 2.9])
    data["contrasts"]["fixed - mismatched"] = _stats([3.0, -2.0, 2.0], [-4.0, 6.0])
    data["contrasts"]["adaptive - fixed"] = _stats([-4.0, 3.0, -2.0], [-9.0, 7.0])
    return data


def incomplete() -> dict:
    """Only draw 1 complete; draw 2 half run; draw 3 not started: no interval yet."""
    data = copy.deepcopy(met())
    for arm in data["arms"].values():
        first, second, _ = arm["per_draw"]
        arm["per_draw"] = [first, [second[0], None], None]
    data["paired"] = {a: {"n_draws": 1, "mean": m, "ci95": None, "per_draw": [m]}
                      for a, m in (("fixed", 4.0), ("uniform", 1.5), ("adaptive", 3.0), ("mismatched", -1.0))}
    data["contrasts"] = {"adaptive - fixed": {"n_draws": 1, "mean": -1.0, "ci95": None, "per_draw": [-1.0]},
                         "fixed - mismatched": {"n_draws": 1, "mean": 5.0, "ci95": None, "per_draw": [5.0]}}
    return data


def test_met():
    data = met()
    md = headline_markdown(data)
    assert md.startswith("## The headline\n")
    assert "`python -m jobs.sweep --config configs/sweeps/headline.yaml`" in md and "`aaaaaaaaaaaa`" in md
    data["commit"] += "+dirty"  # written with uncommitted changes: the short form says so too
    assert "at commit `aaaaaaaaaaaa+dirty`" in headline_markdown(data)
    assert _row(md, "arm") == ["arm", "draw 1", "draw 2", "draw 3", "mean (complete draws)", "Δ vs real_classical",
                               "95 % interval", "n draws"]
    assert _row(md, "real_classical")[1:] == ["29.00", "28.00", "30.00", "29.00", "–", "–", "–"]
    assert _row(md, "fixed")[1:] == ["33.00", "32.00", "34.00", "33.00", "+4.00", "[1.50, 6.50]", "3"]
    assert [r[0] for r in (_row(md, a) for a in ("real_classical", *LAMBDA_AWARE, "mismatched"))]  # every arm a row
    assert md.index("| real_classical") < md.index("| fixed") < md.index("| adaptive") < md.index("| mismatched")
    assert _row(md, "fixed - mismatched")[1:] == ["+5.00", "[3.00, 7.00]", "3", "+5.00, +5.00, +5.00"]
    verdict = headline_verdict(data)
    assert "the best λ-aware arm by paired mean is fixed, +4.00 points over real_classical " \
           "(95 % interval [1.50, 6.50], 3 of 3 draws)" in verdict
    assert "Target (≥ 3 points over real_classical, the interval's lower bound above 0): met." in verdict
    assert "The control (mismatched) lost against fixed: fixed − mismatched = +5.00 points" in verdict
    assert "adaptive did not clearly beat fixed: adaptive − fixed = -1.00 points (95 % interval [-2.00, 0.30], " \
           "3 draw(s)), the interval includes 0." in verdict
    assert verdict in md


def test_not_met():
    verdict = headline_verdict(not_met())
    assert "best λ-aware arm by paired mean is fixed, +3.17 points" in verdict
    assert ": not met (the interval's lower bound -4.50 is not above 0)." in verdict
    assert "The control (mismatched) did not clearly lose against fixed: fixed − mismatched = +1.00 points" in verdict
    assert "adaptive did not clearly beat fixed" in verdict
    # a mean below the target is named as a reason too
    data = not_met()
    data["paired"]["fixed"] = _stats([2.0, 2.5, 2.0], [1.0, 3.0])
    data["paired"]["adaptive"] = _stats([1.0, 1.0, 1.0], [0.5, 1.5])
    assert ": not met (the mean +2.17 is below 3)." in headline_verdict(data)
    # the control beating the λ-aware arm is said as such
    data["contrasts"]["fixed - mismatched"] = _stats([-3.0, -2.0, -2.5], [-3.7, -1.3])
    assert "The control (mismatched) beat fixed: fixed − mismatched = -2.50 points" in headline_verdict(data)


def test_incomplete():
    data = incomplete()
    md = headline_markdown(data)
    assert _row(md, "fixed")[1:] == ["33.00", "32.50 (1/2 seeds)", "–", "33.00", "+4.00", "–", "1"]
    assert _row(md, "adaptive - fixed")[1:] == ["-1.00", "–", "1", "-1.00"]
    verdict = headline_verdict(data)
    assert "fixed, +4.00 points over real_classical (no interval yet, 1 of 3 draws)" in verdict
    assert "cannot be judged yet: 1 complete draw(s), an interval needs at least 2." in verdict
    assert "adaptive − fixed = -1.00 points (1 draw(s)): cannot be judged yet." in verdict
    assert "met" not in verdict.replace("not met", "")
    # nothing run at all
    data["paired"], data["contrasts"] = {}, {}
    assert "none of the λ-aware arms (fixed, uniform, adaptive) has a complete draw" in headline_verdict(data)


def test_partial_draws_say_so_far():
    data = met()
    for name in ("fixed", "uniform", "adaptive"):
        data["paired"][name] = {**data["paired"][name], "n_draws": 2, "per_draw": data["paired"][name]["per_draw"][:2]}
    assert ": met on 2 of 3 draws so far." in headline_verdict(data)


def test_html_of_the_blocks():
    page = Page("t")
    page.blocks += render_headline(met())
    html = page.html()
    assert "<th>Δ vs real_classical</th>" in html and "<td>fixed</td><td>33.00</td><td>32.00</td>" in html
    assert "<code>python -m jobs.sweep --config configs/sweeps/headline.yaml</code>" in html


def test_record_of_experiments_draws():
    """The shape experiments.draws.collect writes: config by name, no frozen commit, stale runs named."""
    data = incomplete()
    data.update(config="headline", stale=["draw-2/seg/arm-fixed-seed1"])
    del data["frozen_commit"]
    md = headline_markdown(data)
    assert "`python -m jobs.sweep --config configs/sweeps/headline.yaml`" in md and "frozen" not in md
    assert "Not counted: 1 finished run(s) made under another identity than today's (`draw-2/seg/arm-fixed-seed1`)." in md
    assert "run record" not in md
    data["from_record"] = ["draw-1/seg/arm-fixed-seed0", "draw-1/seg/arm-real-seed0", "draw-10/seg/arm-real-seed0"]
    assert "from the run record (their folders are gone; config fingerprints checked, data not rechecked): 3 run(s) of " \
           "draw(s) 1, 10." in headline_markdown(data)


def test_generator_check_per_draw_is_shown_when_recorded():
    data = met()
    assert "Generator check" not in headline_markdown(data)  # older results have none
    data["memorization"] = {"1": {"w2p00-l0p40": {"lambda": 0.4, "l1_own": 5.6, "nearest_is_own": 1.0},
                                  "w2p00-l1p00": {"lambda": 1.0, "l1_own": 12.1, "nearest_is_own": 0.998}}, "2": {}}
    md = headline_markdown(data)
    assert "draw 1: λ = 0.4 100.0 %, λ = 1 99.8 %." in md and "draw 2" not in md.split("Generator check")[1].split("\n")[0]


def _spread_table(md: str) -> str:
    return md.split("seed floor |", 1)[1].split("\n\n", 1)[0]


def test_differences_per_draw_and_seed_against_the_seed_noise_floor():
    """The per-seed differences come from the arms' own values (seed k against the baseline's
    seed k); an arm whose draws agree more closely than seed noise allows (SD over draws below
    seed SD / √seeds) is named with the interval the floor gives, computed here by hand."""
    from scipy import stats

    data = met()
    data["arms"]["uniform"]["per_draw"][1] = [30.0, 30.0]  # draw means 1.5, 2, 1: SD 0.5 over a floor of 0.29
    md = headline_markdown(data)
    # fixed: draws +4 / +4, +4.5 / +3.5, +4 / +4: SD over draws 0; seed variances 0, 0.5, 0 -> floor √(0.5 / 3 / 2)
    floor = (0.5 / 3 / 2) ** 0.5
    assert _row(_spread_table(md), "fixed") == ["fixed", "+4.00 / +4.00", "+4.50 / +3.50", "+4.00 / +4.00", "0.00",
                                                f"{floor:.2f}"]
    assert _row(_spread_table(md), "uniform") == ["uniform", "+1.00 / +2.00", "+2.00 / +2.00", "+1.00 / +1.00", "0.50",
                                                  f"{floor:.2f}"]
    half = stats.t.ppf(0.975, 2) * floor / 3 ** 0.5  # 0.72: the plain interval of three equal draws has width 0
    assert f"With the floor in its place, 95 %: fixed ([{4 - half:.2f}, {4 + half:.2f}], 3 draws)." in md
    assert "uniform ([" not in md and "adaptive ([" not in md  # above the floor; adaptive's seeds never differ (floor 0)
    data["arms"]["adaptive"]["per_draw"][1] = [31.0, None]  # an incomplete draw has no per-seed difference
    data["arms"]["fixed"]["per_draw"][1] = [32.0, 32.0]  # +4 everywhere: SD 0, floor 0, nothing to name
    md = headline_markdown(data)
    assert _row(_spread_table(md), "adaptive") == ["adaptive", "+3.00 / +3.00", "–", "+3.00 / +3.00", "0.00", "0.00"]
    assert "seed noise allows" not in md


def test_the_markdown_is_rewritten_from_the_json(tmp_path, capsys):
    """python -m experiments.report --headline JSON: the Markdown beside it, from its numbers."""
    import json

    from experiments.report import main

    path = tmp_path / "headline.json"
    path.write_text(json.dumps(met()))
    assert main(["--headline", str(path)]) == 0
    assert (tmp_path / "headline.md").read_text() == headline_markdown(met()) + "\n"
    from PIL import Image

    from engine.plots import PLOT_PX

    assert Image.open(tmp_path / "headline.png").size == PLOT_PX  # the forest plot beside it
    assert main(["--headline", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: is not a file" in capsys.readouterr().err


def test_the_plot_shows_each_arms_draws_mean_and_interval(tmp_path, monkeypatch):
    """The forest plot gets, per arm other than the baseline and in the table's order, the
    per-draw differences, their mean and the interval; 0 and the target are marked."""
    import experiments.report as report

    seen = {}
    monkeypatch.setattr(report, "plot_intervals", lambda *a, **k: seen.update(args=a) or "x.png")
    report.plot_headline(met(), tmp_path / "x.png")
    labels, points, means, intervals, _, _, _, marks = seen["args"]
    assert labels == ["fixed", "uniform", "adaptive", "mismatched"]
    assert points[0] == [4.0, 4.0, 4.0] and means[2] == 3.0 and intervals[3] == [-1.5, -0.5]
    assert marks == {"0": 0.0, "target +3": 3.0}
