"""benchmarks/per_class.py: each arm's per-class IoU minus the baseline's, over draw folders,
against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest

from scripts import load_script

per_class = load_script("benchmarks/per_class.py")


def _run(folder, arm, seed, ious, split="test"):
    path = folder / "seg" / f"arm-{arm}-seed{seed}"
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"eval_split": split,
                                                   "per_class_iou": dict(zip(("background", "disc"), ious))}))


@pytest.fixture
def draws(tmp_path):
    a, b = tmp_path / "draw-1", tmp_path / "draw-2"
    for seed, ious in ((0, (0.90, 0.70)), (1, (0.92, 0.74))):
        _run(a, "base", seed, ious)
    _run(a, "fixed", 0, (0.88, 0.60))
    _run(a, "fixed", 1, (0.90, 0.66))
    _run(a, "tuning", 0, (0.5, 0.5), split="val")  # a val run in the same folder: not comparable
    for seed in (0, 1):
        _run(b, "base", seed, (0.80, 0.50))
        _run(b, "fixed", seed, (0.81, 0.55))
    _run(b, "other", 2, (0.1, 0.1))  # a seed the baseline lacks
    return [a, b]


def test_differences_per_class_and_draw(draws, capsys):
    diffs, left_out = per_class.per_class_differences(draws, "base")
    # draw 1: seed means fixed (0.89, 0.63) - base (0.91, 0.72); draw 2: (0.81, 0.55) - (0.80, 0.50)
    assert diffs["fixed"]["background"] == pytest.approx([-2.0, 1.0])
    assert diffs["fixed"]["disc"] == pytest.approx([-9.0, 5.0])
    assert set(diffs) == {"fixed"} and left_out == ["draw-1/tuning", "draw-2/other"]
    assert per_class.main([str(d) for d in draws] + ["--baseline", "base"]) == 0
    out = capsys.readouterr().out
    assert "| fixed | -0.5 (-2.0, +1.0) | -2.0 (-9.0, +5.0) |" in out and "left out" in out


def test_bad_folders_are_named(draws, tmp_path, capsys):
    assert per_class.main([str(tmp_path / "empty")]) == 2
    assert "empty: holds no finished arm run" in capsys.readouterr().err
    assert per_class.main([str(draws[0])]) == 2  # the default baseline, real_classical, is not there
    assert "has no run of the baseline arm 'real_classical'" in capsys.readouterr().err
