"""MobileFaceNet (METHODS.md §1.3) and the DuetFace / PRO-Face C client variant (§3.3, §6.3)."""

from __future__ import annotations

import torch
from torch import nn

from ppfr.models.ir import init_weights as _init


class ConvBlock(nn.Sequential):
    """Conv -> BN (-> PReLU)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, p: int = 0, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """1x1 expand (BN, PReLU) -> depthwise 3x3 (stride; BN, PReLU) -> 1x1 project (BN), optional identity."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, residual: bool = False) -> None:
        super().__init__()
        self.conv = ConvBlock(cin, groups, 1)
        self.conv_dw = ConvBlock(groups, groups, 3, stride, 1, groups=groups)
        self.project = ConvBlock(groups, cout, 1, act=False)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Residual(nn.Sequential):
    def __init__(self, c: int, num_block: int, groups: int) -> None:
        super().__init__(*[DepthWise(c, c, 1, groups, residual=True) for _ in range(num_block)])


def _body() -> list[tuple[str, nn.Module]]:
    """The 8 body modules in order, with the 112 -> 56 stem in front of them."""
    return [
        ("conv2_dw", ConvBlock(64, 64, 3, 1, 1, groups=64)),
        ("conv_23", DepthWise(64, 64, 2, 128)),  # -> 64 @ 28
        ("conv_3", Residual(64, 4, 128)),
        ("conv_34", DepthWise(64, 128, 2, 256)),  # -> 128 @ 14
        ("conv_4", Residual(128, 6, 256)),
        ("conv_45", DepthWise(128, 128, 2, 512)),  # -> 128 @ 7
        ("conv_5", Residual(128, 2, 256)),
        ("conv_6_sep", ConvBlock(128, 512, 1)),  # -> 512 @ 7
    ]


class MobileFaceNet(nn.Module):
    """MobileFaceNet with the GDC head: (B, 3, 112, 112) -> (B, 512)."""

    def __init__(self, in_channels: int = 3, embedding_size: int = 512) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_channels, 64, 3, 2, 1)
        for name, mod in _body():
            self.add_module(name, mod)
        self.output_layer = nn.Sequential(
            ConvBlock(512, 512, 7, 1, 0, groups=512, act=False), nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size, affine=False),
        )  # fmt: skip
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for name, _ in _body():
            x = getattr(self, name)(x)
        return self.output_layer(x)


class ClientMobileFaceNet(nn.Module):
    """The client network of DuetFace (30 DCT channels in) and PRO-Face C (3-channel residual in).

    Stem Conv3x3(in -> 64, stride 2) + BN + PReLU; body ``body_0 .. body_7`` (conv2_dw .. conv_6_sep); output
    depthwise 7x7 -> BN2d -> Flatten -> Linear(512 -> 512, bias) -> BN1d(affine). Forward returns the embedding and
    the four tapped feature maps: body_1 (64 @ 28), body_3 (128 @ 14), body_5 (128 @ 7), body_7 (512 @ 7).
    """

    TAPS = (1, 3, 5, 7)
    TAP_SHAPES = ((64, 28), (128, 14), (128, 7), (512, 7))

    def __init__(self, in_channels: int = 30, embedding_size: int = 512, with_embedding: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_channels, 64, 3, 2, 1)
        for i, (_, mod) in enumerate(_body()):
            self.add_module(f"body_{i}", mod)
        # PRO-Face C computes the client embedding but never uses it in a loss: with_embedding=False drops it.
        self.output_layer = nn.Sequential(
            nn.Conv2d(512, 512, 7, 1, 0, groups=512, bias=False), nn.BatchNorm2d(512), nn.Flatten(),
            nn.Linear(512, embedding_size), nn.BatchNorm1d(embedding_size),
        ) if with_embedding else None  # fmt: skip
        _init(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        x = self.conv1(x)
        taps = []
        for i in range(8):
            x = getattr(self, f"body_{i}")(x)
            if i in self.TAPS:
                taps.append(x)
        return (self.output_layer(x) if self.output_layer is not None else None), taps
