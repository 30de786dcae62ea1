"""Sweep runner pieces that need no training: config bases, shipped configs, run planning, reuse checks, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import experiments.sweep as sweep
from engine.errors import BadInputError
from engine.manifest import DatasetInfo, sample_row, shard_rows, write_manifest
from engine.shards import Sample, ShardWriter
from experiments.sweep import (
    ADDED_LATER, FAST_OVERLAY, JUDGE_FILE, REPO, RUN_ONLY, SweepConfig, cell_name, load_sweep_config, stage_identity,
    plan_seg_runs, resolve_bases, stage_judge,
)
from engine.config import from_dict, to_dict
from engine.identity import Identity, drop_keys, plain
from engine.memorization import memorization, train_images
from experiments.cli import main
from seg.judge import derangement
from seg_fixtures import CLASS_NAMES, make_real, make_scene
from test_judge import brute_force

DEMO = REPO / "configs" / "demo" / "tiny.yaml"
# What a VOC + SD 1.5 config needs from the user (local weights); nothing is read at load time.
PAPER_SETS = ["controlnet.model.pretrained=/models/sd15", "fid.inception_weights=/models/pt_inception.pth"]


def _yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_bases_merge_recursively(tmp_path):
    _yaml(tmp_path / "job.yaml", {"train": {"steps": 10, "lr": 0.1}, "out": "x"})
    _yaml(tmp_path / "demo.yaml", {"name": "d", "section": {"base": "job.yaml", "train": {"steps": 3}}})
    (tmp_path / "sub").mkdir()
    sweep = _yaml(tmp_path / "sub" / "sweep.yaml", {"base": "../demo.yaml", "name": "s"})
    data = resolve_bases(yaml.safe_load(sweep.read_text()), sweep.parent)
    assert data == {"name": "s", "section": {"train": {"steps": 3, "lr": 0.1}, "out": "x"}}


def test_base_cycle_is_an_error(tmp_path):
    _yaml(tmp_path / "a.yaml", {"base": "b.yaml"})
    _yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(BadInputError, match="includes itself"):
        load_sweep_config(tmp_path / "a.yaml")


def test_demo_config_fast_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names are found in the repo, bases beside the file found
    assert load_sweep_config("configs/demo/tiny.yaml", [], ["configs/demo/fast.yaml"]) == load_sweep_config(DEMO, [], [FAST_OVERLAY])
    cfg = load_sweep_config(DEMO, ["controlnet.train.steps=5", "grid.w=[1.5, 2.0]"], [FAST_OVERLAY])
    assert cfg.controlnet.train.steps == 5  # --set wins over the overlay
    assert cfg.ingest.source.procedural.num_train == 24  # the overlay wins over the config
    assert cfg.controlnet.model.tiny.block_out_channels  # the architecture comes from the job's own config
    assert cfg.grid.w == [1.5, 2.0] and cfg.studies.schemes.w == 2.0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "demo").glob("*.yaml")) + sorted((REPO / "configs" / "sweeps").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load(path, tmp_path):
    if path == FAST_OVERLAY:
        return  # an overlay, not a config (loaded above)
    backbone = tmp_path / "resnet101.pth"  # the ImageNet file the VOC seg config requires (only its presence is checked here)
    backbone.touch()
    cfg = load_sweep_config(path, PAPER_SETS + [f"seg.model.backbone_weights={backbone}"] if "voc" in path.name else [])
    runs = plan_seg_runs(cfg)
    assert runs or path.name == "solvers.yaml", f"{path.name} trains no segmentation model"  # solvers: generation only
    assert cfg.judge.enabled and cfg.judge.steps > 0
    if "voc" in path.name:
        assert cfg.controlnet.model.kind == "sd15" and cfg.ingest.source.kind == "voc"
        assert cfg.generate.sampler.spacing == "paper"


def test_the_low_data_voc_sweep_trains_its_own_controlnet_on_the_split(tmp_path):
    """The paper retrains the ControlNet per low-data split: the 10 % sweep ingests the split (so the
    ControlNet, generation and seg see only it), trains 200 epochs on it, in a folder of its own."""
    backbone = tmp_path / "resnet101.pth"
    backbone.touch()
    sets = PAPER_SETS + [f"seg.model.backbone_weights={backbone}"]
    low = load_sweep_config(REPO / "configs" / "sweeps" / "voc_sd15_10p.yaml", sets)
    full = load_sweep_config(REPO / "configs" / "sweeps" / "voc_sd15_schemes.yaml", sets)
    assert (low.ingest.subset, low.seg.data.real_fraction, low.controlnet.train.epochs) == (0.1, 1.0, 200)
    assert low.out != full.out and low.model_dir is None and low.real_manifest is None
    assert to_dict(low.studies) == to_dict(full.studies) and to_dict(low.controlnet.train) == to_dict(full.controlnet.train)


def test_paper_config_needs_local_weights():
    with pytest.raises(BadInputError, match="pretrained"):
        load_sweep_config(REPO / "configs" / "demo" / "voc_sd15.yaml")


def test_seg_runs_are_named_by_parameters_and_shared():
    cfg = from_dict(SweepConfig, {
        "grid": {"w": [1.5, 2.0], "lambdas": [0.5, 1.0]},
        "studies": {"schemes": {"w": 2.0, "fixed_lambda": 1.0, "seeds": [0, 1]},
                    "w_sweep": {"enabled": True, "lam": 1.0}, "lambda_sweep": {"enabled": True, "w": 2.0}},
    })
    runs = {r.name: r for r in plan_seg_runs(cfg)}
    assert set(runs) == {
        "real-seed0", "real-seed1", "fixed-w2p00-l1p00-seed0", "fixed-w2p00-l1p00-seed1",
        "uniform-w2p00-l0p50_1p00-seed0", "uniform-w2p00-l0p50_1p00-seed1",
        "adaptive-w2p00-l0p50_1p00-seed0", "adaptive-w2p00-l0p50_1p00-seed1",
        "fixed-w1p50-l1p00-seed0", "fixed-w2p00-l0p50-seed0",
    }
    shared = runs["fixed-w2p00-l1p00-seed0"]  # the scheme study's fixed run is also a w and a λ point
    assert shared.studies == ["schemes", "w_sweep", "lambda_sweep"]
    assert runs["real-seed0"].studies == ["schemes", "w_sweep", "lambda_sweep"] and runs["real-seed0"].cells == []
    assert runs["uniform-w2p00-l0p50_1p00-seed1"].cells == [cell_name(2.0, 0.5), cell_name(2.0, 1.0)] == ["w2p00-l0p50", "w2p00-l1p00"]


@pytest.mark.parametrize("sets, match", [
    (["studies.schemes.fixed_lambda=0.3"], "not in the grid"),
    (["studies.schemes.w=9.0"], "not in the grid"),
    (["studies.schemes.names=[real, best]"], "unknown scheme"),
    (["grid.lambdas=[0.5, 1.5]"], "encode ratios"),
    (["grid.w=[2.0, 2.001]"], "collide"),
    (["judge.holdout=1.0"], "holdout"),
    (["seg_gpus_per_run=1.5"], "a share of one GPU"),
    (["seg_gpus_per_run=0"], "a share of one GPU"),
])
def test_bad_sweep_configs(sets, match):
    with pytest.raises(BadInputError, match=match):
        load_sweep_config(DEMO, sets)


def test_reuse_refused_when_config_changed(tmp_path):
    cfg = load_sweep_config(DEMO)
    stage_identity(cfg.seg, RUN_ONLY["seg"], {"real": "abc"}).claim(tmp_path / "seg", "seg run")
    assert stage_identity(cfg.seg, RUN_ONLY["seg"], {"real": "abc"}).claim(tmp_path / "seg", "seg run")  # same: reusable
    cfg.seg.train.steps += 1
    cfg.seg.optim.lr *= 2
    with pytest.raises(BadInputError, match=r"differs in optim\.lr, train\.steps"):
        stage_identity(cfg.seg, RUN_ONLY["seg"], {"real": "abc"}).claim(tmp_path / "seg", "seg run")
    stage_identity(cfg.controlnet, RUN_ONLY["controlnet"], {"real": "abc"}).claim(tmp_path / "cn", "ControlNet")
    cfg.controlnet.train.threads, cfg.controlnet.out = 7, "elsewhere"  # how it runs, not what it computes
    assert stage_identity(cfg.controlnet, RUN_ONLY["controlnet"], {"real": "abc"}).claim(tmp_path / "cn", "ControlNet")
    with pytest.raises(BadInputError, match=r"differs in input:real"):  # the real set changed under it
        stage_identity(cfg.controlnet, RUN_ONLY["controlnet"], {"real": "def"}).claim(tmp_path / "cn", "ControlNet")


@pytest.mark.parametrize("stage", ["controlnet", "seg"])
def test_the_log_section_leaves_recorded_identities_reusable(tmp_path, stage):
    """Runs recorded before the ``log`` section existed (configs without it, RUN_ONLY without
    it) keep their identity, whatever ``log`` says now."""
    cfg = getattr(load_sweep_config(DEMO), stage)
    before = plain(to_dict(cfg))
    del before["log"]  # the config as the code before the section saw it (nor the keys added later)
    Identity(drop_keys(before, (RUN_ONLY[stage] - {"log"}) | ADDED_LATER[type(cfg)]), {"real": "abc"}).save(tmp_path)
    for on in (True, False):
        cfg.log.tensorboard = on
        assert stage_identity(cfg, RUN_ONLY[stage], {"real": "abc"}).claim(tmp_path, stage)


def test_cli_reports_bad_input(capsys):
    assert main(["--config", str(DEMO), "--set", "studies.schemes.fixed_lambda=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert main(["--config", "configs/nope.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


# -- the judge stage --------------------------------------------------------------------------------
SOURCES = 6


def _write_set(folder: Path, samples: list[Sample], kind: str, fingerprint: str | None = None) -> Path:
    with ShardWriter(folder / "set-000000.tar") as writer:
        for sample in samples:
            writer.write(sample)
        info = writer.close()
    rows = shard_rows([sample_row(x) for x in samples], info, folder)
    extra = {"plan": {"fingerprint": fingerprint}} if fingerprint else {}
    return write_manifest(rows, folder / "manifest.parquet", DatasetInfo(CLASS_NAMES, kind, extra))


def _cell(folder: Path, lam: float, fingerprint: str) -> Path:
    """A generated cell whose images spell their source's mask (grey level 40 x class), 2 seeds per source."""
    samples = []
    for i in range(SOURCES):
        real = make_scene(i, "train", 16)
        for seed in (0, 1):
            image = np.repeat(real.mask[..., None] * 40, 3, axis=2).astype(np.uint8)
            meta = {"source_id": real.key, "split": "train", "w": 2.0, "lambda": lam, "seed": seed}
            samples.append(Sample(f"{real.key}__s{seed}", image, real.scribble, None, meta))
    return _write_set(folder, samples, "synthetic", fingerprint)


