"""The MinusFace generator: a plain U-Net on DCT channels (METHODS.md §5.2).

Encoder ConvBlocks (two Conv3x3 + ReLU, with bias) of widths w, 2w, 4w, 8w, 16w with MaxPool2 between
(112 -> 56 -> 28 -> 14 -> 7); decoder ConvTranspose3x3 (stride 2, pad 1, output_padding 1) halving the width,
concatenated skip, ConvBlock; final Conv1x1 -> out_channels. No normalisation, no output activation.
``base_width=64`` is the released code's full size (~34.6 M parameters for 192 -> 192); the paper speaks of a
"reduced-scale" U-Net without giving widths, so ``base_width`` is the reduced-width option (e.g. 16 or 32).
"""

from __future__ import annotations

import torch
from torch import nn


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1),
                         nn.ReLU(inplace=True))  # fmt: skip


class UNet(nn.Module):
    """(B, in_channels, H, W) -> ((B, out_channels, H, W), latent (B, 16 w, H/16, W/16)); H, W multiples of 16."""

    def __init__(self, in_channels: int = 192, out_channels: int = 192, base_width: int = 64) -> None:
        super().__init__()
        w = [base_width * 2**i for i in range(5)]
        self.enc = nn.ModuleList([_DoubleConv(in_channels, w[0])] + [_DoubleConv(w[i], w[i + 1]) for i in range(4)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 3, 2, 1, output_padding=1) for i in reversed(range(4))])
        self.dec = nn.ModuleList([_DoubleConv(2 * w[i], w[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        h = x
        for i, block in enumerate(self.enc):
            h = block(h)
            if i < 4:
                skips.append(h)
                h = self.pool(h)
        latent = h
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            h = dec(torch.cat([up(h), skip], dim=1))
        return self.head(h), latent
