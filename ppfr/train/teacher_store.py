"""The teacher's embeddings of a whole training set, computed once per (teacher, dataset) and kept on disk.

Distillation (``distill:``, :class:`ppfr.train.transfer.Distiller`) needs the teacher's embedding of every clean
face the loader yields, each (image, flip) once. Computed inside the steps, the teacher's forward is paid in the
first epoch of every run, and every row of a study pays it again for the same faces: on 2 cores it made
``arcface_transfer``'s end-to-end training 1.52x slower than its bare step (benchmarks/bench_train_e2e.py). Here
the set is embedded once, before the first step, every image unflipped and mirrored, through the training loader's
own decode path (so each key is the exact bytes a training batch carries), and stored as

    ``<cache>/teacher/<teacher digest>-<dataset digest>.pt``: {"keys": (N, 16) uint8, "emb": (N, D) float32}

``<cache>`` is ``$PPFR_CACHE_DIR`` or ``~/.cache/ppfr``. Later runs on the same data with the same teacher load it
in well under a second. A stale or foreign file cannot give a wrong target: every entry is keyed by the BLAKE2 of
its image's float32 bytes (:func:`ppfr.train.transfer.image_keys`), so a changed image is simply a miss, computed
in the step as before. The file is written atomically with a SHA-256 sidecar and read with ``weights_only``
(:func:`ppfr.models.checkpoints.safe_load`); a corrupt one is logged, ignored and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ppfr.data.config import DataConfig

STORE_VERSION = 1


def store_dir() -> Path:
    """``$PPFR_CACHE_DIR/teacher`` or ``~/.cache/ppfr/teacher``."""
    root = os.environ.get("PPFR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "ppfr") / "teacher"


def module_digest(module: nn.Module) -> str:
    """BLAKE2 of a module's parameters and buffers (names, dtypes, shapes, bytes): the teacher's identity."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)  # a 0-d buffer cannot be viewed as bytes
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(data: DataConfig) -> str:
    """Which dataset a store belongs to: the source (resolved) and what shapes its decoded images. The keys inside
    are per image content, so this only picks the file; it never decides whether an entry is right."""
    src = data.source if data.source == "synthetic" else str(Path(data.source).resolve())
    what = f"v{STORE_VERSION}|{src}|{data.data_root}|{data.image_size}|{data.decoder}|{data.backend}"
    return hashlib.blake2b(what.encode(), digest_size=16).hexdigest()


def load_store(path: Path, log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(keys (N, 16) uint8, emb (N, D) float32) from ``path``, or None (absent, or unreadable: said in the log)."""
    from ppfr.models.checkpoints import CheckpointError, safe_load

    if not path.is_file():
        return None
    try:
        obj = safe_load(path)
        keys, emb = obj["keys"], obj["emb"]
        ok = (keys.dtype == torch.uint8 and keys.ndim == 2 and keys.shape[1] == 16 and emb.dtype == torch.float32
              and emb.ndim == 2 and emb.shape[0] == keys.shape[0])  # fmt: skip
    except (CheckpointError, KeyError, AttributeError) as exc:
        log(f"distill: ignoring the teacher store {path} ({exc}); rebuilding it")
        return None
    if not ok:
        log(f"distill: ignoring the teacher store {path} (unexpected shapes or dtypes); rebuilding it")
        return None
    return keys, emb


def precompute(distiller, data: DataConfig, log: Callable[[str], None], write: bool = True) -> None:
    """Fill ``distiller.cache`` with the teacher's embedding of every image of ``data`` and of its mirror: from the
    store when there is one, else by one pass of the loader per flip (then saved, when ``write``: the main rank).

    The loader is the training one with shuffling and flips off, one shard and every sample kept, so its images
    (and their mirrors) are byte-identical to what training batches hold. The distiller's hit/miss counters start from zero after."""
    from ppfr.data.loader import make_loader
    from ppfr.models.checkpoints import save_checkpoint

    if distiller.cache is None or data.source == "synthetic" or data.backend == "synthetic":
        return  # no cache asked for, or no dataset on disk (a synthetic batch is cheap to embed in the step)
    path = store_dir() / f"{module_digest(distiller.teacher_module)}-{data_digest(data)}.pt"
    t0 = time.perf_counter()
    stored = load_store(path, log)
    if stored is not None:
        for k, e in zip(stored[0].numpy(), stored[1]):
            distiller.cache[k.tobytes()] = e
        log(f"distill: {len(stored[0])} teacher embeddings loaded from the store ({time.perf_counter() - t0:.1f} s)")
    else:
        cfg = dataclasses.replace(data, train=False, shuffle=False, flip=False, world_size=1, rank=0,
                                  last_batch="partial")  # fmt: skip
        loader = make_loader(cfg)
        n = 0
        for i, (images, _) in enumerate(loader):
            images = images.to(distiller.device)
            # the loader's flip mirrors the decoded pixels before its elementwise normalisation, so mirroring the
            # normalised batch gives the same float bytes (its ``flip`` option draws at random: no use here)
            distiller.teacher_embeddings(torch.cat([images, images.flip(-1)]))
            n += 2 * images.shape[0]
            if i % 20 == 0 or i == len(loader) - 1:
                log(f"distill: embedding the training set (and its mirror) with the teacher once: "
                    f"{i + 1}/{len(loader)} batches")  # fmt: skip
        if write:
            keys = list(distiller.cache)
            save_checkpoint({"keys": torch.from_numpy(np.frombuffer(b"".join(keys), np.uint8).reshape(-1, 16).copy()),
                             "emb": torch.stack([distiller.cache[k] for k in keys]).float(),
                             "version": STORE_VERSION}, path)  # fmt: skip
        log(f"distill: {n} images embedded by the teacher in {time.perf_counter() - t0:.1f} s"
            + (f", stored for later runs in {path}" if write else ""))  # fmt: skip
    distiller.hits = distiller.misses = 0
