"""TensorBoard event files of the trainers: what they hold, off means none, and they change no result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cn_fixtures import MICRO, micro_model, sources, write_real_shards

from engine.config import from_dict
from engine.preview import COUNT, TAG, left_as_found, preview_grid
from engine.tensorboard_log import INSTALL_HINT, TENSORBOARD_DIR, LogConfig, add_record, tensorboard_writer
from engine.train_controlnet import TrainControlNetConfig, train

CN_SCALARS = {"train/loss", "train/lr", "train/dropped", "train/samples", "train/seconds"}


def events(out: Path):
    """The event files of run ``out``, read back as TensorBoard reads them (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_real_shards(tmp_path_factory.mktemp("real"))


def cn_config(manifest: Path, out: Path, tensorboard: bool = True, **train) -> TrainControlNetConfig:
    """A micro ControlNet run (as tests/test_train_controlnet.py): 4 steps, checkpoints at 2 and 4."""
    return from_dict(TrainControlNetConfig, {
        "model": {"kind": "tiny", "resolution": 16, "tiny": dict(vars(MICRO))},
        "data": {"manifest": str(manifest)},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1, "warmup_steps": 1, "threads": 1,
                  "device": "cpu", "ema_decay": 0.9, **train},
        "log": {"tensorboard": tensorboard},
        "out": str(out),
    })


# -- the helper ------------------------------------------------------------------------------------
def test_off_disabled_or_missing_package_gives_no_writer_and_no_files(tmp_path, monkeypatch, capsys):
    with tensorboard_writer(LogConfig(tensorboard=False), tmp_path) as board:
        assert board is None
    with tensorboard_writer(LogConfig(), tmp_path, enabled=False) as board:  # a rank other than 0
        assert board is None
    add_record(None, {"step": 1, "loss": 0.5}, "train")  # no writer: nothing to do
    assert capsys.readouterr().err == ""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with tensorboard_writer(LogConfig(), tmp_path) as board:
        assert board is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not installed" in err and INSTALL_HINT in err and "log.tensorboard=false" in err
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_config_refuses_a_non_boolean_switch():
    from engine.errors import BadInputError

    with pytest.raises(BadInputError, match="log.tensorboard"):
        from_dict(LogConfig, {"tensorboard": "yes"})


def test_a_record_becomes_scalars_named_by_section(tmp_path):
    pytest.importorskip("tensorboard")
    with tensorboard_writer(LogConfig(), tmp_path) as board:
        add_record(board, {"step": 3, "loss": 0.25, "lr": 1e-3, "name": "x", "ok": True, "iou": [0.5]}, "train")
        add_record(board, {"step": 5, "miou": 0.75, "per_class": {"disc": 0.5}}, "eval")
    acc = events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "eval/miou", "eval/per_class/disc"}
    assert scalars(acc, "train/loss") == [(3, 0.25)] and scalars(acc, "eval/miou") == [(5, 0.75)]


# -- ControlNet ------------------------------------------------------------------------------------
def test_controlnet_logs_loss_and_previews_and_trains_exactly_as_without(manifest, tmp_path):
    """Scalars at every logged step, a preview grid at each checkpoint, and the same weights and
    losses, bit for bit, as the same run with TensorBoard off: sampling disturbs nothing."""
    pytest.importorskip("tensorboard")
    on, off = tmp_path / "on", tmp_path / "off"
    train(cn_config(manifest, on), progress=False)
    train(cn_config(manifest, off, tensorboard=False), progress=False)

    acc = events(on)
    assert set(acc.Tags()["scalars"]) == CN_SCALARS
    log = jsonl(on / "loss.jsonl")
    assert scalars(acc, "train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
    assert [s for s, _ in scalars(acc, "train/lr")] == [1, 2, 3, 4]
    assert acc.Tags()["images"] == [TAG]
    images = acc.Images(TAG)
    assert [e.step for e in images] == [2, 4]  # the checkpoints
    assert (images[0].width, images[0].height) == (3 * 128, COUNT * 128)  # source, scribble, sample; 16 px tiles x 8
    assert images[0].encoded_image_string != images[1].encoded_image_string  # the model changed between them

    assert not (off / TENSORBOARD_DIR).exists()
    numbers = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert numbers(jsonl(on / "loss.jsonl")) == numbers(jsonl(off / "loss.jsonl"))
    weights = sorted(p.relative_to(on) for p in on.rglob("*.safetensors"))
    assert weights and weights == sorted(p.relative_to(off) for p in off.rglob("*.safetensors"))
    assert all((on / p).read_bytes() == (off / p).read_bytes() for p in weights)  # checkpoints (optimizer, EMA) and final


def test_controlnet_resume_shows_each_step_once(manifest, tmp_path):
    """A run killed after logging steps 3-4 but before their checkpoint resumes from step 2: the
    event files then hold steps 1-4 once each, with the values and previews of a straight run."""
    pytest.importorskip("tensorboard")
    import shutil

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cn_config(manifest, straight), progress=False)
    train(cn_config(manifest, resumed), progress=False)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")  # as if it died after logging step 4
    shutil.rmtree(resumed / "final")
    train(cn_config(manifest, resumed), resume=True, progress=False)
    a, b = events(straight), events(resumed)
    assert [s for s, _ in scalars(b, "train/loss")] == [1, 2, 3, 4]
    assert scalars(b, "train/loss") == scalars(a, "train/loss")
    assert [e.step for e in b.Images(TAG)] == [2, 4]
    assert [e.encoded_image_string for e in b.Images(TAG)] == [e.encoded_image_string for e in a.Images(TAG)]


