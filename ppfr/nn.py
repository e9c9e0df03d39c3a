"""nn.Module wrappers of the ops, for building models (same semantics and arguments as ppfr.ops)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ppfr.ops._validate import as_index
from ppfr.ops.freq import ChannelsLike, freq_decode, freq_encode, freq_hflip


class FreqEncode(nn.Module):
    """e(X) as a module: (B, 3, H, W) in [-1, 1] -> (B, K, H, W); fixed ``channels`` (or all 192)."""

    def __init__(self, channels: ChannelsLike = None, backend: str = "auto") -> None:
        super().__init__()
        ch = None if channels is None else as_index("channels", channels, torch.device("cpu"))
        self.register_buffer("channels", ch, persistent=False)
        self.backend = backend

    def forward(self, x: torch.Tensor, channels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return freq_encode(x, self.channels if channels is None else channels, backend=self.backend)


class FreqDecode(nn.Module):
    """d(x) as a module: (B, K, H, W) coefficients -> (B, 3, H, W) RGB in [0, 1]."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, f: torch.Tensor, channels: ChannelsLike = None, perm: ChannelsLike = None) -> torch.Tensor:
        return freq_decode(f, channels, perm, backend=self.backend)


class FreqHFlip(nn.Module):
    """Horizontal flip in the frequency domain (flip test-time augmentation)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(self, f: torch.Tensor, channels: ChannelsLike = None) -> torch.Tensor:
        return freq_hflip(f, channels, backend=self.backend)
