"""The pretrained tiny base (the embedded default's SD 1.5): pretraining job, bundle, shipped copy."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cn_fixtures import MICRO, write_real_shards

from engine.config import from_dict
from engine.data.procedural import CLASS_NAMES
from engine.errors import BadInputError
from engine.models import BASE_FILE, BUILTIN, BUILTIN_BASE, ScribbleGenModel, from_base, weights_digest
from engine.pretrain_base import PretrainBaseConfig, batch_indices, captions, main, pretrain
from engine.train_controlnet import TrainControlNetConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out: Path, steps: int = 4, **train) -> PretrainBaseConfig:
    return from_dict(PretrainBaseConfig, {
        "model": {k: v for k, v in vars(replace(MICRO, beta_schedule="squaredcos_cap_v2",
                                                    prediction_type="v_prediction")).items()},
        "resolution": 16, "export_dtype": "float32",
        "corpus": {"num_images": 24, "size": 16, "workers": 1},
        "train": {"steps": steps, "batch_size": 4, "save_every": 2, "log_every": 1, "warmup_steps": 1,
                  "cooldown_steps": 1, "threads": 1, "device": "cpu", **train},
        "out": str(out),
    })


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_pretrain_writes_a_bundle_with_provenance_and_loss_curve(tmp_path):
    final = pretrain(_cfg(tmp_path / "run"), progress=False, command="python -m jobs.pretrain_base --x")
    meta = json.loads((final / BASE_FILE).read_text())
    assert meta["steps"] == 4 and meta["command"] == "python -m jobs.pretrain_base --x"
    assert meta["class_names"] == CLASS_NAMES and meta["config"]["corpus"]["num_images"] == 24
    assert meta["weights_sha256"] == weights_digest(final, length=64) and len(meta["weights_sha256"]) == 64
    log = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    from PIL import Image

    with Image.open(tmp_path / "run" / "samples.png") as grid:  # 8 val scenes x (source + 3 λ), 4x zoom
        assert grid.size == (4 * 16 * 4, 8 * 16 * 4)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_resume_after_a_stop_gives_the_same_weights_as_one_run(tmp_path):
    straight = pretrain(_cfg(tmp_path / "a"), progress=False)
    pretrain(_cfg(tmp_path / "b", steps=2), progress=False)
    resumed = pretrain(_cfg(tmp_path / "b"), resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(BadInputError, match="already holds"):
        pretrain(_cfg(tmp_path / "a"), progress=False)


def test_lr_warms_up_holds_then_cools_down_and_extending_a_run_keeps_its_past():
    from engine.pretrain_base import BaseTrainSection, lr_at

    tc = BaseTrainSection(steps=2500, lr=1e-3, warmup_steps=100, cooldown_steps=500)
    assert lr_at(0, tc) == pytest.approx(1e-5) and lr_at(99, tc) == pytest.approx(1e-3)
    assert lr_at(1999, tc) == pytest.approx(1e-3) and lr_at(2250, tc) == pytest.approx(0.5e-3)
    assert lr_at(2499, tc) == pytest.approx(1e-3 / 500)
    longer = replace(tc, steps=6000)  # a run started for 6000 steps and stopped at 2500 via --resume
    assert all(lr_at(s, longer) == lr_at(s, tc) for s in range(0, 2000, 7))


def test_batches_cover_the_corpus_each_epoch_and_captions_name_present_classes():
    seen = [i for s in range(6) for i in batch_indices(s, 4, 24, seed=0)]
    assert sorted(seen) == list(range(24))  # 6 steps x 4 = one epoch, each image once
    assert batch_indices(3, 4, 24, 0) == batch_indices(3, 4, 24, 0) != batch_indices(3, 4, 24, 1)
    assert captions(np.array([0b0110, 0])) == [["disc", "square"], []]


def test_controlnet_on_a_base_starts_as_the_base_and_trains_only_the_controlnet(tmp_path):
    base = pretrain(_cfg(tmp_path / "base", steps=2), progress=False)
    model = from_base(base, "tiny", CLASS_NAMES, 16, (8,), seed=0)
    # Zero convolutions: before training the ControlNet adds nothing to the base's output.
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    text = model.text.encode([["disc"], []])
    with torch.no_grad():
        plain = model.unet(z, t, encoder_hidden_states=text).sample
        controlled = model.predict(z, t, model.hint(np.full((2, 16, 16), 1, np.uint8)), text)
    torch.testing.assert_close(controlled, plain)
    assert model.null_hint.std() > 0.5  # randn, as in the paper's code (zeros = an empty scribble)

    manifest = write_real_shards(tmp_path / "real", size=16)
    cfg = from_dict(TrainControlNetConfig, {
        "model": {"kind": "tiny", "pretrained": str(base), "resolution": 16, "tiny": {"conditioning_channels": 8}},
        "data": {"manifest": str(manifest)},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "threads": 1, "device": "cpu",
                  "train_denoiser": False, "lr": 0.01},
        "out": str(tmp_path / "cn"),
    })
    trained = ScribbleGenModel.from_pretrained(train(cfg, progress=False))
    before = _weights(base)
    after = {f"unet/{k}": v for k, v in trained.unet.state_dict().items()}
    assert all(torch.equal(before[k].float(), after[k]) for k in after)  # the denoiser is locked
    assert any(p.abs().sum() > 0 for p in trained.controlnet.controlnet_down_blocks.parameters())


def test_a_base_for_other_classes_is_refused(tmp_path):
    base = pretrain(_cfg(tmp_path / "base", steps=1), progress=False)
    with pytest.raises(BadInputError, match="knows classes"):
        from_base(base, "tiny", ["background", "cat"], 16, (8,))
    with pytest.raises(BadInputError, match="not found"):
        from_base(tmp_path / "nope", "tiny", CLASS_NAMES, 16, (8,))


def test_cli_bad_config_value_is_one_line(tmp_path, capsys):
    assert main(["--set", "export_dtype=int8", "--set", f"out={tmp_path}"]) == 2
    assert "export_dtype" in capsys.readouterr().err


# -- the shipped bundle ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((BUILTIN_BASE / BASE_FILE).read_text())


def test_shipped_base_matches_its_recorded_digest_size_and_config(shipped):
    assert shipped["weights_sha256"] == weights_digest(BUILTIN_BASE, length=64)
    size = sum(p.stat().st_size for p in BUILTIN_BASE.rglob("*") if p.is_file())
    assert size <= 10 * 2**20, f"{size / 2**20:.1f} MB > 10 MB"
    default = yaml.safe_load((ROOT / "configs/base/tiny.yaml").read_text())
    assert shipped["config"]["model"] == default["model"]  # made with the default architecture
    assert shipped["command"].startswith("python -m jobs.pretrain_base") and shipped["steps"] >= 1000
    assert shipped["config"]["train"]["steps"] == shipped["steps"]


def test_shipped_base_loads_through_from_pretrained_and_makes_a_controlnet(shipped):
    model = from_base(BUILTIN, "tiny", CLASS_NAMES, 32, (16,))
    assert model.unet.dtype == torch.float32 and model.resolution == 32
    assert model.scheduler_config["beta_schedule"] == shipped["config"]["model"]["beta_schedule"]


def _cosine_snr(t: int, s: float = 0.008, steps: int = 1000) -> float:
    """SNR at timestep t of the cosine schedule (Nichol & Dhariwal 2021), betas capped at 0.999."""
    f = lambda i: math.cos((i / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = 1.0
    for i in range(t + 1):
        ab *= 1 - min(1 - f(i + 1) / f(i), 0.999)
    return ab / (1 - ab)


@pytest.mark.parametrize("lam, snr", [(0.4, 1.837), (0.7, 0.2549), (1.0, 0.0)])
def test_shipped_schedule_pins_the_snr_at_each_encode_ratio(lam, snr):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(BUILTIN_BASE / "scheduler")
    ac = float(sched.alphas_cumprod[math.floor(999 * lam)].double())
    assert ac / (1 - ac) == pytest.approx(_cosine_snr(math.floor(999 * lam)), rel=1e-4, abs=1e-6)
    assert ac / (1 - ac) == pytest.approx(snr, rel=2e-3, abs=1e-6)


def test_tiny_arch_defaults_are_the_shipped_base_architecture():
    """A from-scratch tiny model (model.pretrained: null) is the same network as the base."""
    from dataclasses import asdict

    from engine.config import load_yaml
    from engine.models import TinyArch

    base = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "base" / "tiny.yaml")["model"]
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(TinyArch()).items()}
    assert defaults == base




def test_time_box_fixes_the_step_count_once_and_equals_the_fixed_step_run(tmp_path):
    # The box's clock reads 0 at the start, 1 after the first (warm-up) step and 5 after the
    # 5th: 1 s a step from then on; 12 s box - 5 s = 7 s, 97 % -> 6 more steps: 11 in all.
    boxed = pretrain(_cfg(tmp_path / "boxed", steps=40, max_minutes=0.2, calibrate_steps=5, cooldown_steps=2),
                     progress=False, clock=lambda c=iter([0.0, 1.0, 5.0]): next(c))
    meta = json.loads((boxed / BASE_FILE).read_text())
    assert meta["steps"] == 11 and meta["config"]["train"]["steps"] == 11
    saved = yaml.safe_load((tmp_path / "boxed" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 11
    log = [json.loads(x) for x in (tmp_path / "boxed" / "loss.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 11 and log[-1]["lr"] == pytest.approx(1e-3 / 2)  # the cool-down ran to its end
    fixed = pretrain(_cfg(tmp_path / "fixed", steps=11, cooldown_steps=2), progress=False)
    a, b = _weights(boxed), _weights(fixed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_time_box_too_short_for_the_cool_down_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="too few for a 20-step cool-down"):
        pretrain(_cfg(tmp_path / "r", steps=40, max_minutes=0.2, calibrate_steps=5, cooldown_steps=20), progress=False,
                 clock=lambda c=iter([0.0, 1.0, 5.0]): next(c))