@pytest.fixture()
def judge_run(tmp_path):
    real = make_real(tmp_path, n_train=SOURCES, n_val=10, per_shard=4, size=16)
    cells = {"a": _cell(tmp_path / "a", 0.5, "fa"), "b": _cell(tmp_path / "b", 1.0, "fb")}
    return tmp_path, real, cells, from_dict(SweepConfig, {"judge": {"steps": 2, "batch_size": 4}})


def test_judge_scores_own_and_mismatched_source_masks(judge_run, monkeypatch):
    """A judge that reads the mask off the image: own agreement is perfect, mismatched is the next source's mask."""
    out, real, cells, cfg = judge_run
    monkeypatch.setattr(sweep, "predict", lambda net, images: images[..., 0] // 40)
    info: dict = {}
    cache = stage_judge(cfg, out, real, cells, info)
    masks = np.stack([make_scene(i, "train", 16).mask for i in range(SOURCES)])
    expected = brute_force(np.repeat(masks, 2, 0), np.repeat(masks[derangement(SOURCES)], 2, 0), len(CLASS_NAMES))
    for name in cells:
        c = cache["cells"][name]
        assert c["samples"] == 2 * SOURCES and c["judge_miou"] == c["fg_iou"] == 1.0
        assert (c["judge_miou_mismatched"], c["pixel_acc_mismatched"], c["fg_iou_mismatched"]) == pytest.approx(expected)
        assert c["judge_margin"] == pytest.approx(1.0 - expected[0])
    assert cache["cells"]["b"]["lambda"] == 1.0 and cache["real"]["samples"] == 2  # 20 % of 10 val images
    assert json.loads((out / JUDGE_FILE).read_text()) == cache and info["images"] == 4 * SOURCES


def test_judge_cache_is_reused_per_cell(judge_run, monkeypatch):
    out, real, cells, cfg = judge_run
    first = stage_judge(cfg, out, real, cells, {})
    trained, scored = [], []
    real_judge, real_score = sweep.judge_on_real, sweep.score_cell
    monkeypatch.setattr(sweep, "judge_on_real", lambda *a: trained.append(1) or real_judge(*a))
    monkeypatch.setattr(sweep, "score_cell", lambda judge, manifest, *a: scored.append(manifest) or real_score(judge, manifest, *a))
    info: dict = {}
    assert stage_judge(cfg, out, real, cells, info) == first and not trained and not scored
    assert info["cells_reused"] == 2
    _cell(out / "b", 1.0, "fb-regenerated")  # a cell generated again: only it is scored again
    again = stage_judge(cfg, out, real, cells, info)
    assert trained == [1] and scored == [cells["b"]] and again["cells"]["a"] == first["cells"]["a"]
    assert again["cells"]["b"]["identity"] != first["cells"]["b"]["identity"]
    assert again["cells"]["b"]["judge_miou"] == first["cells"]["b"]["judge_miou"]  # same judge: deterministic
    cfg.judge.steps = 3  # another judge: every cell again
    stage_judge(cfg, out, real, cells, info)
    assert info["cells_reused"] == 0 and len(scored) == 3


def test_judge_skips_without_masks(judge_run):
    out, _, cells, cfg = judge_run
    scenes = [make_scene(i, split, 16) for split, n in (("train", SOURCES), ("val", 4)) for i in range(n)]
    bare = _write_set(out / "bare", [Sample(s.key, s.image, s.scribble, None, s.meta) for s in scenes], "real")
    info: dict = {}
    stage_judge(cfg, out, bare, cells, info)
    assert "no 'val' images with full masks" in info["skipped"] and not (out / JUDGE_FILE).exists()


def test_memorization_stage_scores_every_cell_and_skips_a_set_too_large_to_hold(judge_run):
    """The cells' images are their sources' masks drawn in grey: the check measures them against the
    real train images exactly as engine.memorization does, per cell, cached; a tiny memory cap skips."""
    out, real, cells, cfg = judge_run
    info: dict = {}
    cache = sweep.stage_memorization(cfg, out, real, cells, info)
    reference = train_images(real)
    for name, manifest in cells.items():
        entry = cache["cells"][name]
        assert {k: entry[k] for k in ("samples", "l1_own", "l1_other", "nearest_is_own")} == pytest.approx(
            {k: v for k, v in memorization(manifest, reference).items() if k in ("samples", "l1_own", "l1_other", "nearest_is_own")})
    assert info["images"] == 4 * SOURCES and json.loads((out / sweep.MEMORIZATION_FILE).read_text()) == cache
    assert sweep.stage_memorization(cfg, out, real, cells, {}) == cache  # reused
    capped = from_dict(SweepConfig, {"memorization": {"max_gib": 1e-9}})
    (out / sweep.MEMORIZATION_FILE).unlink()
    info = {}
    assert sweep.stage_memorization(capped, out, real, cells, info)["cells"] == {}
    assert "memorization.max_gib" in info["skipped"]


def test_the_commit_outside_git_comes_from_the_environment(monkeypatch):
    """A copied tree (a lent device's) has no .git: runs then name the commit they were given."""
    import subprocess

    from experiments import sweep

    def no_git(*args):
        raise subprocess.CalledProcessError(128, ["git", *args])

    monkeypatch.setattr(sweep, "git", no_git)
    monkeypatch.delenv("SCRIBBLEGEN_COMMIT", raising=False)
    assert sweep.git_commit() == "unknown"
    monkeypatch.setenv("SCRIBBLEGEN_COMMIT", "abc123")
    assert sweep.git_commit() == "abc123"


def test_the_null_hint_measurement_changes_only_the_null_hint():
    """Issue 24's fixed-vs-learned null hint on val: the fixed side (null-hint-val.yaml) must be
    draw 2's ControlNet but for train.learn_null_hint, on draw 2's real set, and its seg runs
    the learned side's (replacement-val.yaml, in draw 2's folder) run for run, or the two sides
    measure more than the hint."""
    sweeps = REPO / "configs" / "sweeps"
    fixed, learned = (load_sweep_config(sweeps / f"{name}.yaml") for name in ("null-hint-val", "replacement-val"))
    inputs = {"real": "the same real set"}
    cn = [stage_identity(c.controlnet, RUN_ONLY["controlnet"], inputs) for c in (fixed, learned)]
    assert cn[0].differences(cn[1]) == ["train.learn_null_hint"]
    assert (fixed.controlnet.train.learn_null_hint, learned.controlnet.train.learn_null_hint) == (False, True)
    assert to_dict(fixed.ingest) == to_dict(learned.ingest) and fixed.ingest.subset_seed == 2
    assert to_dict(fixed.generate) == to_dict(learned.generate) and fixed.grid.lambdas == [1.0]
    assert fixed.out != learned.out and fixed.seg.data.val_split == "val" and fixed.draws.record is None
    runs = [{r.name: (r.scheme, r.lambdas, r.overrides) for r in plan_seg_runs(c)} for c in (fixed, learned)]
    assert set(runs[0]) == {"arm-val_classical-seed0", "arm-val_fixed-seed0"}
    assert all(runs[0][name] == runs[1][name] for name in runs[0])
    assert to_dict(fixed.seg) == to_dict(learned.seg)
