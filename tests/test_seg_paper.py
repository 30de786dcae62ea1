"""The paper's seg options (issue 24): each VOC default pinned against the paper's value or
formula (transcribed from mengtang-lab/scribblegen's rloss trainer), and every option at its
dataclass default leaving the tiny runs, and their recorded identities, as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

import experiments.sweep as sweep
import seg.train as seg_train
from engine.config import load_config, to_dict
from engine.errors import BadInputError
from engine.identity import Identity, drop_keys, plain
from seg.batches import AugmentConfig, augment, scaled_size, to_tensor
from seg.budget import plan_budget
from seg.models import ModelConfig, build_model
from seg.train import SegConfig
from seg_fixtures import make_real, make_synthetic

REPO = Path(__file__).resolve().parents[1]
VOC = REPO / "configs" / "seg" / "voc_deeplabv3plus.yaml"
TINY = REPO / "configs" / "seg" / "tiny.yaml"
# The tiny seg identity (inputs {"real": "a"}) as recorded before the options of issue 24 existed.
TINY_IDENTITY = "79bf68cd94c8378c"


def voc_config(*overrides: str) -> SegConfig:
    """The shipped VOC seg config, its required ImageNet file replaced by random init."""
    return load_config(SegConfig, str(VOC), ["model.backbone_weights=random", *overrides])


# -- identities: the options at their default leave old runs reusable ----------------------------------------
def test_tiny_seg_identity_is_unchanged_by_the_added_options():
    cfg = load_config(SegConfig, str(TINY), [])
    identity = sweep.stage_identity(cfg, sweep.RUN_ONLY["seg"], {"real": "a"})
    without = drop_keys(plain(to_dict(cfg)), sweep.RUN_ONLY["seg"] | sweep.ADDED_LATER[SegConfig])
    assert identity.digest == Identity(without, {"real": "a"}).digest == TINY_IDENTITY


def test_the_keys_of_issue_24_are_seg_config_keys_listed_in_added_later():
    """A key the recorded identity does not know must be in ADDED_LATER, else old runs are refused."""
    def dotted(d: dict, prefix: str = "") -> set[str]:
        return {k for key, v in d.items() for k in (dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else {prefix + key})}
    keys = dotted(plain(to_dict(SegConfig()))) - sweep.RUN_ONLY["seg"]
    assert sweep.ADDED_LATER[SegConfig] <= keys
    assert {"model.aspp_dropout", "model.decoder_dropout", "model.multi_grid", "model.align_corners",
            "augment.scale_mode", "augment.blur"} <= sweep.ADDED_LATER[SegConfig]


# -- divergence 3: ResNet-101 learning rate --------------------------------------------------------------
def test_voc_config_uses_the_papers_resnet101_lr():
    cfg = voc_config()
    assert cfg.model.name == "deeplabv3plus_resnet101" and cfg.optim.lr == 0.003  # the paper's README: --lr 0.003


# -- divergence 4: scale augmentation and blur -------------------------------------------------------------
class Fixed:
    """A random source that returns one chosen integer and records the range it was asked for;
    numpy's ``integers(lo, hi)`` excludes ``hi``, Python's ``randint(lo, hi)`` includes it."""

    def __init__(self, value: int) -> None:
        self.value, self.asked = value, None

    def integers(self, lo: int, hi: int) -> int:
        self.asked = (lo, hi - 1)
        return self.value

    def randint(self, lo: int, hi: int) -> int:
        self.asked = (lo, hi)
        return self.value


def paper_random_scale_crop_size(w: int, h: int, base_size: int, rnd) -> tuple[int, int]:
    """custom_transforms.RandomScaleCrop (paper), the resize part transcribed: returns (oh, ow)."""
    short_size = rnd.randint(int(base_size * 0.5), int(base_size * 2.0))
    if h > w:
        ow = short_size
        oh = int(1.0 * h * ow / w)
    else:
        oh = short_size
        ow = int(1.0 * w * oh / h)
    return oh, ow


def test_voc_short_side_range_is_the_papers_256_to_1026_px():
    cfg = voc_config().augment
    assert (cfg.scale_mode, cfg.crop, cfg.scale_min, cfg.scale_max, cfg.blur) == ("short_side", 513, 0.5, 2.0, True)
    ours, paper = Fixed(300), Fixed(300)
    scaled_size(375, 500, cfg, ours)
    paper_random_scale_crop_size(500, 375, 513, paper)
    assert ours.asked == paper.asked == (256, 1026)


@pytest.mark.parametrize("h, w", [(375, 500), (500, 333), (281, 281)])
def test_short_side_sizes_follow_the_papers_formula(h, w):
    cfg = voc_config().augment
    for short in range(256, 1027):
        assert scaled_size(h, w, cfg, Fixed(short)) == paper_random_scale_crop_size(w, h, 513, Fixed(short))


def test_blur_is_pils_gaussian_blur_with_p_half_and_a_radius_uniform_below_one():
    """custom_transforms.RandomGaussianBlur: ``if random.random() < 0.5: img.filter(GaussianBlur(radius=random.random()))``,
    replayed draw by draw on a second generator."""
    cfg = AugmentConfig(crop=32, scale_min=1.0, scale_max=1.0, hflip=False, blur=True)
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rng, ref = np.random.default_rng(0), np.random.default_rng(0)
    radii = []
    for _ in range(200):
        x = augment(image, [], cfg, rng)[0]
        ref.uniform(1.0, 1.0), ref.integers(0, 1), ref.integers(0, 1)  # the scale and the crop's top and left
        want = image
        if ref.random() < 0.5:
            radii.append(ref.uniform(0.0, 1.0))
            want = np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radii[-1])))
        assert torch.allclose(x, to_tensor(want), atol=1e-5)
    assert 70 < len(radii) < 130 and 0.0 <= min(radii) and max(radii) < 1.0


def test_bad_augment_options_are_named():
    with pytest.raises(BadInputError, match="augment.scale_mode"):
        load_config(SegConfig, None, ["augment.scale_mode=absolute"])
    with pytest.raises(BadInputError, match="augment.blur"):
        load_config(SegConfig, None, ["augment.blur=0.5"])


# -- divergence 9: the DeepLab head ----------------------------------------------------------------------
def _dropouts(module: nn.Module) -> list[float]:
    return [m.p for m in module.modules() if isinstance(m, nn.Dropout)]


def _layer4_dilations(model: nn.Module) -> list[int]:
    return [block.conv2.dilation[0] for block in model.backbone.layer4]


def test_voc_head_is_the_papers():
    """rloss deeplab: ASPP Dropout(0.5); decoder Dropout(0.5), Dropout(0.1); multi-grid [1, 2, 4]
    at layer 4's rate 2 (output stride 16): dilations 2, 4, 8; align_corners=True."""
    model = build_model(voc_config().model, 21)
    assert _dropouts(model.aspp) == [0.5] and _dropouts(model.decoder) == [0.5, 0.1]
    assert _layer4_dilations(model) == [2, 4, 8]
    assert model.align_corners and model.aspp.align_corners
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)


