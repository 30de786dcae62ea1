"""Model bundle: build, save_pretrained -> from_pretrained round trips (tiny and SD-shaped), layout, errors."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from cn_fixtures import CLASSES, MICRO, micro_model, sources, write_sd_stack

from engine.errors import BadInputError
from engine.models import ScribbleGenModel, build_tiny, controlnet_zero_layers, from_stable_diffusion
from engine.text import ClassTokenEncoder, names_for_ids, prompt_for


def _eps(model, images, scribbles, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z0 = model.encode_images(images)
        z = z0 + torch.randn(z0.shape, generator=g)
        t = torch.tensor([500] * len(names))
        return model.predict(z, t, model.hint(scribbles), model.text.encode(names))


def test_prompt_and_names():
    assert prompt_for([]) == "a high-quality, detailed, and professional image"
    assert prompt_for(["cat", "dog"]) == "a high-quality, detailed, and professional image of cat, dog"
    assert names_for_ids([255, 2, 0, 1, 2], CLASSES) == ["disc", "square"]
    with pytest.raises(BadInputError):
        names_for_ids([9], CLASSES)


def test_class_tokens_canonical_and_null():
    enc = ClassTokenEncoder(CLASSES, dim=4, max_tokens=4)
    ids = enc.token_ids([["square", "disc"], ["disc", "square"], []])
    assert ids[0].tolist() == ids[1].tolist() == [3, 1, 2, 4]
    assert ids[2].tolist() == [3, 4, 4, 4]
    assert torch.equal(enc.null(2)[0], enc.embed.weight[4].expand(4, -1))
    with pytest.raises(BadInputError, match="zebra"):
        enc.token_ids([["zebra"]])


def test_tiny_save_load_identical_outputs(tmp_path):
    model = micro_model()
    images, scribbles, names = sources(3)
    ref = _eps(model, images, scribbles, names)
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert files == [
        "controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors", "null_hint.safetensors",
        "scheduler/scheduler_config.json", "scribblegen.json", "text_encoder/config.json",
        "text_encoder/diffusion_pytorch_model.safetensors", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    meta = json.loads((tmp_path / "m" / "scribblegen.json").read_text())
    assert meta["kind"] == "tiny" and meta["class_names"] == CLASSES and meta["resolution"] == 16
    assert meta["model_id"] == model.model_id and model.model_id.startswith("tiny-")
    loaded = ScribbleGenModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.model_id == model.model_id
    assert torch.equal(loaded.null_hint, model.null_hint)
    assert torch.equal(_eps(loaded, images, scribbles, names), ref)
    # Saving again over the same folder is atomic and gives the same content id.
    loaded.save_pretrained(tmp_path / "m")
    assert ScribbleGenModel.from_pretrained(tmp_path / "m").model_id == model.model_id


def test_from_pretrained_accepts_training_run_folder(tmp_path):
    micro_model().save_pretrained(tmp_path / "run" / "final")
    assert ScribbleGenModel.from_pretrained(tmp_path / "run").kind == "tiny"


def test_hint_changes_prediction_and_null_hint_is_used():
    model = micro_model()
    images, scribbles, names = sources(2)
    a = _eps(model, images, scribbles, names)
    b = _eps(model, images, np.full_like(scribbles, 255), names)
    assert (a - b).abs().max() > 1e-4
    assert model.null_hints(2, (16, 16)).shape == (2, 3, 16, 16)
    assert model.null_hints(1, (32, 32)).shape == (1, 3, 32, 32)


def test_bad_folders(tmp_path):
    with pytest.raises(BadInputError, match="scribblegen.json"):
        ScribbleGenModel.from_pretrained(tmp_path)
    micro_model().save_pretrained(tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "controlnet")
    with pytest.raises(BadInputError, match="controlnet"):
        ScribbleGenModel.from_pretrained(tmp_path / "m")
    with pytest.raises(BadInputError, match="not found"):
        from_stable_diffusion(tmp_path / "nowhere", CLASSES)
    with pytest.raises(BadInputError, match="multiple of 2"):
        build_tiny(MICRO, CLASSES, resolution=15)


def test_sd_stack_loads_locally_and_round_trips(tmp_path):
    base = write_sd_stack(tmp_path / "sd")
    model = from_stable_diffusion(base, CLASSES, resolution=32).eval()
    assert model.kind == "sd15" and model.vae is not None and model.latent_factor == 8
    assert model.scheduler_config["clip_sample"] is False
    # ControlNet initialised from the UNet: same encoder weights.
    assert torch.equal(model.controlnet.conv_in.weight, model.unet.conv_in.weight)
    images, scribbles, names = sources(2, size=32)
    ref = _eps(model, images, scribbles, names)
    assert ref.shape == (2, 4, 4, 4)
    model.save_pretrained(tmp_path / "bundle")
    assert not list((tmp_path / "bundle").rglob("*.bin"))
    loaded = ScribbleGenModel.from_pretrained(tmp_path / "bundle").eval()
    assert torch.equal(_eps(loaded, images, scribbles, names), ref)
    # A base folder that already carries a ControlNet uses it instead of copying the UNet.
    shutil.copytree(tmp_path / "bundle" / "controlnet", base / "controlnet")
    again = from_stable_diffusion(base, CLASSES, resolution=32).eval()
    assert torch.equal(_eps(again, images, scribbles, names), ref)


def test_sd_stack_missing_part_is_named(tmp_path):
    base = write_sd_stack(tmp_path / "sd")
    shutil.rmtree(base / "vae")
    with pytest.raises(BadInputError, match="vae"):
        from_stable_diffusion(base, CLASSES)


def test_control_init_zero_vs_random():
    """ControlNet's zero start: a fresh model ignores the hint; control_init=random does not."""
    images, scribbles, names = sources(2)
    other = np.where(scribbles == 255, 1, 255).astype(np.uint8)  # a different scribble, same names
    zero = build_tiny(MICRO, CLASSES, 16, seed=0).eval()
    assert all(layer.weight.abs().sum() == 0 for layer in controlnet_zero_layers(zero.controlnet))
    torch.testing.assert_close(_eps(zero, images, scribbles, names), _eps(zero, images, other, names))
    rand = build_tiny(replace(MICRO, control_init="random"), CLASSES, 16, seed=0).eval()
    assert all(layer.weight.abs().sum() > 0 for layer in controlnet_zero_layers(rand.controlnet))
    assert (_eps(rand, images, scribbles, names) - _eps(rand, images, other, names)).abs().max() > 1e-3
    again = build_tiny(replace(MICRO, control_init="random"), CLASSES, 16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(rand.state_dict().values(), again.state_dict().values()))


