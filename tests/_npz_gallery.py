"""A legacy ``gallery.npz`` for the importer's tests: ppfr no longer writes this format (it only imports it), so the
tests write it themselves, exactly as the old single-file gallery did (ppfr-gallery version 1)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ppfr.deploy.protocol import l2_normalize


def write_npz_gallery(folder: Path, method: str, items: dict[str, np.ndarray]) -> Path:
    """Write ``folder/gallery.npz`` holding ``items`` (name -> (n_i, D) embeddings, n_i >= 1); return its path.

    As the old gallery stored them: rows L2-normalised by the one rule (``l2_normalize``), float32, grouped by
    identity in ``items``' order; labels (N,) int64; the JSON header as uint8 bytes.
    """
    names = list(items)
    emb = np.concatenate([l2_normalize(items[n]) for n in names]).astype(np.float32)
    labels = np.concatenate([np.full(len(items[n]), i, np.int64) for i, n in enumerate(names)])
    meta = {"format": "ppfr-gallery", "version": 1, "method": method, "embedding_size": int(emb.shape[1]),
            "names": names}  # fmt: skip
    buf = io.BytesIO()
    np.savez(buf, embeddings=emb, labels=labels, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gallery.npz"
    path.write_bytes(buf.getvalue())
    return path
