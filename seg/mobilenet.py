"""MobileNet-v2 backbone for DeepLabV3+, as in the RLoss code the paper trains with.

The paper's segmentation runs (its ``run_exp.sh``) use ``--backbone mobilenet``: the
inverted-residual MobileNet-v2 whose stride-4 output (``features[:4]``, 24 channels) feeds
the decoder and whose last block (``features[4:]``, 320 channels) feeds ASPP; output stride
16 or 8 turns the later strides into dilation. Module names follow torchvision's
``mobilenet_v2`` (``features.3.conv.1.0.weight``...) so its ImageNet state dict loads from
a local file; torchvision's final 1x1 conv to 1280 channels (``features.18``) and its
``classifier`` are not part of the backbone and are ignored when loading.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, channels c, repeats n, stride s): torchvision's / the paper's table.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` layout: indices 0 (conv), 1 (BN), 2 (ReLU6)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=dilation * (k - 1) // 2, dilation=dilation, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3, strided or dilated), project (1x1, linear); residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNet-v2 feature extractor returning (stride-4 low-level, deep) features."""

    ignored_prefixes = ("classifier.", "features.18.")  # torchvision parts DeepLab does not use

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        cin, current, rate = 32, 2, 1
        for t, c, n, s in SETTINGS:
            if current == output_stride:  # deep enough: keep the resolution, widen the receptive field
                stride, dilation, rate = 1, rate, rate * s
            else:
                stride, dilation, current = s, 1, current * s
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, stride if i == 0 else 1, dilation, t))
                cin = c
        self.features = nn.Sequential(*blocks)
        self.low_channels, self.out_channels = 24, 320
        for m in self.modules():  # torchvision's init (matters without ImageNet weights)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.features[:4](x)
        return low, self.features[4:](low)