def test_default_head_is_the_measured_one_with_its_old_state_dict_keys():
    """tiny keeps Dropout(0.1) after ASPP, no decoder dropout, torchvision's dilations and
    align_corners=False; its checkpoints' keys stay decoder.0 / decoder.1."""
    model = build_model(ModelConfig(width=8), 3)
    assert _dropouts(model) == [0.1] and not model.align_corners
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("decoder.")} == {"0", "1"}
    resnet = build_model(ModelConfig(name="deeplabv3plus_resnet50", output_stride=16, backbone_weights="random"), 3)
    assert _layer4_dilations(resnet) == [1, 2, 2]  # torchvision: the first block keeps the previous rate


def test_align_corners_reaches_the_output_upsampling():
    torch.manual_seed(0)
    a = build_model(ModelConfig(width=8), 3).eval()
    b = build_model(ModelConfig(width=8, align_corners=True), 3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))  # same weights, other upsampling


@pytest.mark.parametrize("override, message", [
    ("model.decoder_dropout=[0.5]", "two rates"),
    ("model.aspp_dropout=1.0", r"\[0, 1\)"),
    ("model.multi_grid=[1, 2]", "one entry per block"),
    ("model.align_corners=1", "true or false"),
])
def test_bad_head_options_are_named(override, message):
    with pytest.raises(BadInputError, match=message):
        load_config(SegConfig, None, [override])


# -- divergence 10 (seg): no silent random ResNet ----------------------------------------------------------
@pytest.mark.parametrize("name, arch", [("deeplabv3plus_resnet101", "resnet101"), ("deeplabv3plus_mobilenet", "mobilenet_v2")])
def test_empty_backbone_weights_on_an_imagenet_backbone_is_refused(name, arch):
    with pytest.raises(BadInputError, match=rf'model\.backbone_weights="".*torchvision\.models\.{arch}.*random'):
        ModelConfig(name=name, backbone_weights="").validate()
    ModelConfig(name=name, backbone_weights="random").validate()  # on purpose: accepted
    ModelConfig(name="tiny", backbone_weights="").validate()  # the tiny model has no ImageNet weights


def test_shipped_voc_config_refuses_without_its_imagenet_file():
    with pytest.raises(BadInputError, match="model.backbone_weights"):
        load_config(SegConfig, str(VOC), [])


# -- divergence 1: the step budget and synthetic share of the paper's epoch ---------------------------------
VOC_TRAIN = 10582  # VOC 2012 + SBD train_aug images (ScribbleSup scribbles)


