"""Arms and draws (experiments/draws.py): planning, the paired interval, what collect counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.errors import BadInputError
from engine.identity import file_digest
from experiments.draws import check_draws_config, collect, draw_config, draw_dir, paired
from experiments.sweep import REPO, cell_identity, load_sweep_config, memorization_setup, plan_seg_runs, seg_identity

DEMO = REPO / "configs" / "demo" / "tiny.yaml"
ARMS = [
    "studies.schemes.enabled=false", "studies.arms.enabled=true", "studies.arms.seeds=[0, 1]", "studies.arms.w=2.0",
    "studies.arms.baseline=real", "grid.w=[2.0]", "grid.lambdas=[0.5, 1.0]",
    "studies.arms.arms={real: {}, longer: {set: {train.steps: 1200}}, fixed: {scheme: fixed, lambdas: [1.0]}, "
    "uniform: {scheme: uniform, lambdas: [0.5, 1.0]}}",
    "studies.arms.contrasts=[[uniform, fixed]]", "studies.arms.lambda_aware=[fixed, uniform]",
    "draws.seeds=[3, 5, 8]", "real_manifest=null", "model_dir=null",
]


def test_arms_are_planned_with_their_own_settings():
    cfg = load_sweep_config(DEMO, ARMS)
    runs = {r.name: r for r in plan_seg_runs(cfg)}
    assert set(runs) == {f"arm-{a}-seed{k}" for a in ("real", "longer", "fixed", "uniform") for k in (0, 1)}
    assert runs["arm-uniform-seed1"].cells == ["w2p00-l0p50", "w2p00-l1p00"] and runs["arm-real-seed0"].cells == []
    steps = {name: seg_identity(cfg, run, {"real": "r", "w2p00-l0p50": "a", "w2p00-l1p00": "b"})[0].train.steps
             for name, run in runs.items()}
    assert steps["arm-longer-seed0"] == 1200 and steps["arm-real-seed0"] == cfg.seg.train.steps != 1200


@pytest.mark.parametrize("sets, match", [
    (["studies.arms.baseline=best"], "is not one of the arms"),
    (["studies.arms.arms.fixed.lambdas=[0.7]"], "not in the grid"),
    (["studies.arms.arms.fixed.lambdas=[0.5, 1.0]"], "exactly one"),
    (["studies.arms.arms.real.lambdas=[1.0]"], "real only takes no"),
    (["studies.arms.contrasts=[[uniform]]"], "pair"),
    (["studies.arms.lambda_aware=[adaptive]"], "is not one of the arms"),
    (["draws.seeds=[1, 1]"], "repeats"),
])
def test_bad_arms_and_draws(sets, match):
    with pytest.raises(BadInputError, match=match):
        load_sweep_config(DEMO, ARMS + sets)


def test_draws_need_their_own_ingest_and_controlnet():
    with pytest.raises(BadInputError, match="each draw must ingest"):
        check_draws_config(load_sweep_config(DEMO, ARMS + ["model_dir=runs/x"]))
    with pytest.raises(BadInputError, match="studies.arms is not enabled"):
        check_draws_config(load_sweep_config(DEMO, ARMS + ["studies.arms.enabled=false"]))
    with pytest.raises(BadInputError, match="every draw would be the same data"):
        check_draws_config(load_sweep_config(DEMO, ARMS + ["ingest.subset=1"]))
    with pytest.raises(BadInputError, match="would draw again"):
        check_draws_config(load_sweep_config(DEMO, ARMS + ["seg.data.real_fraction=0.5"]))
    sub = draw_config(load_sweep_config(DEMO, ARMS + ["out=runs/e"]), 5)
    assert (sub.out, sub.ingest.subset_seed, sub.draws.seeds) == (str(Path("runs/e/draw-5")), 5, [])


def test_paired_t_interval_against_a_hand_computation():
    arm = [[31.0, 33.0], [30.0, 30.0], [35.0, 33.0], None]
    base = [[29.0, 29.0], [29.5, 28.5], [30.0, 30.0], [28.0, 28.0]]
    result = paired(arm, base, 0.95)
    diffs = [3.0, 1.0, 4.0]  # seed means 32 - 29, 30 - 29, 34 - 30; the 4th draw has no arm runs
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    def t_2df(level: float) -> float:  # Student's t with 2 df in closed form: F(t) = 1/2 + t / (2 sqrt(2 + t²))
        return level * math.sqrt(2 / (1 - level ** 2))

    half = t_2df(0.95) * sd / math.sqrt(3)
    assert t_2df(0.95) == pytest.approx(4.302652729749464)  # the table's t(0.975, 2)
    assert result["n_draws"] == 3 and result["per_draw"] == diffs and result["draw_index"] == [0, 1, 2]
    assert result["mean"] == pytest.approx(mean)
    assert result["ci95"] == pytest.approx([mean - half, mean + half]) and "ci_adjusted" not in result
    # The best of 3 arms: a Bonferroni interval at 1 - 0.05 / 3 beside the plain one.
    best = paired(arm, base, 0.95, comparisons=3)
    wide = t_2df(1 - 0.05 / 3) * sd / math.sqrt(3)
    assert best["ci95"] == result["ci95"] and best["ci_adjusted"] == pytest.approx([mean - wide, mean + wide])
    one = paired([[31.0, None], [32.0, 30.0]], [[29.0, 29.0], [29.0, 29.0]], 0.95)  # a draw with a missing seed is out
    assert one == {"n_draws": 1, "mean": 2.0, "ci95": None, "per_draw": [2.0], "draw_index": [1]}


def _fake_draw(cfg, seed: int, miou: dict[str, float]) -> None:
    """A draw folder as run_sweep leaves it: manifests (any bytes: only their digests matter),
    and each named seg run with its recorded identity and summary."""
    sub = draw_config(cfg, seed)
    folder = draw_dir(cfg.out, seed)
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "manifest.parquet").write_bytes(f"real {seed}".encode())
    digests = {"real": file_digest(folder / "real" / "manifest.parquet")}
    for cell in ("w2p00-l0p50", "w2p00-l1p00"):
        (folder / "synthetic" / cell).mkdir(parents=True)
        (folder / "synthetic" / cell / "manifest.parquet").write_bytes(f"{cell} {seed}".encode())
        digests[cell] = file_digest(folder / "synthetic" / cell / "manifest.parquet")
    for run in plan_seg_runs(sub):
        if run.name not in miou:
            continue
        _, identity = seg_identity(sub, run, digests)
        identity.save(folder / "seg" / run.name)
        (folder / "seg" / run.name / "summary.json").write_text(json.dumps({"miou": miou[run.name] / 100}))
        (folder / "seg" / run.name / "commit.json").write_text(json.dumps({"commit": f"sha{seed}"}))


def test_collect_pairs_arms_within_draws_and_skips_stale_runs(tmp_path):
    cfg = load_sweep_config(DEMO, ARMS + [f"out={tmp_path}"])
    everything = {f"arm-{a}-seed{k}": v + k for a, v in (("real", 30.0), ("longer", 31.0), ("fixed", 33.0), ("uniform", 32.0))
                  for k in (0, 1)}
    _fake_draw(cfg, 3, everything)
    _fake_draw(cfg, 5, {**everything, "arm-fixed-seed0": 36.0})
    _fake_draw(cfg, 8, {"arm-real-seed0": 30.0})  # under way: one run finished
    result = collect(cfg)
    assert result["draws"] == [3, 5, 8] and result["seg_seeds"] == [0, 1] and result["baseline"] == "real"
    assert result["arms"]["fixed"]["per_draw"] == [[33.0, 34.0], [36.0, 34.0], None]
    assert result["arms"]["real"]["per_draw"][2] == [30.0, None]
    assert result["paired"]["fixed"]["per_draw"] == [3.0, 4.5] and result["paired"]["fixed"]["n_draws"] == 2
    assert result["contrasts"]["uniform - fixed"]["per_draw"] == [-1.0, -2.5]
    assert result["target"] == {"points": 3.0, "lambda_aware": ["fixed", "uniform"]} and result["stale"] == []
    assert result["draw_commits"] == {"3": ["sha3"], "5": ["sha5"], "8": ["sha8"]}
    assert "ci_adjusted" not in result["paired"]["longer"] and result["paired"]["fixed"]["n_draws"] == 2
    assert result["paired"]["fixed"]["adjusted_confidence"] == pytest.approx(0.975)  # the best of 2 λ-aware arms
    # A cell generated again under a finished run: that run no longer counts, and is named.
    (draw_dir(tmp_path, 5) / "synthetic" / "w2p00-l1p00" / "manifest.parquet").write_bytes(b"regenerated")
    result = collect(cfg)
    assert result["arms"]["fixed"]["per_draw"][1] is None and result["arms"]["real"]["per_draw"][1] == [30.0, 31.0]
    assert "draw-5/seg/arm-fixed-seed0" in result["stale"] and result["paired"]["fixed"]["n_draws"] == 1
    # A config change (the seg budget) makes every run stale.
    changed = load_sweep_config(DEMO, ARMS + [f"out={tmp_path}", "seg.train.steps=99"])
    assert all(v is None for v in collect(changed)["arms"]["real"]["per_draw"])


def test_the_record_carries_finished_draws_across_lost_folders(tmp_path, monkeypatch):
    """run_draws writes every counted run to draws.record; a draw whose folder is gone and whose
    runs are all recorded with today's fingerprints is not rerun and still counts; a change to
    one arm (or to what made the data) counts only the runs it does not touch."""
    import shutil

    from experiments import draws

    record = tmp_path / "record.json"
    sets = ARMS + [f"out={tmp_path / 'effect'}", f"draws.record={json.dumps(str(record))}"]
    cfg = load_sweep_config(DEMO, sets)
    everything = {f"arm-{a}-seed{k}": v + k for a, v in (("real", 30.0), ("longer", 31.0), ("fixed", 33.0), ("uniform", 32.0))
                  for k in (0, 1)}
    _fake_draw(cfg, 3, everything)
    _fake_draw(cfg, 5, {**everything, "arm-fixed-seed0": 36.0})
    def checks(seed: int) -> dict[str, dict]:  # a draw's memorization.json cells, as the sweep's stage writes them
        folder = draw_dir(cfg.out, seed)
        setup = memorization_setup(draw_config(cfg, seed), folder / "real" / "manifest.parquet")
        return {name: {"lambda": lam, "l1_own": l1, "nearest_is_own": own,
                       "identity": cell_identity(setup, folder / "synthetic" / name / "manifest.parquet")}
                for name, lam, l1, own in (("w2p00-l0p50", 0.5, 5.6789, 1.0), ("w2p00-l1p00", 1.0, 12.1, 0.33333))}

    stale_check = {**checks(5), "w2p00-l1p00": {**checks(5)["w2p00-l1p00"], "identity": "of other data"}}
    (draw_dir(cfg.out, 5) / "memorization.json").write_text(json.dumps({"cells": stale_check}))
    (draw_dir(cfg.out, 3) / "memorization.json").write_text(json.dumps({"cells": checks(3)}))
    swept: list[int] = []
    monkeypatch.setattr(draws, "run_sweep", lambda sub: swept.append(sub.ingest.subset_seed))
    draws.run_draws(cfg)
    assert swept == [3, 5, 8]
    entries = json.loads(record.read_text())["runs"]
    assert len(entries) == 16 and {e["source"] for e in entries} == {"run folder"}
    assert len(json.loads(record.read_text())["cells"]) == 3  # draw 5's check of other data is not recorded
    first = json.loads((tmp_path / "effect" / "headline.json").read_text())
    assert first["memorization"]["3"]["w2p00-l0p50"] == {"lambda": 0.5, "l1_own": 5.68, "nearest_is_own": 1.0}
    assert list(first["memorization"]["5"]) == ["w2p00-l0p50"]
    assert first["arms"]["fixed"]["per_draw"] == [[33.0, 34.0], [36.0, 34.0], None] and first["from_record"] == []

    shutil.rmtree(draw_dir(cfg.out, 3))  # a new session: draw 3's folder is gone
    swept.clear()
    draws.run_draws(cfg)
    assert swept == [5, 8]  # draw 3 is not rerun
    again = json.loads((tmp_path / "effect" / "headline.json").read_text())
    assert again["arms"] == first["arms"] and again["paired"] == first["paired"] and again["memorization"] == first["memorization"]
    assert again["from_record"] == sorted(f"draw-3/seg/{n}" for n in everything) and again["draw_commits"]["3"] == ["sha3"]
    assert len(json.loads(record.read_text())["runs"]) == 16  # rewritten, not duplicated

    # One arm's settings changed: only that arm's recorded runs stop counting (and draw 3 is rerun).
    longer = load_sweep_config(DEMO, sets + ["studies.arms.arms.longer.set={train.steps: 1300}"])
    result = collect(longer)
    assert result["arms"]["longer"]["per_draw"][0] is None and result["arms"]["fixed"]["per_draw"][0] == [33.0, 34.0]
    assert draws.in_record_only(longer, 3) is False and draws.in_record_only(cfg, 3) is True
    # What made the data changed (the ControlNet's steps): no recorded run of the draw counts.
    retrained = load_sweep_config(DEMO, sets + ["controlnet.train.steps=77"])
    assert all(arm["per_draw"][0] is None for arm in collect(retrained)["arms"].values())
    assert collect(retrained)["memorization"]["3"] == {} and collect(longer)["memorization"]["3"] == first["memorization"]["3"]

    # Draw 3 made again in a new folder (other data, one run finished so far): the folder is the
    # draw, so the record's runs of the earlier making do not mix in until their inputs match.
    _fake_draw(cfg, 3, {"arm-real-seed0": 50.0})
    (draw_dir(cfg.out, 3) / "real" / "manifest.parquet").write_bytes(b"real 3, made again")
    (draw_dir(cfg.out, 3) / "seg" / "arm-real-seed0" / "identity.json").unlink()
    sub = draw_config(cfg, 3)
    run = next(r for r in plan_seg_runs(sub) if r.name == "arm-real-seed0")
    real3 = draw_dir(cfg.out, 3) / "real" / "manifest.parquet"
    seg_identity(sub, run, {"real": file_digest(real3)})[1].save(draw_dir(cfg.out, 3) / "seg" / run.name)
    remade = collect(cfg)
    assert remade["arms"]["real"]["per_draw"][0] == [50.0, None] and remade["arms"]["fixed"]["per_draw"][0] is None
    assert remade["from_record"] == [] and draws.in_record_only(cfg, 3) is False
    # The same data as recorded (the first making's folder back, a run's summary not yet written): the record counts.
    shutil.rmtree(draw_dir(cfg.out, 3))
    _fake_draw(cfg, 3, {k: v for k, v in everything.items() if k != "arm-fixed-seed0"})
    same = collect(cfg)
    assert same["arms"] == first["arms"] and same["from_record"] == ["draw-3/seg/arm-fixed-seed0"]


def test_a_broken_record_is_refused_before_any_draw_runs(tmp_path):
    (tmp_path / "record.json").write_text("{not json")
    for record, match in ((tmp_path / "record.json", "is not a run record"), (tmp_path / "no" / "r.json", "does not exist")):
        cfg = load_sweep_config(DEMO, ARMS + [f"out={tmp_path}", f"draws.record={json.dumps(str(record))}"])
        with pytest.raises(BadInputError, match=match):
            check_draws_config(cfg)


def test_a_smoke_run_records_nothing():
    from experiments.sweep import FAST_OVERLAY

    headline = REPO / "configs" / "sweeps" / "headline.yaml"
    assert load_sweep_config(headline).draws.record == "docs/results/headline-runs.json"
    grid = ["grid.w=[2.0]", "grid.lambdas=[0.4, 0.6, 0.8, 1.0]"]  # as the end-to-end test: fast's grid lacks the arms' λ
    assert load_sweep_config(headline, grid, [FAST_OVERLAY]).draws.record is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_headline_protocol_end_to_end_on_a_smoke_budget(tmp_path):
    """The shipped protocol (configs/sweeps/headline.yaml) at a smoke budget: two draws, each
    its own subset, ControlNet, cells and every arm; headline.json pairs them; a rerun reuses all."""
    import os
    import subprocess
    import sys

    out = tmp_path / "effect"
    sets = ["source.procedural.num_test=12", "subset=0.5"]
    argv = [sys.executable, "-m", "jobs.sweep", "--config", "configs/sweeps/headline.yaml", "--fast", "--out", str(out),
            "--set", "grid.w=[2.0]", "--set", "grid.lambdas=[0.4, 0.6, 0.8, 1.0]", "--set", "grid.samples_per_source={1.0: 2}",
            "--set", "generate.plan.samples_per_source=1", "--set", "generate.plan.max_sources=null",
            "--set", "studies.arms.seeds=[0]", "--set", "draws.seeds=[1, 2]", "--set", "judge.enabled=false",
            # the lever arm at a threshold a smoke-budget scorer's scores pass (its 0.8 could drop them all)
            "--set", 'studies.arms.arms.levers.set={"data.min_label_score": 0.01, "scheme.synth_fraction": 0.25}',
            *[a for s in sets for a in ("--set", f"ingest.{s}")]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = json.loads((out / "headline.json").read_text())
    assert result["split"] == "test" and result["draws"] == [1, 2] and result["stale"] == []
    assert set(result["arms"]) == {"real", "real_classical", "fixed", "uniform", "adaptive", "mismatched", "levers"}
    for name, arm in result["arms"].items():
        assert [len(d) for d in arm["per_draw"]] == [1, 1] and all(0 <= d[0] <= 100 for d in arm["per_draw"]), name
    baseline = result["baseline"]
    fixed = result["paired"]["fixed"]
    diffs = [a[0] - b[0] for a, b in zip(result["arms"]["fixed"]["per_draw"], result["arms"][baseline]["per_draw"])]
    assert fixed["n_draws"] == 2 and fixed["per_draw"] == pytest.approx(diffs, abs=1e-3) and len(fixed["ci95"]) == 2
    assert "## The headline" in (out / "headline.md").read_text()
    # Each draw is its own subset: 12 of 24 train scenes, drawn by its seed; test whole in both.
    import pyarrow.parquet as pq

    kept = [{s for s, sp in zip(*pq.read_table(out / f"draw-{d}" / "real" / "manifest.parquet", columns=["source_id", "split"])
                                   .to_pydict().values()) if sp == "train"} for d in (1, 2)]
    assert len(kept[0]) == len(kept[1]) == 12 and kept[0] != kept[1]
    summary = json.loads((out / "draw-1" / "seg" / "arm-uniform-seed0" / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["val_samples"] == 12
    assert summary["synthetic_samples"] == {"0.4": 12, "0.6": 12, "0.8": 12, "1.0": 24}  # all: under the cap of 4 a scene
    assert json.loads((out / "draw-1" / "seg" / "arm-fixed-seed0" / "summary.json").read_text())["synthetic_samples"] == {"1.0": 24}
    levers = json.loads((out / "draw-1" / "seg" / "arm-levers-seed0" / "summary.json").read_text())
    assert levers["min_label_score"] == 0.01 and 0 < levers["synthetic_samples"]["1.0"] <= 24
    assert (out / "draw-1" / "synthetic" / "w2p00-l1p00" / "label_scored.parquet").is_file()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert again.returncode == 0 and again.stdout.count("(reused, mIoU") == 14 and json.loads((out / "headline.json").read_text())["arms"] == result["arms"]


def test_only_named_draws_run_while_the_summary_covers_every_draw(tmp_path, monkeypatch, capsys):
    """--draws 5 runs draw 5 alone; the summary still holds draw 3 as its folder stands (a
    narrowed draws.seeds would drop it). Seeds outside draws.seeds, or --draws on a config
    without draws, are named as bad input."""
    from experiments import cli, draws

    cfg = load_sweep_config(DEMO, ARMS + [f"out={tmp_path}"])
    _fake_draw(cfg, 3, {f"arm-{a}-seed{k}": 30.0 + k for a in ("real", "longer", "fixed", "uniform") for k in (0, 1)})
    swept: list[int] = []
    monkeypatch.setattr(draws, "run_sweep", lambda sub: swept.append(sub.ingest.subset_seed))
    draws.run_draws(cfg, only=[5])
    assert swept == [5]
    result = json.loads((tmp_path / "headline.json").read_text())
    assert result["arms"]["real"]["per_draw"] == [[30.0, 31.0], None, None]
    with pytest.raises(BadInputError, match=r"--draws 4 7.*not among"):
        draws.run_draws(cfg, only=[5, 4, 7])
    assert cli.main(["--config", str(DEMO), "--draws", "5"]) == 2 and "has no draws.seeds" in capsys.readouterr().err


def test_a_record_made_elsewhere_is_merged_entry_by_entry(tmp_path, capsys):
    from experiments.run_record import RunRecord, main

    def entry(key: str, miou: float) -> dict:
        return {"key": key, "draw": int(key.split("/")[0][5:]), "seg": "s", "upstream": "u", "miou": miou}

    ours, device = tmp_path / "ours.json", tmp_path / "device.json"
    RunRecord(str(ours), [entry("draw-1/seg/a", 1.0), entry("draw-2/seg/a", 2.0)]).add([], [])
    RunRecord(str(device), [entry("draw-1/seg/a", 1.0), entry("draw-3/seg/a", 3.0)]).add([], [])  # a copy taken before draw 2
    assert main([str(device), "--into", str(ours)]) == 0 and "2 -> 3 runs" in capsys.readouterr().out
    assert [e["miou"] for e in RunRecord.load(ours).runs] == [1.0, 2.0, 3.0]  # draw 2 kept, draw 3 added
    assert main([str(tmp_path / "none.json"), "--into", str(ours)]) == 2 and "no such record" in capsys.readouterr().out
