"""Evaluation of a trained row: verification and timing, cached per (model, pairs) so a resumed study does not repeat them."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ppfr.study.config import StudyConfig


def median_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up (lazy extension loads, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def cost(method, images: torch.Tensor) -> dict[str, float]:
    """Client and server milliseconds per image (median of 3 batches) and payload bytes per image."""
    g = torch.Generator().manual_seed(0)
    payload = method.protect(images, generator=g)
    n = images.shape[0]
    client = median_time(lambda: method.protect(images, generator=torch.Generator().manual_seed(0)))
    server = median_time(lambda: method.recognize(payload))
    return {"client_ms": 1000 * client / n, "server_ms": 1000 * server / n,
            "payload_bytes": payload.nbytes_per_sample()}  # fmt: skip


@torch.no_grad()
def verify(method, cfg: StudyConfig) -> dict[str, Any]:
    """10-fold verification of the trained method, plain and with flip TTA through its client (the flipped image is
    protected and recognised), both from one pass: ``embed_source`` embeds each image as [e(x), e(flip x)]."""
    from ppfr.eval.verification import embed_source, open_pairs, ten_fold

    def both_views(x: torch.Tensor) -> torch.Tensor:  # the client's secrets are fixed: both views get the same draw
        # each view normalised before the sum (``ppfr eval`` sums the raw views; docs/results.md used this rule)
        views = [F.normalize(method.embed(v, generator=torch.Generator().manual_seed(0)).float(), dim=1)
                 for v in (x, x.flip(-1))]  # fmt: skip
        return torch.cat(views, dim=1)

    src, pairs = open_pairs(cfg.pairs, cfg.image_root)
    emb, _ = embed_source(both_views, src)
    d = emb.shape[1] // 2
    out = {}
    # a common positive scale of both halves (embed_source's normalisation) cancels in each normalisation below
    for key, e in (("plain", emb[:, :d]), ("flip", emb[:, :d] + emb[:, d:])):
        e = F.normalize(e, dim=1)
        r = ten_fold((e[pairs[:, 2]] * e[pairs[:, 3]]).sum(1).numpy(), pairs[:, 1].astype(bool), pairs[:, 0])
        out[key] = {"accuracy": r.accuracy, "std": r.std, "auc": r.auc, "threshold": r.threshold, "pairs": r.pairs}
    return out


def _verify_key(cfg: StudyConfig, model_pt: Path) -> dict[str, Any]:
    import hashlib

    digest = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    return {"model_sha256": digest, "pairs": str(cfg.pairs), "image_root": cfg.image_root and str(cfg.image_root)}


def cached_verification(cfg: StudyConfig, model_pt: Path, tag: str, key: dict[str, Any] | None = None
                        ) -> dict[str, Any] | None:  # fmt: skip
    """The result ``verify_cached`` kept for this model and these pairs, or None (absent, stale or torn).
    ``key``: the model's :func:`_verify_key` when the caller has it (the model file is hashed once)."""
    path = model_pt.parent / f"verify_{tag}.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    key = key or _verify_key(cfg, model_pt)
    ok = isinstance(old, dict) and old.get("key") == key and isinstance(old.get("result"), dict)
    return old["result"] if ok else None


def verify_tags(cfg: StudyConfig) -> list[tuple[StudyConfig, str]]:
    """The verifications every trained run gets: ``--pairs`` and, with held-out identities, their pairs."""
    tags = [(cfg, "pairs")]
    if cfg.holdout_pairs:
        tags.append((dataclasses.replace(cfg, pairs=cfg.holdout_pairs, image_root=None), "holdout"))
    return tags


def verify_cached(method, cfg: StudyConfig, model_pt: Path, tag: str) -> dict[str, Any]:
    """:func:`verify`, kept in ``<run dir>/verify_<tag>.json`` with the SHA-256 of ``model_pt`` and the pairs it
    read: a resumed study re-evaluates a reused model only when the model or the pairs changed."""
    key = _verify_key(cfg, model_pt)
    hit = cached_verification(cfg, model_pt, tag, key)
    if hit is not None:
        return hit
    path = model_pt.parent / f"verify_{tag}.json"
    result = verify(method, cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    os.replace(tmp, path)
    return result


def load_rgb(cfg: StudyConfig, n: int) -> torch.Tensor:
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader

    loader = make_loader(DataConfig(source=cfg.data, backend="torch", batch_size=n, train=False, num_workers=0,
                                    world_size=1, rank=0))  # fmt: skip
    return next(iter(loader))[0]
