"""The pretrained tiny segmenter backbone (the embedded default's ImageNet): job, shipped copy, loading."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine.config import from_dict
from engine.errors import BadInputError
from seg.models import (ARCH_KEYS, BACKBONE_FILE, BACKBONE_RECORD, BUILTIN, BUILTIN_BACKBONE, ModelConfig, build_backbone,
                        build_model)
from seg.pretrain_backbone import (HEAD_FILE, Classifier, PretrainBackboneConfig, average_precision, batch_indices,
                                   file_sha256, load_classifier, main, present, pretrain, render_scenes, score)

ROOT = Path(__file__).resolve().parents[1]
SEG_TINY = ROOT / "configs" / "seg" / "tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(out: Path, steps: int = 3, seg_config: Path = SEG_TINY, **train) -> PretrainBackboneConfig:
    return from_dict(PretrainBackboneConfig, {
        "seg_config": str(seg_config),
        "corpus": {"num_images": 40, "heldout_images": 24, "size": 32},
        "augment": {"crop": 32},
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "warmup_steps": 1, "threads": 1, "device": "cpu", **train},
        "out": str(out),
    })


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _seg_model_section() -> dict:
    return yaml.safe_load(SEG_TINY.read_text())["model"]


# -- the job ------------------------------------------------------------------------------------
def test_pretrain_writes_backbone_head_record_and_loss_and_is_deterministic(tmp_path):
    final = pretrain(_cfg(tmp_path / "a"), progress=False, command="python -m jobs.pretrain_backbone --x")
    assert sorted(p.name for p in final.iterdir()) == sorted([BACKBONE_FILE, HEAD_FILE, BACKBONE_RECORD])
    meta = json.loads((final / BACKBONE_RECORD).read_text())
    assert meta["command"] == "python -m jobs.pretrain_backbone --x" and meta["steps"] == 3
    assert meta["architecture"] == {k: _seg_model_section()[k] for k in ARCH_KEYS}
    assert meta["weights_sha256"] == file_sha256(final / BACKBONE_FILE) and meta["head_sha256"] == file_sha256(final / HEAD_FILE)
    held = meta["heldout"]
    assert held["first_scene"] == 40 and held["scenes"] == 24 and 0 <= held["exact_match"] <= 1
    assert meta["seconds"]["total"] > 0
    weights = _tensors(final / BACKBONE_FILE)
    own = build_backbone(ModelConfig(**meta["architecture"])).state_dict()
    assert weights.keys() == own.keys() and all(weights[k].shape == own[k].shape for k in own)  # seg's key names
    log = [json.loads(x) for x in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0

    again = _tensors(pretrain(_cfg(tmp_path / "b"), progress=False) / BACKBONE_FILE)
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # two runs, the same weights
    other = _tensors(pretrain(_cfg(tmp_path / "c", seed=1), progress=False) / BACKBONE_FILE)
    assert not torch.equal(weights["conv1.weight"], other["conv1.weight"])  # the batch seed matters
    with pytest.raises(BadInputError, match="already holds"):
        pretrain(_cfg(tmp_path / "a"), progress=False)


def test_architecture_comes_from_the_seg_config(tmp_path):
    seg = yaml.safe_load(SEG_TINY.read_text())
    seg["model"].update(width=8, stem_pool=True)
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(seg))
    final = pretrain(_cfg(tmp_path / "w8", steps=1, seg_config=tmp_path / "seg.yaml"), progress=False)
    meta = json.loads((final / BACKBONE_RECORD).read_text())
    assert meta["architecture"]["width"] == 8 and meta["architecture"]["stem_pool"] is True
    assert _tensors(final / BACKBONE_FILE)["conv1.weight"].shape[0] == 8
    seg["model"]["name"] = "deeplabv3plus_resnet50"
    (tmp_path / "r50.yaml").write_text(yaml.safe_dump(seg))
    with pytest.raises(BadInputError, match="only the tiny"):
        pretrain(_cfg(tmp_path / "r50", seg_config=tmp_path / "r50.yaml"), progress=False)


def test_targets_batches_and_average_precision():
    mask = np.zeros((2, 4, 4), np.uint8)
    mask[0, 0, 0], mask[0, 1, 1], mask[0, 3, 3] = 2, 6, 255  # square, cross, and crop padding
    assert present(mask).tolist() == [[0, 1, 0, 0, 0, 1], [0] * 6]
    seen = [int(i) for s in range(5) for i in batch_indices(s, 4, 20, seed=0)]
    assert sorted(seen) == list(range(20))  # 5 steps x 4 = one epoch, each scene once
    assert list(batch_indices(7, 4, 20, 0)) == list(batch_indices(7, 4, 20, 0)) != list(batch_indices(7, 4, 20, 1))
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.array([0.9, 0.8]), np.array([1, 1])) == 1.0
    assert math.isnan(average_precision(np.array([0.9]), np.array([0])))


def test_cli_help_and_bad_value(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "ImageNet" in capsys.readouterr().out
    assert main(["--set", "train.device=tpu", "--set", f"out={tmp_path}"]) == 2
    assert "train.device" in capsys.readouterr().err


# -- the shipped backbone -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads((BUILTIN_BACKBONE / BACKBONE_RECORD).read_text())


def test_shipped_backbone_matches_its_digest_size_and_the_seg_config(shipped):
    assert shipped["weights_sha256"] == file_sha256(BUILTIN_BACKBONE / BACKBONE_FILE)
    assert shipped["head_sha256"] == file_sha256(BUILTIN_BACKBONE / HEAD_FILE)
    size = sum(p.stat().st_size for p in BUILTIN_BACKBONE.iterdir() if p.is_file())
    assert size <= 5 * 2**20, f"{size / 2**20:.1f} MB > 5 MB"
    seg = _seg_model_section()
    assert seg["backbone_weights"] == BUILTIN  # every tiny seg arm starts from it
    assert shipped["architecture"] == {k: seg[k] for k in ARCH_KEYS}
    assert shipped["command"].startswith("python -m jobs.pretrain_backbone") and shipped["steps"] >= 1000
    assert shipped["config"]["train"]["steps"] == shipped["steps"]
    assert shipped["heldout"]["first_scene"] >= shipped["config"]["corpus"]["num_images"]  # never trained on


def test_builtin_loads_the_shipped_tensors_into_the_tiny_segmenter():
    cfg = from_dict(ModelConfig, _seg_model_section())
    model = build_model(cfg, 7)
    weights = _tensors(BUILTIN_BACKBONE / BACKBONE_FILE)
    own = model.backbone.state_dict()
    assert own.keys() == weights.keys() and all(torch.equal(own[k], weights[k].to(own[k].dtype)) for k in own)
    torch.manual_seed(0)
    scratch = build_model(from_dict(ModelConfig, {**_seg_model_section(), "backbone_weights": ""}), 7).backbone.state_dict()
    assert not torch.equal(scratch["conv1.weight"], own["conv1.weight"])
    assert not torch.equal(scratch["layer4.0.bn2.running_var"], own["layer4.0.bn2.running_var"])


def test_builtin_refuses_another_architecture(tmp_path):
    section = _seg_model_section()
    with pytest.raises(BadInputError, match="tiny model's, not deeplabv3plus_resnet101"):
        from_dict(ModelConfig, {**section, "name": "deeplabv3plus_resnet101"})
    with pytest.raises(BadInputError, match=r"differs in \['width'\]"):
        from_dict(ModelConfig, {**section, "width": 8})
    with pytest.raises(BadInputError, match=r"differs in \['stem_pool'\]"):  # same weight shapes: only the record catches it
        build_model(ModelConfig(**{**section, "stem_pool": True}), 7)
    # A file path keeps working; a record beside it is checked the same way.
    shutil.copy(BUILTIN_BACKBONE / BACKBONE_FILE, tmp_path / "bare.safetensors")
    assert build_model(ModelConfig(**{**section, "backbone_weights": str(tmp_path / "bare.safetensors")}), 7)
    shutil.copytree(BUILTIN_BACKBONE, tmp_path / "copy")
    with pytest.raises(BadInputError, match="output_stride"):
        from_dict(ModelConfig, {**section, "output_stride": 16, "backbone_weights": str(tmp_path / "copy" / BACKBONE_FILE)})


def test_shipped_backbone_recognises_held_out_corpus_scenes(shipped):
    c = from_dict(PretrainBackboneConfig, {"corpus": shipped["config"]["corpus"]}).corpus
    images, masks = render_scenes(shipped["heldout"]["first_scene"], 128, c, progress=False)
    got = score(load_classifier(BUILTIN_BACKBONE), images, masks)
    assert got["mean_ap"] > 0.8 and got["mean_ap"] > got["chance_mean_ap"] + 0.4, got
    assert got["exact_match"] > got["chance_exact_match"] + 0.3, got
    assert got["mean_ap"] == pytest.approx(shipped["heldout"]["mean_ap"], abs=0.08)  # 128 of its held-out scenes
    torch.manual_seed(0)  # the same test on a random backbone and head stays near a constant guess
    arch = ModelConfig(**shipped["architecture"])
    assert score(Classifier(build_backbone(arch)), images, masks)["mean_ap"] < 0.6