def test_prediction_type_saved_and_validated(tmp_path):
    model = micro_model(prediction_type="v_prediction")
    model.save_pretrained(tmp_path / "m")
    assert ScribbleGenModel.from_pretrained(tmp_path / "m").scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(BadInputError, match="prediction_type"):
        build_tiny(replace(MICRO, prediction_type="sample"), CLASSES, 16)
    with pytest.raises(BadInputError, match="control_init"):
        build_tiny(replace(MICRO, control_init="ones"), CLASSES, 16)


def test_onehot_hint_encodes_each_class_in_its_channel_and_round_trips(tmp_path):
    scribbles = np.full((1, 4, 4), 255, np.uint8)
    scribbles[0, 0, :2] = 0
    scribbles[0, 3, 3] = len(CLASSES) - 1
    model = build_tiny(MICRO, CLASSES, 16, seed=0, hint="onehot")
    hint = model.hint(scribbles)
    assert hint.shape == (1, len(CLASSES), 4, 4) and model.null_hint.shape == (len(CLASSES), 16, 16)
    want = np.zeros((1, len(CLASSES), 4, 4), np.float32)
    want[0, 0, 0, :2] = 1
    want[0, -1, 3, 3] = 1
    np.testing.assert_array_equal(hint.numpy(), want)  # unlabelled pixels: all channels 0
    with pytest.raises(BadInputError, match="class id"):
        model.hint(np.full((1, 4, 4), len(CLASSES), np.uint8))
    images, scr, names = sources(2)
    eps = _eps(model, images, scr, names)
    model.save_pretrained(tmp_path / "m")
    loaded = ScribbleGenModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.hint_encoding == "onehot" and loaded.controlnet.config.conditioning_channels == len(CLASSES)
    torch.testing.assert_close(_eps(loaded, images, scr, names), eps)


def test_loading_a_bundle_prints_no_accelerate_warning(tmp_path):
    """Without accelerate, diffusers warned once per component in every actor (issue 13: log noise)."""
    import importlib.util
    import logging

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    build_tiny(MICRO, CLASSES, 16, seed=0).save_pretrained(tmp_path / "m")
    spy = Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(spy)
    try:
        ScribbleGenModel.from_pretrained(tmp_path / "m")
    finally:
        logger.removeHandler(spy)
    assert importlib.util.find_spec("accelerate") is not None or not [m for m in spy.messages if "accelerate" in m]