def paper_total_iterations(count: int, aug_ratio: int, batch_size: int, epochs: int) -> int:
    """The paper's poly span, transcribed: ``len(VOCSegmentation) = (1 + aug_ratio) * count``
    (``aug_ratio`` 0 without synthetic data), ``iters_per_epoch = len(DataLoader)`` (no
    ``drop_last``), ``N = epochs * iters_per_epoch`` (``LR_Scheduler``)."""
    return epochs * -(-((1 + aug_ratio) * count) // batch_size)


@pytest.mark.parametrize("scheme, aug_ratio", [("real", 0), ("fixed", 1), ("adaptive", 1), ("uniform", 10)])
def test_voc_budget_is_the_papers_epochs_over_real_plus_synthetic(scheme, aug_ratio):
    """Ten λ sets of one image a source: the curriculum and 'fixed' use one set at a time, 'uniform' all
    ten at once ('append' over every set); 60 epochs at batch 12."""
    cfg = voc_config(f"scheme.name={scheme}", "scheme.fixed_lambda=1.0")
    synthetic = {round(0.1 * i, 1): VOC_TRAIN for i in range(1, 11)}
    budget = plan_budget(cfg.scheme, cfg.train.budget, cfg.train.steps, cfg.train.epochs, cfg.train.batch_size, VOC_TRAIN, synthetic)
    assert budget.steps == paper_total_iterations(VOC_TRAIN, aug_ratio, 12, 60)
    assert budget.steps_per_epoch * 60 == budget.steps
    if scheme != "real":
        assert budget.synth_fraction == pytest.approx(aug_ratio / (aug_ratio + 1))  # uniform over 10 sets: 10/11, not 0.5
    assert paper_total_iterations(VOC_TRAIN, 0, 12, 60) == 52920 and paper_total_iterations(VOC_TRAIN, 1, 12, 60) == 105840


def test_tiny_keeps_its_fixed_step_budget_and_batch_share():
    cfg = load_config(SegConfig, str(TINY), ["scheme.name=uniform"])
    budget = plan_budget(cfg.scheme, cfg.train.budget, cfg.train.steps, cfg.train.epochs, cfg.train.batch_size, 120, {0.5: 120, 1.0: 120})
    assert (budget.steps, budget.synth_fraction) == (4500, 0.5)


def test_curriculum_epochs_must_be_the_runs_under_paper_epochs():
    with pytest.raises(BadInputError, match="scheme.adaptive.epochs=40.0 with train.epochs=60"):
        voc_config("scheme.adaptive.epochs=40")
    with pytest.raises(BadInputError, match="train.budget"):
        load_config(SegConfig, None, ["train.budget=epochs"])


# -- divergences 1 and 8 end to end: paper epochs, poly over them, the best-val number beside the last ---------
def test_paper_epochs_and_best_val_in_a_run(tmp_path, capsys):
    root = tmp_path / "data"
    real, synth = make_real(root, n_train=12, n_val=4), make_synthetic(root, (0.2, 0.5), n_train=12)
    out = tmp_path / "run"
    argv = ["--shards", str(real), str(synth), "--scheme", "uniform", "--out", str(out),
            "--set", "train.budget=paper_epochs", "--set", "train.epochs=2", "--set", "train.eval_every_epochs=1",
            "--set", "scheme.synth_share=paper_epoch", "--set", "train.batch_size=4", "--set", "train.log_every=1",
            "--set", "augment.crop=32", "--set", "data.workers=0", "--set", "train.checkpoint_every=0", "--set", "model.width=8",
            "--set", 'model.backbone_weights=""', "--set", "loss.name=pce"]
    assert seg_train.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    per_epoch = -(-(12 + 2 * 12) // 4)  # 12 real + 2 sets of 12 synthetic, batch 4: 9 steps
    assert summary["steps"] == 2 * per_epoch == 18
    assert summary["paper_epoch"] == {"budget": "paper_epochs", "steps_per_epoch": 9, "synth_fraction": 2 / 3,
                                      "synth_share": "paper_epoch"}
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in entries if "lr" in e][-1]
    assert last["lr"] == pytest.approx(0.02 * (1 - 17 / 18) ** 0.9)  # poly decay over the paper-epoch span
    evals = {e["step"]: e["eval"]["miou"] for e in entries if "eval" in e}
    assert sorted(evals) == [9, 18]
    best = max(evals, key=evals.get)
    assert summary["paper_best"]["miou"] == evals[best] and summary["paper_best"]["epoch"] == best // 9
    assert summary["miou"] == evals[18]  # the reported number stays the last step's
    assert "the paper's protocol" in capsys.readouterr().out


def test_multi_grid_is_not_loaded_with_a_backbone_pretrained_without_it():
    """Multi-grid changes dilations, not weight shapes: the shipped tiny backbone's record must catch it."""
    with pytest.raises(BadInputError, match=r"differs in \['multi_grid'\]"):
        load_config(SegConfig, str(TINY), ["model.multi_grid=[2]"])


# -- 24.11c: replacement from the same source ---------------------------------------------------------------
def test_voc_replacement_swaps_in_the_same_source_as_the_paper():
    from seg.schemes import SchemeConfig

    assert voc_config().scheme.replace_from == "source" and SchemeConfig().replace_from == "pool"
