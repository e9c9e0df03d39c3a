"""Smooth face-like test images: the embedded input of ``ppfr demo``, the export parity check and the tests."""

from __future__ import annotations

import torch


def synthetic_faces(n: int, size: int = 112, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float32 face-like images in [-1, 1]: a skin-toned ellipse, eyes, mouth, noise.

    Deterministic for a given ``seed`` (a private ``torch.Generator``; the global RNG is untouched).
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = []
    for _ in range(n):
        r = torch.rand(6, generator=g)
        face = ((xx / (0.62 + 0.1 * r[0])) ** 2 + (yy / (0.8 + 0.1 * r[1])) ** 2 < 1).float()
        eyes = sum(torch.exp(-((xx - s * (0.3 + 0.05 * r[2])) ** 2 + (yy + 0.2) ** 2) / 0.005) for s in (-1, 1))
        mouth = torch.exp(-((xx / 0.25) ** 2 + ((yy - 0.45 - 0.05 * r[3]) / 0.05) ** 2))
        tone = torch.tensor([0.85, 0.65, 0.55]) * (0.8 + 0.4 * r[4])
        img = (
            face[None] * tone[:, None, None]
            - 0.6 * eyes[None]
            - 0.4 * mouth[None] * torch.tensor([0.2, 1, 1])[:, None, None]
        )
        img = img + 0.15 * (1 - face[None]) * r[5] + 0.02 * torch.randn(3, size, size, generator=g)
        imgs.append(img.clamp(0, 1) * 2 - 1)
    return torch.stack(imgs)
