"""ResNet stem for hybrid ViTs (paper §3.1): GroupNorm + weight-standardised convs, 'SAME' padding.

Mirrors ``vit_jax/models_resnet.py`` of the original code (``conv_root``/``gn_root``, ``block{i}/unit{j}``
with ``conv1..3``/``gn1..3`` and ``conv_proj``/``gn_proj``), so .npz checkpoints map one-to-one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig
from .layers import lecun_normal_

GN_GROUPS = 32  # flax nn.GroupNorm default
GN_EPS = 1e-6  # flax nn.GroupNorm default
WS_EPS = 1e-5  # original weight_standardize: (w - mean) / (std + eps)


def _same_pad_amounts(size: int, k: int, s: int) -> tuple[int, int]:
    """TF/flax 'SAME': output ceil(size/s); the extra pixel (odd total) goes to the bottom/right."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = _same_pad_amounts(x.shape[-2], k, s)
    left, right = _same_pad_amounts(x.shape[-1], k, s)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class StdConv2d(nn.Conv2d):
    """Bias-free conv whose kernel is standardised per output channel on every call (Kolesnikov et al., BiT)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1) -> None:
        # Stride-1 odd kernels: symmetric padding equals 'SAME', so let the conv do it (no extra copy).
        padding = kernel_size // 2 if stride == 1 and kernel_size % 2 else 0
        super().__init__(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self._same = not (stride == 1 and kernel_size % 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / (std + WS_EPS)
        if self._same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride, self.padding)


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(GN_GROUPS, c, eps=GN_EPS)


class Bottleneck(nn.Module):
    """Post-activation bottleneck unit ``relu(proj(x) + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x)))))))))``."""

    def __init__(self, cin: int, features: int, stride: int) -> None:
        super().__init__()
        cout = 4 * features
        self.conv1, self.gn1 = StdConv2d(cin, features, 1), _gn(features)
        self.conv2, self.gn2 = StdConv2d(features, features, 3, stride), _gn(features)
        self.conv3, self.gn3 = StdConv2d(features, cout, 1), _gn(cout)
        self.conv_proj: StdConv2d | None = None
        self.gn_proj: nn.GroupNorm | None = None
        if cin != cout or stride != 1:
            self.conv_proj, self.gn_proj = StdConv2d(cin, cout, 1, stride), _gn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.conv_proj is not None:
            residual = self.gn_proj(self.conv_proj(x))
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, StdConv2d):
                lecun_normal_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last norm's scale: each unit starts as (projected) identity, as in the original.
        nn.init.zeros_(self.gn3.weight)


class ResNetBackbone(nn.Module):
    """Root (7×7/2 conv, GN, ReLU, 3×3/2 max-pool) followed by bottleneck stages; total stride ``cfg.stride``."""

    def __init__(self, cfg: HybridConfig, in_chans: int) -> None:
        super().__init__()
        w = cfg.width
        self.conv_root = StdConv2d(in_chans, w, 7, stride=2)
        self.gn_root = _gn(w)
        stages, cin = [], w
        for i, n in enumerate(cfg.layers):
            feats = w * 2**i
            first_stride = 2 if i > 0 else 1  # stage 1 keeps the max-pool's resolution
            units = [Bottleneck(cin if j == 0 else 4 * feats, feats, first_stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*units))
            cin = 4 * feats
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)
        for stage in self.stages:
            x = stage(x)
        return x

    def init_weights(self) -> None:
        lecun_normal_(self.conv_root.weight)
        nn.init.ones_(self.gn_root.weight)
        nn.init.zeros_(self.gn_root.bias)
        for stage in self.stages:
            for unit in stage:
                unit.init_weights()


class HybridEmbed(nn.Module):
    """ResNet feature map → conv with kernel = stride = ``patch_size / backbone stride`` (1×1 for R50+B/16)."""

    def __init__(self, cfg: HybridConfig, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(cfg, in_chans)
        k = patch_size // cfg.stride
        self.proj = nn.Conv2d(self.backbone.out_channels, width, kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)

    def init_weights(self) -> None:
        self.backbone.init_weights()
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
