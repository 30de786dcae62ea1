"""ControlNet training: runs end to end, exact resume, dropout, freezing, CLI errors."""

import json

import numpy as np
import pytest
import torch
from cn_fixtures import MICRO, write_real_shards

from engine.config import from_dict, to_dict
from engine.errors import BadInputError
from engine.models import ScribbleGenModel
from engine.sampler import ScribbleSampler
from engine.train_controlnet import (
    TrainControlNetConfig, apply_dropout, dropout_mask, main, train,
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_real_shards(tmp_path_factory.mktemp("real"))


def micro_config(manifest, out, **train) -> TrainControlNetConfig:
    """A micro ControlNet run on ``manifest`` (MICRO arch at 16 px, 4 steps of 4 samples, one
    thread); ``train`` overrides keys of the train section (tests/test_distributed.py too)."""
    base = {
        "model": {"kind": "tiny", "resolution": 16, "tiny": {k: v for k, v in vars(MICRO).items()}},
        "data": {"manifest": str(manifest)},
        "train": {"steps": 4, "batch_size": 4, "save_every": 2, "log_every": 1, "warmup_steps": 1,
                  "threads": 1, "device": "cpu", **train},
        "out": str(out),
    }
    return from_dict(TrainControlNetConfig, base)


def test_train_saves_loadable_model_log_and_checkpoints(manifest, tmp_path):
    final = train(micro_config(manifest, tmp_path / "run"), progress=False)
    assert final == tmp_path / "run" / "final"
    log = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.bin"))
    model = ScribbleGenModel.from_pretrained(tmp_path / "run")
    assert model.class_names[1] == "disc" and model.resolution == 16
    assert model.null_hint.abs().sum() > 0  # the null hint was trained
    assert model.uncond == "hint"  # the paper's dropout (hint only) is the default, recorded in the bundle
    assert json.loads((tmp_path / "run" / "final" / "scribblegen.json").read_text())["uncond"] == "hint"
    images = np.zeros((1, 16, 16, 3), np.uint8)
    scribbles = np.full((1, 16, 16), 255, np.uint8)
    out = ScribbleSampler(model, num_steps=2).sample(images, scribbles, [["disc"]], 2.0, 1.0, [0])
    assert out.shape == (1, 16, 16, 3)
    with pytest.raises(BadInputError, match="--resume"):
        train(micro_config(manifest, tmp_path / "run"), progress=False)


def test_resume_is_exact(manifest, tmp_path):
    full = ScribbleGenModel.from_pretrained(train(micro_config(manifest, tmp_path / "a", ema_decay=0.9), progress=False))
    train(micro_config(manifest, tmp_path / "b", steps=2, ema_decay=0.9), progress=False)
    resumed = ScribbleGenModel.from_pretrained(
        train(micro_config(manifest, tmp_path / "b", steps=4, ema_decay=0.9), resume=True, progress=False))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_frozen_denoiser_stays_frozen(manifest, tmp_path):
    from engine.models import build_tiny
    from engine.data.procedural import CLASS_NAMES

    init = build_tiny(MICRO, CLASS_NAMES, 16, seed=0)
    model = ScribbleGenModel.from_pretrained(
        train(micro_config(manifest, tmp_path / "f", steps=2, train_denoiser=False, drop_prompt=True), progress=False))
    assert model.uncond == "hint+prompt"
    for a, b in zip(init.unet.parameters(), model.unet.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(init.text.embed.weight, model.text.embed.weight)
    changed = [not torch.equal(a, b) for a, b in zip(init.controlnet.parameters(), model.controlnet.parameters())]
    assert any(changed)


def test_dropout_rate_and_replacement():
    g = torch.Generator().manual_seed(0)
    rate = torch.cat([dropout_mask(1000, 0.1, g) for _ in range(100)]).float().mean().item()
    assert abs(rate - 0.1) < 0.005
    hint, null_hint = torch.rand(6, 3, 4, 4), torch.rand(6, 3, 4, 4)
    text, null_text = torch.rand(6, 5, 2), torch.rand(6, 5, 2)
    drop = torch.tensor([True, False, True, False, False, False])
    h, t = apply_dropout(hint, text, null_hint, null_text, drop, drop_prompt=True)
    assert torch.equal(h[drop], null_hint[drop]) and torch.equal(h[~drop], hint[~drop])
    assert torch.equal(t[drop], null_text[drop]) and torch.equal(t[~drop], text[~drop])
    _, t2 = apply_dropout(hint, text, null_hint, null_text, drop, drop_prompt=False)
    assert torch.equal(t2, text)


def test_config_round_trip_and_validation(tmp_path):
    cfg = micro_config(tmp_path / "m.parquet", tmp_path / "o")
    assert from_dict(TrainControlNetConfig, to_dict(cfg)) == cfg
    with pytest.raises(BadInputError, match="cond_dropout"):
        micro_config(tmp_path / "m.parquet", tmp_path / "o", cond_dropout=1.5)
    with pytest.raises(BadInputError, match="pretrained"):
        from_dict(TrainControlNetConfig, {"model": {"kind": "sd15"}})


def test_cli_bad_manifest_exits_2(tmp_path, capsys):
    rc = main(["--config", "configs/controlnet/tiny.yaml", "--set", f"data.manifest={tmp_path}/none.parquet",
               "--set", f"out={tmp_path}/o", "--no-progress"])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_shipped_configs_load(name):
    from engine.config import load_config

    over = ["model.pretrained=/x"] if name == "sd15" else []
    cfg = load_config(TrainControlNetConfig, f"configs/controlnet/{name}.yaml", over)
    assert cfg.train.cond_dropout == 0.1


def test_max_minutes_stops_early_and_resume_continues(manifest, tmp_path):
    train(micro_config(manifest, tmp_path / "t", max_minutes=1e-6), progress=False)
    assert [p.name for p in (tmp_path / "t" / "checkpoints").iterdir()] == ["step-00000001"]
    assert (tmp_path / "t" / "final" / "scribblegen.json").is_file()
    train(micro_config(manifest, tmp_path / "t"), resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "t" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_min_snr_weights():
    """Min-SNR-γ: 1 without γ; min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v."""
    from diffusers import DDIMScheduler

    from engine.train_controlnet import loss_weights

    t = torch.tensor([0, 300, 999])
    for pred in ("epsilon", "v_prediction"):
        sched = DDIMScheduler(beta_schedule="linear", prediction_type=pred)
        a = sched.alphas_cumprod[t]
        snr = a / (1 - a)
        assert torch.equal(loss_weights(sched, t, 0.0), torch.ones(3))
        expect = snr.clamp(max=5.0) / (snr + 1 if pred == "v_prediction" else snr)
        torch.testing.assert_close(loss_weights(sched, t, 5.0), expect)
    assert snr[0] > 5 > snr[2]  # both sides of the cap are exercised


def test_v_prediction_trains_to_the_velocity_target(manifest, tmp_path):
    """A v-model learns: its loss on a fixed batch falls, and it saves as a v-model."""
    cfg = micro_config(manifest, tmp_path / "v", steps=30, lr=3e-3, snr_gamma=5.0)
    cfg.model.tiny.prediction_type = "v_prediction"
    cfg.model.tiny.control_init = "random"
    model = ScribbleGenModel.from_pretrained(train(cfg, progress=False))
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    log = [json.loads(x)["loss"] for x in (tmp_path / "v" / "loss.jsonl").read_text().splitlines()]
    assert np.mean(log[-5:]) < 0.7 * np.mean(log[:5])


def test_step_budget_projects_the_steps_a_time_box_allows():
    from engine.train_controlnet import StepBudget

    now = [0.0]
    budget = StepBudget(steps=3000, max_minutes=1.0, clock=lambda: now[0])
    assert budget.total == 3000  # nothing timed yet
    for done in range(1, 4):  # 2 s per step -> 30 steps fit in 60 s
        now[0] = 2.0 * done
        assert not budget.step_done(done)
    assert budget.total == 30
    now[0] = 61.0
    assert budget.step_done(29) and budget.total == 29  # the box ended it: the bar ends full
    untimed = StepBudget(steps=50, max_minutes=0.0, clock=lambda: now[0])
    assert not untimed.step_done(10) and untimed.total == 50


def test_sd15_with_device_auto_never_falls_back_to_cpu_silently(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = from_dict(TrainControlNetConfig, {"model": {"kind": "sd15", "pretrained": str(tmp_path / "sd15")},
                                            "data": {"manifest": str(tmp_path / "m.parquet")}, "out": str(tmp_path / "o")})
    with pytest.raises(BadInputError, match=r"train.device=auto: found no GPU for SD 1.5 .*train.device=cpu to insist"):
        train(cfg, progress=False)
