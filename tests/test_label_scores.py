"""The label-consistency filter (issue 23, item 8): per-sample scores against the own scribble,
written into the manifest, read by seg's ``data.min_label_score``, run by the sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments.sweep as sweep
import seg.label_scores as label_scores
from engine.config import from_dict
from engine.errors import BadInputError
from engine.identity import file_digest
from engine.manifest import LABEL_SCORE, annotate, iter_samples, read_manifest
from engine.shards import UNLABELLED
from experiments.sweep import REPO, SweepConfig, load_sweep_config, plan_seg_runs, run_inputs, stage_label_scores
from seg.label_scores import scribble_miou
from seg.stream import index_manifests
from seg_fixtures import CLASS_NAMES, make_real, make_scene, make_synthetic
from test_sweep import DEMO, SOURCES, _cell


def reference_miou(pred: np.ndarray, scribble: np.ndarray, k: int) -> float:
    """Plain loops: IoU per class over the scribbled pixels, mean over classes in either."""
    keep = scribble != UNLABELLED
    p, t = pred[keep], scribble[keep]
    ious = [((p == c) & (t == c)).sum() / ((p == c) | (t == c)).sum() for c in range(k) if ((p == c) | (t == c)).any()]
    return float(np.mean(ious)) if ious else float("nan")


def test_scribble_miou_matches_a_loop_reference():
    rng = np.random.default_rng(0)
    scribble = np.full((5, 12, 12), UNLABELLED, np.uint8)
    scribble[:, 3, :] = rng.integers(0, 4, (5, 12))
    scribble[:, :, 7] = rng.integers(0, 2, (5, 12))
    scribble[4] = UNLABELLED  # no stroke at all: no score
    pred = rng.integers(0, 4, (5, 12, 12)).astype(np.uint8)
    pred[1] = np.where(scribble[1] == UNLABELLED, 3, scribble[1])  # perfect on the strokes, wrong elsewhere
    got = scribble_miou(pred, scribble, 4)
    expected = [reference_miou(pred[i], scribble[i], 4) for i in range(5)]
    np.testing.assert_allclose(got[:4], expected[:4], rtol=1e-6)
    assert got[1] == 1.0 and np.isnan(got[4]) and np.isnan(expected[4])


def test_annotate_in_place_and_as_a_copy_elsewhere(tmp_path):
    manifest = make_synthetic(tmp_path, lambdas=(0.5,), n_train=6)
    keys = read_manifest(manifest)[0].column("key").to_pylist()
    values = {k: i / 10 for i, k in enumerate(keys[:4])}
    copy = annotate(manifest, LABEL_SCORE, values, tmp_path / "elsewhere" / "scored.parquet", {"by": "test"})
    table, info = read_manifest(copy)
    assert table.column(LABEL_SCORE).to_pylist() == [values.get(k) for k in keys]
    assert info.extra[LABEL_SCORE] == {"by": "test"} and info.class_names == CLASS_NAMES
    assert [s.key for _, s in iter_samples(copy)] == [s.key for _, s in iter_samples(manifest)]  # shards still resolve
    assert LABEL_SCORE not in read_manifest(manifest)[0].column_names  # the original is untouched
    annotate(manifest, LABEL_SCORE, {keys[0]: 0.9})  # in place; a second score replaces the first
    annotate(manifest, LABEL_SCORE, {keys[0]: 0.3})
    assert read_manifest(manifest)[0].column(LABEL_SCORE).to_pylist() == [0.3] + [None] * (len(keys) - 1)
    assert sorted(p.name for p in manifest.parent.iterdir() if p.suffix == ".parquet") == ["manifest.parquet"]
    with pytest.raises(BadInputError, match="manifest's own columns"):
        annotate(manifest, "lambda", {})


def test_min_label_score_keeps_the_samples_that_reach_it(tmp_path):
    real = make_real(tmp_path, n_train=6, n_val=2)
    synth = make_synthetic(tmp_path, lambdas=(0.5, 1.0), n_train=6)
    keys = read_manifest(synth)[0].column("key").to_pylist()
    scores = {k: (i % 4) / 4 for i, k in enumerate(keys)}  # 0, .25, .5, .75, ...
    scores[keys[0]] = float("nan")  # a scribble without a stroke: nothing to disagree with, kept
    annotate(synth, LABEL_SCORE, scores)
    kept = lambda index: {k for g in index.synthetic.values() for keys in g.allowed.values() for k in keys}  # noqa: E731
    assert kept(index_manifests([real, synth])) == set(keys)
    assert kept(index_manifests([real, synth], min_label_score=0.5)) == {k for k, v in scores.items() if not v < 0.5}
    assert keys[0] in kept(index_manifests([real, synth], min_label_score=0.5))
    annotate(synth, LABEL_SCORE, scores | {keys[0]: 0.0})
    with pytest.raises(BadInputError, match=r"min_label_score=0.99: drops every synthetic sample \(12\)"):
        index_manifests([real, synth], min_label_score=0.99)
    assert len(index_manifests([real, synth], min_label_score=0.5).real) == 6  # real samples are never filtered
    bare = make_synthetic(tmp_path, lambdas=(1.0,), n_train=6, folder="bare")
    with pytest.raises(BadInputError, match="needs the 'label_score' column.*6 synthetic"):
        index_manifests([real, bare], min_label_score=0.5)
    assert index_manifests([real, bare]).synthetic  # without a threshold the column is not needed


def _checkpoint(path: Path, net: torch.nn.Module) -> Path:
    from seg.models import ModelConfig

    cfg = {"model": {**vars(ModelConfig(width=4, aspp_channels=8))}}
    torch.save({"model": net.state_dict(), "config": cfg, "class_names": CLASS_NAMES}, path)
    return path


def test_cli_scores_with_a_seg_checkpoint_and_refuses_bad_input(tmp_path, capsys):
    from seg.models import ModelConfig, build_model

    synth = make_synthetic(tmp_path, lambdas=(1.0,), n_train=5)
    torch.manual_seed(0)
    net = build_model(ModelConfig(width=4, aspp_channels=8), len(CLASS_NAMES)).eval()
    ckpt = _checkpoint(tmp_path / "last.pt", net)
    assert label_scores.main(["--checkpoint", str(ckpt), "--manifest", str(synth)]) == 0
    table, info = read_manifest(synth.with_name("label_scored.parquet"))  # by default a copy beside the manifest
    assert LABEL_SCORE not in read_manifest(synth)[0].column_names
    samples = [s for _, s in iter_samples(synth)]
    pred = label_scores.predict(net, np.stack([s.image for s in samples]))
    expected = scribble_miou(pred, np.stack([s.scribble for s in samples]), len(CLASS_NAMES))
    got = dict(zip(table.column("key").to_pylist(), table.column(LABEL_SCORE).to_pylist()))
    np.testing.assert_allclose([got[s.key] for s in samples], expected, rtol=1e-6)
    assert info.extra[LABEL_SCORE]["metric"] == "scribble_miou" and info.extra[LABEL_SCORE]["scorer_digest"] == file_digest(ckpt)
    assert label_scores.main(["--checkpoint", str(ckpt), "--manifest", str(synth), "--in-place"]) == 0
    assert read_manifest(synth)[0].column(LABEL_SCORE).to_pylist() == table.column(LABEL_SCORE).to_pylist()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        label_scores.main(["--checkpoint", str(ckpt), "--manifest", str(synth), "--in-place", "--out", "x.parquet"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert label_scores.main(["--checkpoint", str(ckpt), "--manifest", str(synth), str(synth), "--out", "x.parquet"]) == 2
    assert "score one manifest per --out" in capsys.readouterr().err
    assert label_scores.main(["--checkpoint", str(tmp_path / "nope.pt"), "--manifest", str(synth)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


# -- in the sweep ----------------------------------------------------------------------------------
FILTERED_ARMS = ["studies.arms.enabled=true", "studies.arms.w=2.0", "grid.w=[2.0]", "grid.lambdas=[1.0]",
                 'studies.arms.arms={"real": {"scheme": "real"}, "filtered": {"scheme": "fixed", "lambdas": [1.0], '
                 '"set": {"data.min_label_score": 0.5}}}']


def test_a_filtering_arm_needs_the_stage_and_every_train_scribble():
    with pytest.raises(BadInputError, match="filtered-seed0.*label_scores.enabled"):
        load_sweep_config(DEMO, FILTERED_ARMS)
    with pytest.raises(BadInputError, match="arm-filtered-seed0: data.real_fraction=0.5.*learns from every scribble"):
        load_sweep_config(DEMO, FILTERED_ARMS + ["label_scores.enabled=true", "seg.data.real_fraction=0.5"])
    with pytest.raises(BadInputError, match="label_scores.steps/batch_size=0/32"):
        load_sweep_config(DEMO, FILTERED_ARMS + ["label_scores.enabled=true", "label_scores.steps=0"])


def test_a_filtering_run_reads_the_scored_copy_and_names_the_cell_and_the_scorer(tmp_path):
    """The scored copy is a derived file: scoring it again must not retrain finished runs, while
    a regenerated cell or another scorer must."""
    real = make_real(tmp_path, n_train=6, n_val=2)
    cell = make_synthetic(tmp_path, lambdas=(1.0,), n_train=6, folder="synthetic/w2p00-l1p00")
    cells = {"w2p00-l1p00": cell}
    cfg = load_sweep_config(DEMO, FILTERED_ARMS + ["label_scores.enabled=true"])
    runs = {r.name: r for r in plan_seg_runs(cfg)}
    filtered, plain_run = runs["arm-filtered-seed0"], load_sweep_config(DEMO, FILTERED_ARMS[:-1] + [
        'studies.arms.arms={"real": {"scheme": "real"}, "fixed": {"scheme": "fixed", "lambdas": [1.0]}}'])
    manifests, digests = run_inputs(cfg, filtered, real, cells)
    assert manifests == {"w2p00-l1p00": cell.with_name("label_scored.parquet")}
    fixed = {r.name: r for r in plan_seg_runs(plain_run)}["arm-fixed-seed0"]
    assert run_inputs(plain_run, fixed, real, cells) == ({"w2p00-l1p00": cell}, {"real": file_digest(real), "w2p00-l1p00": file_digest(cell)})
    annotate(cell, LABEL_SCORE, {}, cell.with_name("label_scored.parquet"))  # (re)scored: the same identity
    assert run_inputs(cfg, filtered, real, cells)[1] == digests
    other = load_sweep_config(DEMO, FILTERED_ARMS + ["label_scores.enabled=true", "label_scores.steps=301"])
    assert run_inputs(other, filtered, real, cells)[1]["w2p00-l1p00"] != digests["w2p00-l1p00"]
    make_synthetic(tmp_path, lambdas=(1.0,), n_train=5, folder="synthetic/w2p00-l1p00")  # generated again
    assert run_inputs(cfg, filtered, real, cells)[1]["w2p00-l1p00"] != digests["w2p00-l1p00"]


def test_an_arm_set_to_null_is_dropped():
    cfg = load_sweep_config(REPO / "configs" / "sweeps" / "levers-val.yaml")
    assert set(cfg.studies.arms.arms) == {"val_classical", "val_fixed", "val_fixed_s50", "val_fixed_s80", "val_fixed_share25",
                                              "val_fixed_s80_share25", "val_fixed_share10"}
    assert cfg.studies.arms.baseline == "val_classical" and cfg.seg.data.val_split == "val"
    assert "real" in load_sweep_config(REPO / "configs" / "sweeps" / "headline.yaml").studies.arms.arms


def test_label_scores_stage_scores_every_cell_against_its_own_scribble(tmp_path, monkeypatch):
    """A scorer that reads the mask off the image (the cells draw it in grey): on the scribbled
    pixels it agrees with each sample's own scribble; scored copies sit beside the cells, cached."""
    real = make_real(tmp_path, n_train=SOURCES, n_val=2, per_shard=4, size=16)
    cells = {"a": _cell(tmp_path / "a", 0.5, "fa"), "b": _cell(tmp_path / "b", 1.0, "fb")}
    cfg = from_dict(SweepConfig, {"label_scores": {"enabled": True, "steps": 2, "batch_size": 4},
                                  "seg": {"model": {"width": 4, "aspp_channels": 8}}})
    trained = []
    real_train = sweep.train_judge
    monkeypatch.setattr(sweep, "train_judge", lambda images, labels, *a: trained.append(labels) or real_train(images, labels, *a))
    monkeypatch.setattr(label_scores, "predict", lambda net, images, batch_size=64: images[..., 0] // 40)
    info: dict = {}
    cache = stage_label_scores(cfg, tmp_path, real, cells, info)
    scribbles = np.stack([make_scene(i, "train", 16).scribble for i in range(SOURCES)])
    assert np.array_equal(trained[0], scribbles)  # trained on the scribbles, never on a mask
    for name, manifest in cells.items():
        scored = manifest.with_name("label_scored.parquet")
        assert read_manifest(scored)[0].column(LABEL_SCORE).to_pylist() == [1.0] * 2 * SOURCES
        assert cache["cells"][name]["samples"] == 2 * SOURCES and cache["cells"][name]["median"] == 1.0
    assert info["images"] == 4 * SOURCES and json.loads((tmp_path / sweep.LABEL_SCORES_FILE).read_text()) == cache
    info = {}
    assert stage_label_scores(cfg, tmp_path, real, cells, info) == cache and len(trained) == 1  # reused
    assert info["cells_reused"] == 2
    cells["b"].with_name("label_scored.parquet").unlink()  # a lost copy is made again
    stage_label_scores(cfg, tmp_path, real, cells, info)
    assert len(trained) == 2 and cells["b"].with_name("label_scored.parquet").is_file() and info["cells_reused"] == 1


def test_seg_train_trains_on_the_kept_samples_only(tmp_path, capsys):
    import seg.train as seg_train
    from test_seg_train import FAST

    real = make_real(tmp_path, n_train=6, n_val=2)
    synth = make_synthetic(tmp_path, lambdas=(0.3, 0.6), n_train=6)
    keys = read_manifest(synth)[0].column("key").to_pylist()
    annotate(synth, LABEL_SCORE, {k: float("l0p30" in k) for k in keys})  # every λ = 0.3 sample agrees, no 0.6 one
    out = tmp_path / "run"
    argv = ["--shards", str(real), str(synth), "--scheme", "uniform", "--out", str(out), *FAST, "--set", "train.steps=2"]
    assert seg_train.main([*argv, "--set", "data.min_label_score=0.5"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic_samples"] == {"0.3": 6} and summary["min_label_score"] == 0.5
    assert seg_train.main([*argv[:6], str(tmp_path / "bad"), *FAST, "--set", "data.min_label_score=1.5"]) == 2
    assert "data.min_label_score=1.5: must be in [0, 1]" in capsys.readouterr().err
