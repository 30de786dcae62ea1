"""Segmentation models: DeepLabV3+ on a ResNet backbone, and a tiny one for CPU.

The ResNet is written here (torchvision does not import beside this torch build) with
torchvision's exact module names, so ``state_dict`` keys are the same
(``layer1.0.conv1.weight``, ``bn1.running_mean``, ``layer2.0.downsample.0.weight``...)
and an ImageNet checkpoint saved from torchvision loads from a local file. Output
stride 16 or 8 replaces the stride of the last one or two stages with dilation, as
DeepLab does. The tiny model is the same DeepLabV3+ on a narrow 4-stage ResNet with one
basic block per stage: small enough to train on 64x64 images on two CPU cores. The
MobileNet-v2 backbone (``seg.mobilenet``) is the one the paper's RLoss runs use.

The tiny model's analog of an ImageNet checkpoint ships inside the package
(``seg/assets/tiny-backbone``, made by ``python -m jobs.pretrain_backbone``):
``model.backbone_weights: builtin`` loads it, after checking that the architecture its
``backbone.json`` records is the one being built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import BadInputError
from seg.mobilenet import MobileNetV2

MODELS = ("tiny", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101", "deeplabv3plus_mobilenet")

# The shipped pretrained tiny backbone (seg/pretrain_backbone.py made it): ``backbone_weights: builtin``.
BUILTIN = "builtin"
BUILTIN_BACKBONE = Path(__file__).resolve().parent / "assets" / "tiny-backbone"
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_RECORD = "backbone.json"  # beside the weights: the architecture, command, digest, held-out score
# The model keys that decide the backbone network (the ASPP head's keys do not).
ARCH_KEYS = ("name", "width", "stem_pool", "output_stride")
# ``backbone_weights: random``: an ImageNet-sized backbone trained from random weights on purpose
# ("" is refused for those: the paper always starts from ImageNet weights).
RANDOM = "random"
LAYER4_BLOCKS = {"tiny": 1, "deeplabv3plus_resnet50": 3, "deeplabv3plus_resnet101": 3}  # what multi_grid applies to
IMAGENET_BACKBONES = {"deeplabv3plus_resnet50": "resnet50", "deeplabv3plus_resnet101": "resnet101",
                      "deeplabv3plus_mobilenet": "mobilenet_v2"}


@dataclass
class ModelConfig:
    """Which network; ``backbone_weights`` is a local safetensors/.pth ImageNet ResNet,
    ``builtin`` (tiny only): the shipped backbone pretrained on the built-in corpus, or
    ``random`` (random init on purpose; "" means the same for the tiny model only).

    The head options default to this project's measured head; the paper's DeepLabV3+
    (``configs/seg/voc_deeplabv3plus.yaml``) uses ``aspp_dropout`` 0.5, ``decoder_dropout``
    [0.5, 0.1], ``multi_grid`` [1, 2, 4] and ``align_corners`` true.
    """

    name: str = "tiny"
    width: int = 16  # tiny only: channels of the first stage (doubling per stage)
    output_stride: int = 8
    stem_pool: bool = True  # tiny only: false drops the stem's max-pool (halves every stride; small images)
    aspp_channels: int = 64
    aspp_rates: list[int] = field(default_factory=lambda: [2, 4, 6])
    backbone_weights: str = ""
    aspp_dropout: float = 0.1  # dropout after the ASPP projection
    decoder_dropout: list[float] = field(default_factory=list)  # after each of the decoder's two 3x3 convs; [] = none
    multi_grid: list[int] = field(default_factory=list)  # ResNet layer 4: block i dilated at rate x multi_grid[i]; [] = uniform
    align_corners: bool = False  # of the head's bilinear upsamplings

    def validate(self) -> None:
        if self.name not in MODELS:
            raise BadInputError(f"model.name={self.name!r}", f"unknown model; choose one of {list(MODELS)}")
        if self.output_stride not in (8, 16):
            raise BadInputError(f"model.output_stride={self.output_stride}", "must be 8 or 16")
        self._validate_head()
        backbone_weights_file(self)  # refuses a missing file, or builtin for another architecture

    def _validate_head(self) -> None:
        """Dropout rates in [0, 1), two decoder rates or none, a multi-grid only on a ResNet."""
        rates = [self.aspp_dropout, *self.decoder_dropout]
        if any(not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0 for p in rates):
            raise BadInputError(f"model.aspp_dropout={self.aspp_dropout!r} / model.decoder_dropout={self.decoder_dropout!r}",
                                "dropout rates must be numbers in [0, 1)")
        if len(self.decoder_dropout) not in (0, 2):
            raise BadInputError(f"model.decoder_dropout={self.decoder_dropout!r}",
                                "give [] (none) or two rates, one after each decoder conv (the paper: [0.5, 0.1])")
        if self.multi_grid and self.name not in LAYER4_BLOCKS:
            raise BadInputError(f"model.multi_grid={self.multi_grid!r}", "applies to ResNet backbones only", "set model.multi_grid=[]")
        if self.multi_grid and len(self.multi_grid) != LAYER4_BLOCKS[self.name]:
            raise BadInputError(f"model.multi_grid={self.multi_grid!r}",
                                f"needs one entry per block of {self.name}'s layer 4 ({LAYER4_BLOCKS[self.name]})")
        if any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in self.multi_grid):
            raise BadInputError(f"model.multi_grid={self.multi_grid!r}", "must be positive integers (the paper: [1, 2, 4])")
        if not isinstance(self.align_corners, bool):
            raise BadInputError(f"model.align_corners={self.align_corners!r}", "must be true or false")


def backbone_arch(cfg: ModelConfig) -> dict:
    """The keys of ``cfg`` that decide the backbone network (recorded beside pretrained weights).

    ``multi_grid`` changes layer 4's dilations, not a weight shape, so it enters only when set:
    records made before it existed (the shipped backbone's) still describe the default network.
    """
    return {k: getattr(cfg, k) for k in ARCH_KEYS} | ({"multi_grid": list(cfg.multi_grid)} if cfg.multi_grid else {})


def backbone_weights_file(cfg: ModelConfig) -> Path | None:
    """The file ``cfg.backbone_weights`` names (``builtin``: the shipped one), or None for none.

    When a ``backbone.json`` record lies beside the file and describes it (always for
    ``builtin``), the architecture it records must be ``cfg``'s: a stem pool or output
    stride changes the network without changing a single weight shape, so the shapes
    alone would not catch it.
    """
    if cfg.backbone_weights == RANDOM or (not cfg.backbone_weights and cfg.name == "tiny"):
        return None
    if not cfg.backbone_weights:
        arch = IMAGENET_BACKBONES[cfg.name]
        raise BadInputError(
            'model.backbone_weights=""', f"{cfg.name} is an ImageNet backbone (the paper always starts from ImageNet weights), "
            "but no weights file is given",
            f"save torchvision's {arch} ImageNet state dict to a local file (on a machine with torchvision: "
            f"torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), '{arch}.pth')) and set "
            f"model.backbone_weights to that file; or model.backbone_weights={RANDOM} to train from random weights on purpose")
    what = f"model.backbone_weights={cfg.backbone_weights}"
    if cfg.backbone_weights == BUILTIN:
        if cfg.name != "tiny":
            raise BadInputError(what, f"the shipped backbone ({BUILTIN_BACKBONE}) is the tiny model's, not {cfg.name}'s",
                                f"give a local .safetensors or .pth file of ImageNet weights, or {RANDOM} to train from scratch")
        path = BUILTIN_BACKBONE / BACKBONE_FILE
        if not path.is_file() or not (BUILTIN_BACKBONE / BACKBONE_RECORD).is_file():
            raise BadInputError(what, f"the shipped backbone is missing from {BUILTIN_BACKBONE}", "reinstall the package")
    else:
        path = Path(cfg.backbone_weights)
        if not path.is_file():
            raise BadInputError(what, "file not found", "give a local .safetensors or .pth file")
    record = path.parent / BACKBONE_RECORD
    try:
        meta = json.loads(record.read_text()) if record.is_file() else {}
    except ValueError as exc:
        raise BadInputError(str(record), f"not valid JSON: {exc}") from None
    if meta.get("weights_file") == path.name:
        want, got = meta.get("architecture"), backbone_arch(cfg)
        if want != got:
            keys = sorted(k for k in set(want or {}) | set(got) if (want or {}).get(k) != got.get(k))
            raise BadInputError(what, f"{record} records weights for the architecture {want}, but the model being built "
                                      f"is {got} (differs in {keys})",
                                f"set model.backbone_weights={RANDOM} to train this model from scratch, or pretrain a backbone "
                                "for it: python -m jobs.pretrain_backbone --set seg_config=<its seg config>")
    return path


def _bn_relu_conv(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet feature extractor returning (layer1, layer4) features; torchvision key names, no fc."""

    ignored_prefixes = ("fc.",)  # torchvision's classifier: not part of the backbone

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], width: int = 64,
                 output_stride: int = 16, stem_pool: bool = True, multi_grid: list[int] | None = None) -> None:
        super().__init__()
        dilate = {16: (False, False, True), 8: (False, True, True)}[output_stride]
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # Without the stem's max-pool every stride halves (output_stride 8 -> 4): for 32-px
        # images, whose objects are a few px wide, the deep features stay 8x8 instead of 4x4.
        self.maxpool = nn.MaxPool2d(3, 2, padding=1) if stem_pool else nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2, dilate[2], multi_grid)
        self.low_channels, self.out_channels = width * block.expansion, width * 8 * block.expansion
        for m in self.modules():  # torchvision's init; matters when training from scratch (tiny)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    multi_grid: list[int] | None = None) -> nn.Sequential:
        """torchvision's stage: the first block keeps the previous stage's dilation, the others take
        this stage's. With ``multi_grid`` (the paper's ``_make_MG_unit``) block ``i`` is dilated at
        this stage's rate x ``multi_grid[i]`` instead."""
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        dilations = [previous] + [self.dilation] * (blocks - 1)
        if multi_grid:
            dilations = [self.dilation * g for g in multi_grid]
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False), nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, dilations[0])]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=d) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch."""

    def __init__(self, cin: int, cout: int, rates: list[int], dropout: float = 0.1, align_corners: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_bn_relu_conv(cin, cout, 1)] + [_bn_relu_conv(cin, cout, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _bn_relu_conv(cin, cout, 1))
        self.project = nn.Sequential(_bn_relu_conv(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        feats.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners))
        return self.project(torch.cat(feats, 1))


def _decoder(cin: int, cout: int, dropout: list[float]) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU blocks, each followed by a dropout when ``dropout`` gives its rate
    (the paper: 0.5 and 0.1); without rates the module list (and its state-dict keys) is the
    two blocks alone, as checkpoints made before the option have it."""
    convs = [_bn_relu_conv(cin, cout, 3), _bn_relu_conv(cout, cout, 3)]
    if not dropout:
        return nn.Sequential(*convs)
    return nn.Sequential(*(m for conv, p in zip(convs, dropout) for m in (conv, nn.Dropout(p))))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: ASPP on the deep features, decoder fusing stride-4 low-level features."""

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, cfg.aspp_channels, list(cfg.aspp_rates), cfg.aspp_dropout, cfg.align_corners)
        low_proj = max(8, cfg.aspp_channels * 48 // 256)  # 48 for the standard 256-channel head
        self.low_proj = _bn_relu_conv(backbone.low_channels, low_proj, 1)
        self.decoder = _decoder(cfg.aspp_channels + low_proj, cfg.aspp_channels, list(cfg.decoder_dropout))
        self.classifier = nn.Conv2d(cfg.aspp_channels, num_classes, 1)
        self.align_corners = cfg.align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        y = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        y = self.classifier(self.decoder(torch.cat([y, self.low_proj(low)], 1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at ``lr``, the freshly initialised head at ``lr * head_lr_mult`` (DeepLab recipe)."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"params": list(self.backbone.parameters()), "lr": lr}, {"params": head, "lr": lr * head_lr_mult}]


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a torchvision-style ResNet or MobileNet-v2 state dict from a local file (the
    classifier, and whatever else the backbone's ``ignored_prefixes`` name, left out).

    safetensors is read with ``safetensors.torch.load_file``; ``.pth``/``.pt`` only with
    ``torch.load(weights_only=True)`` so a checkpoint can never run code.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise BadInputError(str(path), f"cannot read backbone weights: {exc}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith(backbone.ignored_prefixes)}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise BadInputError(
            str(path),
            f"not a matching {type(backbone).__name__} state dict: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}",
            "use torchvision's resnet50 / resnet101 / mobilenet_v2 ImageNet weights for the chosen model",
        )
    backbone.load_state_dict(state)


def build_backbone(cfg: ModelConfig) -> ResNet | MobileNetV2:
    """The configured backbone, randomly initialised (``cfg.backbone_weights`` not read)."""
    if cfg.name == "tiny":
        return ResNet(BasicBlock, [1, 1, 1, 1], width=cfg.width, output_stride=cfg.output_stride, stem_pool=cfg.stem_pool,
                      multi_grid=list(cfg.multi_grid))
    if cfg.name == "deeplabv3plus_mobilenet":
        return MobileNetV2(cfg.output_stride)
    layers = [3, 4, 6, 3] if cfg.name.endswith("resnet50") else [3, 4, 23, 3]
    return ResNet(Bottleneck, layers, width=64, output_stride=cfg.output_stride, multi_grid=list(cfg.multi_grid))


def build_model(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    """The configured network with ``num_classes`` outputs (backbone weights loaded when given)."""
    backbone = build_backbone(cfg)
    path = backbone_weights_file(cfg)
    if path is not None:
        load_backbone_weights(backbone, path)
    return DeepLabV3Plus(backbone, num_classes, cfg)
