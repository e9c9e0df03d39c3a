"""Tiny face-like image folders for tests that need real files on disk (a loader, a scan, a store keyed by them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_faces(root: Path, ids: list[str], per_id: int, seed: int) -> None:
    """Per identity a smooth random pattern, per face that pattern plus noise: 112 x 112 PNGs in root/<id>/."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for i in ids:
        (root / i).mkdir(parents=True)
        base = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        for k in range(per_id):
            small = np.clip(base.astype(int) + g.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(root / i / f"{k}.png")
