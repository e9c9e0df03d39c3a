"""IR ("improved residual") backbones of ArcFace/TFace/AdaFace (METHODS.md §1.3).

Module names follow TFace's ``model_irse`` and AdaFace's ``net.py`` (``input_layer``, ``body.<i>.res_layer`` /
``shortcut_layer``, ``output_layer``), so their checkpoints load without key surgery (see ppfr.models.checkpoints).
``body`` is one flat ``nn.Sequential`` of units: the methods hook the last unit of each stage through
``forward(x, inject=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 101: (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)


def init_weights(module: nn.Module) -> None:
    """TFace init (METHODS §1.3): Kaiming-normal (fan_out, relu) conv/linear weights, zero biases; BN 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlockIR(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a (strided) shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False),
            nn.BatchNorm2d(depth),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRNet(nn.Module):
    """IR-18/34/50/100 for 112 x 112 inputs with any number of input channels.

    Args:
        depth: 18, 34, 50 or 100 (101 is an alias, as in TFace's ``IR_101``).
        in_channels: 3 (RGB), 27 (PartialFace), 30 / 162 (DuetFace client / server), 192 (ArcFace-FD, MinusFace r).
        embedding_size: output dimension (512).
        input_size: spatial size (112; the output layer assumes 112 / 16 = 7).
    Forward:
        x (B, in_channels, 112, 112) -> (B, embedding_size) embedding (not normalised).
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.4, base_width: int = 64) -> None:  # fmt: skip
        super().__init__()
        if depth not in UNITS:
            raise ValueError(f"IR depth must be one of {sorted(UNITS)}, got {depth}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        self.depth, self.in_channels, self.input_size = depth, in_channels, input_size
        # base_width 64 is the standard net; smaller widths make the CPU-scale "tiny" models of configs/*_tiny.yaml
        self.widths = tuple(base_width * k for k in (1, 2, 4, 8))
        w0 = self.widths[0]
        self.input_layer = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.PReLU(w0))
        units, in_ch = [], w0
        self.stage_ends: list[int] = []
        for n, width in zip(UNITS[depth], self.widths):
            for i in range(n):
                units.append(BasicBlockIR(in_ch, width, 2 if i == 0 else 1))
                in_ch = width
            self.stage_ends.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        side = input_size // 16
        wl = self.widths[-1]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(wl), nn.Dropout(dropout), nn.Flatten(), nn.Linear(wl * side * side, embedding_size),
            nn.BatchNorm1d(embedding_size, affine=False),
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self)

    def stage_shapes(self) -> tuple[tuple[int, int], ...]:
        """(channels, side) of the four stage outputs ``inject`` sees: (w, S/2), (2w, S/4), (4w, S/8), (8w, S/16)."""
        return tuple((c, self.input_size // 2 ** (i + 1)) for i, c in enumerate(self.widths))

    def forward(self, x: torch.Tensor, inject: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``inject(stage, h) -> h`` runs after the last unit of each stage (0..3): DuetFace / PRO-Face C hooks."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"IR-{self.depth} expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.input_layer(x)
        stage = 0
        for i, unit in enumerate(self.body):
            h = unit(h)
            if inject is not None and stage < 4 and i == self.stage_ends[stage]:
                h = inject(stage, h)
                stage += 1
        return self.output_layer(h)


def ir_net(depth: int, in_channels: int = 3, embedding_size: int = 512) -> IRNet:
    return IRNet(depth=depth, in_channels=in_channels, embedding_size=embedding_size)
