"""Segmentation side: loss, metrics, models and the training entry point (resume included)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import seg.train as seg_train
from engine.errors import BadInputError
from seg.loss import partial_cross_entropy
from seg.metrics import SegMetrics
from seg.models import ModelConfig, build_model, load_backbone_weights
from seg_fixtures import make_real, make_synthetic

FAST = ["--set", "train.steps=12", "--set", "train.batch_size=4", "--set", "augment.crop=32", "--set", "data.workers=0",
        "--set", "train.log_every=2", "--set", "train.eval_every=6", "--set", "train.checkpoint_every=4", "--set", "model.width=8", "--set", 'model.backbone_weights=""',
        "--set", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_train")
    return str(make_real(root)), str(make_synthetic(root, (0.3, 0.6)))


def test_partial_ce_equals_ce_on_labelled_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 6))
    target[torch.rand(2, 5, 6) < 0.7] = 255
    # Reference: mean over labelled pixels of -log softmax at the true class.
    logp = F.log_softmax(logits, 1).permute(0, 2, 3, 1)[target != 255]
    ref = -logp.gather(1, target[target != 255][:, None]).mean()
    got = partial_cross_entropy(logits, target)
    assert torch.allclose(got, ref)
    got.backward()
    unlabelled = (target == 255)[:, None].expand_as(logits)
    assert logits.grad[unlabelled].abs().max() == 0  # no gradient from unlabelled pixels


def test_partial_ce_without_labels_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = partial_cross_entropy(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_miou_matches_hand_computed_reference():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    m = SegMetrics(num_classes=5)
    m.update(pred[None], target[None])
    out = m.compute()
    # Void pixels ignored. class 0: inter 1, union |{p0}|+|{t0}|-1 = 2+2-1 = 3 -> 1/3
    # class 1: inter 2, union 3 -> 2/3; class 2: inter 1, union 2 -> 1/2; class 3 never
    # predicted on a valid pixel nor present -> excluded; class 4 absent -> excluded.
    assert out["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert out["per_class_iou"][3:] == [None, None]
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_acc"] == pytest.approx(4 / 6)


def test_deeplabv3plus_resnet50_shape_and_torchvision_keys(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name="deeplabv3plus_resnet50", output_stride=16, aspp_channels=256, aspp_rates=[6, 12, 18], backbone_weights="random")
    model = build_model(cfg, num_classes=21).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)
        low, high = model.backbone(torch.randn(1, 3, 64, 64))
    assert low.shape == (1, 256, 16, 16) and high.shape == (1, 2048, 4, 4)  # stride 4 and 16
    keys = model.backbone.state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight",
              "layer3.5.bn3.running_var", "layer4.2.conv3.weight"):
        assert k in keys
    assert len(keys) == 318  # torchvision resnet50 (320 keys) minus fc.weight and fc.bias
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032  # 25.56M minus the fc layer

    # A torchvision-style file (with its fc) loads from a local path, safetensors and .pth alike.
    from safetensors.torch import save_file

    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in keys.items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    save_file(state, tmp_path / "r50.safetensors")
    torch.save(state, tmp_path / "r50.pth")
    for name in ("r50.safetensors", "r50.pth"):
        fresh = build_model(ModelConfig(name="deeplabv3plus_resnet50", output_stride=16, backbone_weights=str(tmp_path / name)), 21)
        assert torch.equal(fresh.backbone.layer2[1].conv2.weight, state["layer2.1.conv2.weight"])
    bad = {k: v for k, v in state.items() if not k.startswith("layer4")}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(BadInputError, match="missing"):
        load_backbone_weights(model.backbone, tmp_path / "bad.safetensors")


def test_deeplabv3plus_mobilenet_v2_shapes_and_torchvision_keys(tmp_path):
    """The paper's RLoss backbone: torchvision mobilenet_v2 has 3,504,872 parameters; without
    its classifier (1,281,000) and its last 1x1 conv to 1280 (412,160) that is 1,811,712."""
    cfg = ModelConfig(name="deeplabv3plus_mobilenet", output_stride=16, aspp_channels=256, aspp_rates=[6, 12, 18], backbone_weights="random")
    model = build_model(cfg, num_classes=21).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)
        low, high = model.backbone(torch.randn(1, 3, 64, 64))
        assert low.shape == (1, 24, 16, 16) and high.shape == (1, 320, 4, 4)
        assert build_model(ModelConfig(name="deeplabv3plus_mobilenet", output_stride=8, backbone_weights="random"), 21).backbone(
            torch.randn(1, 3, 64, 64))[1].shape == (1, 320, 8, 8)
    keys = model.backbone.state_dict()
    assert sum(p.numel() for p in model.backbone.parameters()) == 1_811_712
    for k in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight", "features.2.conv.0.0.weight",
              "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.17.conv.3.running_var"):
        assert k in keys
    from safetensors.torch import save_file

    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in keys.items()}
    state |= {"features.18.0.weight": torch.zeros(1280, 320, 1, 1), "classifier.1.weight": torch.zeros(1000, 1280),
              "classifier.1.bias": torch.zeros(1000)}
    save_file(state, tmp_path / "mnv2.safetensors")
    fresh = build_model(ModelConfig(name="deeplabv3plus_mobilenet", backbone_weights=str(tmp_path / "mnv2.safetensors")), 21)
    assert torch.equal(fresh.backbone.features[5].conv[1][0].weight, state["features.5.conv.1.0.weight"])
    with pytest.raises(BadInputError, match="MobileNetV2 state dict"):
        load_backbone_weights(model.backbone, _resnet_like(tmp_path))


def _resnet_like(tmp_path):
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "r.safetensors")
    return tmp_path / "r.safetensors"


def run_cli(argv, capsys):
    code = seg_train.main(argv)
    return code, capsys.readouterr()


@pytest.mark.slow
def test_train_reduces_loss_writes_outputs_and_resumes(data, tmp_path, capsys, monkeypatch):
    real, synth = data
    out = tmp_path / "run"
    argv = ["--shards", real, synth, "--scheme", "uniform", "--out", str(out), *FAST]
    calls = {"n": 0}
    original = seg_train.training_loss

    def crash_after_ten(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt  # the job dies during step 11 (checkpoint at 8)
        return original(*args, **kwargs)

    monkeypatch.setattr(seg_train, "training_loss", crash_after_ten)
    with pytest.raises(KeyboardInterrupt):
        seg_train.main(argv)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 8 and not (out / "summary.json").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(seg_train, "training_loss", original)

    code, io = run_cli(argv, capsys)  # refuses to overwrite a run
    assert code == 2 and "--resume" in io.err

    code, io = run_cli(argv + ["--resume"], capsys)
    assert code == 0, io.err
    assert "mIoU" in io.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 8 and summary["steps"] == 12
    assert 0.0 <= summary["miou"] <= 1.0 and set(summary["lam_counts"]) == {"0.0", "0.3", "0.6"}
    entries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [e["step"] for e in entries if "loss" in e]
    assert train_steps == [2, 4, 6, 8, 10, 12]  # the crashed run's step-10 entry was dropped, then rewritten
    assert [e["step"] for e in entries if "eval" in e] == [6, 12]
    losses = [e["loss"] for e in entries if "loss" in e]
    assert losses[-1] < losses[0]
    assert all({"lr", "lam_mean", "lam_max", "synth_share"} <= set(e) for e in entries if "loss" in e)
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 12

    # The evaluate CLI reproduces the final mIoU from the checkpoint.
    from seg.evaluate import main as eval_main

    assert eval_main(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--shards", real]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(summary["miou"], abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scheme", "fixed", "--set", "scheme.fixed_lambda=0.5"], "available λ values: [0.3, 0.6]"),
        (["--set", "scheme.name=curriculum"], "unknown scheme"),
        (["--set", "train.batch_size=1"], "batch_size"),
    ],
)
def test_cli_errors_are_clear(data, tmp_path, capsys, extra, message):
    real, synth = data
    code, io = run_cli(["--shards", real, synth, "--out", str(tmp_path / "o"), *FAST, *extra], capsys)
    assert code == 2 and io.err.startswith("error: ") and message in io.err
    assert "Traceback" not in io.err


def test_cli_paper_curriculum_switches_lambda_set_half_way(data, tmp_path, capsys):
    """--curriculum 0,30 over the default 60 epochs: λ 0.3 for the first half, then 0.6."""
    real, synth = data
    out = tmp_path / "cur"
    code, io = run_cli(["--shards", real, synth, "--scheme", "adaptive", "--curriculum", "0,30", "--out", str(out), *FAST,
                        "--set", "scheme.synth_fraction=1.0"], capsys)
    assert code == 0, io.err
    maxes = [(e["step"], e["lam_max"]) for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert maxes == [(2, 0.3), (4, 0.3), (6, 0.3), (8, 0.6), (10, 0.6), (12, 0.6)]
    code, io = run_cli(["--shards", real, synth, "--scheme", "adaptive", "--curriculum", "10,30", "--out", str(tmp_path / "bad"),
                        *FAST], capsys)
    assert code == 2 and "must start at epoch 0" in io.err


def test_cli_synthetic_scheme_without_synthetic_manifest(data, tmp_path, capsys):
    real, _ = data
    code, io = run_cli(["--shards", real, "--scheme", "adaptive", "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "synthetic manifest" in io.err


def test_seg_never_imports_the_generator():
    """docs/design.md: seg shares only the shard format and manifest with engine (static check of every import)."""
    import ast
    from pathlib import Path

    # engine.data.subset: the low-data draw, one function for ingest and seg (the same scenes from the same seed);
    # engine.data.procedural: the built-in dataset's corpus stream, which seg's backbone pretraining reads (data, not the generator).
    allowed = {"engine.shards", "engine.manifest", "engine.config", "engine.errors", "engine.atomic", "engine.distributed",
               "engine.data.subset", "engine.data.procedural", "engine.plots",  # plots: the loss curve it draws
               "engine.tensorboard_log",  # the trainers' TensorBoard files
               "engine.storage", "engine.identity"}  # label scores: a manifest's folder (local or URL), the scorer's digest
    for path in (Path(__file__).resolve().parents[1] / "seg").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("ray", "diffusers", "transformers")), f"{path.name} imports {name}"
                assert not name.startswith("engine") or name in allowed, f"{path.name} imports {name}"
