"""What an attack run leaves: the scoring path of every kind that outputs faces, ``<out>/<target>/result.json``
(one section per kind, schema in docs/attack.md) and the picture grid (a row per attack).

* :func:`score_images` -- SSIM, PSNR and re-identification by the judge of recovered faces.
* :func:`merge_result`, :func:`result_path`, :data:`RESULT_KEYS` -- the result file, merged across invocations.
* :func:`visualise_payload`, :func:`save_grid` -- what the wire shows, and the PNG grid.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.data.sources import PairSource
from ppfr.eval.attacks.common import AttackContext, Target
from ppfr.eval.attacks.judge import pair_verification
from ppfr.eval.image_metrics import psnr, ssim
from ppfr.eval.verification import VerificationResult
from ppfr.methods.base import Payload, TensorSpec

# Every kind's section of result.json carries these keys (None where they do not apply to the kind).
RESULT_KEYS = ("ssim", "psnr", "reid_acc", "linkage_top1", "linkage_topk", "tar_at_fmr", "key_recovery", "n_faces",
               "time_s")  # fmt: skip


def visualise_payload(payload: Payload, spec: dict[str, TensorSpec] | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: what the wire shows, for the PNG grid.

    A tensor named ``image`` with 3 channels (arcface, MinusFace's X_p, PRO-Face C's blurred image) is shown as it
    is, mapped from its declared range ([-1, 1] or [0, 1]) to [0, 1]. Otherwise the first 3 channels of the first
    tensor (1 channel repeated), each min-max stretched per image -- raw DCT coefficients have no display range.
    """
    t = payload.tensors.get("image")
    if t is not None and t.shape[1] == 3:
        lo = spec["image"].low if spec and "image" in spec and spec["image"].low is not None else float(t.min())
        hi = spec["image"].high if spec and "image" in spec and spec["image"].high is not None else float(t.max())
        return ((t.float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    first = next(iter(payload.tensors.values())).float()
    x = first[:, :3] if first.shape[1] >= 3 else first[:, :1].expand(-1, 3, -1, -1)
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def save_grid(rows: Iterable[torch.Tensor], path: Path) -> None:
    """Write rows of (N, 3, H, W) images in [0, 1] as one PNG (rows stacked vertically, 2 px white gutters)."""
    from PIL import Image

    rows = list(rows)
    n, _, h, w = rows[0].shape
    gut = 2
    canvas = torch.ones(3, len(rows) * (h + gut) - gut, n * (w + gut) - gut)
    for r, row in enumerate(rows):
        for c in range(n):
            canvas[:, r * (h + gut) : r * (h + gut) + h, c * (w + gut) : c * (w + gut) + w] = row[c].clamp(0, 1)
    arr = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _finite(v: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _vr(r: VerificationResult | None) -> dict | None:
    return None if r is None else {"accuracy": r.accuracy, "std": r.std, "threshold": r.threshold, "auc": r.auc,
                                   "pairs": r.pairs}  # fmt: skip


@torch.no_grad()
def score_images(ctx: AttackContext, recovered: torch.Tensor) -> dict[str, Any]:
    """The scoring path of every kind that outputs faces: ``recovered`` (N, 3, H, W) in [0, 1], row i the attack's
    recovery of ``ctx.val`` face i. SSIM / PSNR against the originals, and re-identification: the judge's 10-fold
    verification accuracy on the recovered faces (held-out pairs), beside the judge on the originals."""
    ssims, psnrs, embs = [], [], []
    bs = ctx.cfg.eval_batch_size
    for start in range(0, len(ctx.val), bs):
        idx = torch.arange(start, min(start + bs, len(ctx.val)))
        target = ctx.val.batch(idx) * 0.5 + 0.5
        rec = recovered[idx].float()
        ssims.append(ssim(rec, target).cpu())
        psnrs.append(psnr(rec, target).cpu())
        if ctx.judge is not None:
            embs.append(F.normalize(ctx.judge.embed((rec * 2 - 1).to(ctx.device)).float(), dim=1).cpu())
    s, p = torch.cat(ssims).numpy(), torch.cat(psnrs).numpy()
    out: dict[str, Any] = {"ssim": float(s.mean()), "ssim_std": float(s.std()), "psnr": float(p.mean()),
                           "psnr_std": float(p.std()), "psnr_median": float(np.median(p)), "reid_acc": None,
                           "reid": None, "n_faces": len(ctx.val)}  # fmt: skip
    if ctx.judge is not None and isinstance(ctx.val.source, PairSource):
        rec_vr = pair_verification(torch.cat(embs), ctx.val.labels, ctx.val.source.pairs)
        out["reid_acc"] = rec_vr.accuracy
        out["reid"] = {"judge": ctx.judge.name, "recovered": _vr(rec_vr), "original": _vr(ctx.judge_original)}
    return out


def result_path(out_dir: Path, label: str) -> Path:
    return Path(out_dir) / label / "result.json"


def merge_result(out_dir: Path | None, target: Target, sections: dict[str, dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Merge ``{kind: section}`` into ``<out>/<label>/result.json`` (kinds run in separate invocations accumulate;
    a kind run again replaces its own section). Written atomically. Returns the whole result."""
    base: dict[str, Any] = {"label": target.label, "target": target.spec, "method": target.method.name,
                            "trained": target.trained, "method_options": target.options, "kinds": {}}  # fmt: skip
    path = result_path(out_dir, target.label) if out_dir is not None else None
    if path is not None and path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and isinstance(old.get("kinds"), dict):
                base["kinds"].update(old["kinds"])
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"replacing unreadable {path}: {exc}", stacklevel=2)
    base.update(extra or {})
    for kind, sec in sections.items():
        base["kinds"][kind] = {k: sec.get(k) for k in RESULT_KEYS} | {k: v for k, v in sec.items()
                                                                        if k not in RESULT_KEYS}  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_finite(base), indent=2) + "\n")
        os.replace(tmp, path)
    return base