def test_a_preview_leaves_rng_modes_and_grad_mode_as_they_were():
    model = micro_model()
    model.uncond = "hint"
    model.train()
    model.unet.eval()  # a frozen part in eval mode, as a trainer may leave it
    modes = [m.training for m in model.modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    images, scribbles, names = sources(2)
    with left_as_found(model, model.device):
        grid = preview_grid(model, list(zip(images, scribbles, names, [None] * 2)))
        torch.rand(3)  # anything inside may draw from the global generator
    assert grid.shape == (2 * 128, 3 * 128, 3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert torch.is_grad_enabled()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


# -- the other trainers ------------------------------------------------------------------------------
def test_seg_logs_train_and_eval_scalars_and_off_writes_none(tmp_path):
    pytest.importorskip("tensorboard")
    from seg.train import main
    from seg_fixtures import make_real

    real = str(make_real(tmp_path / "data"))
    fast = ["--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "augment.crop=32", "--set", "data.workers=0",
            "--set", "train.log_every=2", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
            "--set", "model.width=8", "--set", 'model.backbone_weights=""']
    assert main(["--shards", real, "--scheme", "real", "--out", str(tmp_path / "on"), *fast]) == 0
    assert main(["--shards", real, "--scheme", "real", "--out", str(tmp_path / "off"), *fast,
                 "--set", "log.tensorboard=false"]) == 0
    acc = events(tmp_path / "on")
    entries = jsonl(tmp_path / "on" / "metrics.jsonl")
    assert {"train/loss", "train/lr", "train/synth_share", "eval/miou", "eval/pixel_acc"} <= set(acc.Tags()["scalars"])
    assert scalars(acc, "train/loss") == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in entries if "loss" in e]
    assert scalars(acc, "eval/miou") == [(e["step"], pytest.approx(e["eval"]["miou"], rel=1e-6)) for e in entries if "eval" in e]
    assert [s for s, _ in scalars(acc, "eval/miou")] == [2, 4]
    assert not (tmp_path / "off" / TENSORBOARD_DIR).exists()


def test_base_and_backbone_pretraining_log_their_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from dataclasses import replace

    from engine.pretrain_base import PretrainBaseConfig
    from engine.pretrain_base import pretrain as pretrain_base
    from seg.pretrain_backbone import PretrainBackboneConfig
    from seg.pretrain_backbone import pretrain as pretrain_backbone

    arch = dict(vars(replace(MICRO, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")))
    before = torch.get_num_threads()  # both set their thread count (train.threads)
    pretrain_base(from_dict(PretrainBaseConfig, {
        "model": arch, "resolution": 16, "export_dtype": "float32", "corpus": {"num_images": 8, "size": 16, "workers": 1},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "warmup_steps": 1, "cooldown_steps": 1, "threads": 1,
                  "device": "cpu"},
        "out": str(tmp_path / "base")}), progress=False)
    pretrain_backbone(from_dict(PretrainBackboneConfig, {
        "corpus": {"num_images": 16, "heldout_images": 8, "size": 32}, "augment": {"crop": 32},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "out": str(tmp_path / "backbone")}), progress=False)
    torch.set_num_threads(before)
    for run in ("base", "backbone"):
        log = jsonl(tmp_path / run / "loss.jsonl")
        assert scalars(events(tmp_path / run), "train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
