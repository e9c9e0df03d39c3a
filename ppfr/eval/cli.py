"""``ppfr eval CHECKPOINT --data PAIRS_OR_BIN [--ijb-dir DIR]``: evaluate a trained method or the face-api judge.

CHECKPOINT is a model spec (:mod:`ppfr.methods.spec`): a ``runs/<name>/model.pt`` written by ``ppfr train``, its run
folder, or ``method:NAME[:key=value,...]`` (untrained, the fixed seed of every verb); or, with ``--judge faceapi`` (detected automatically for a folder holding the face-api.js manifest), the judge's
weight folder; the judge sees the clean RGB faces.

* ``--data``: a pair list (``fold same path_a path_b`` or LFW ``pairs.txt``) or an insightface ``.bin``: 10-fold
  verification exactly as METHODS.md §7.1 (squared distance of normalised embeddings, thresholds 0:0.01:4, the
  pair list's folds or contiguous KFold(10) for a ``.bin``), plus AUC and TPR@FPR on the same pair scores.
* ``--ijb-dir``: 1:1 template verification (§7.2, :mod:`ppfr.eval.ijb`).
* Protocols: ``--protocol reference`` (default) is the *exact 10-fold* protocol of §7.1; ``--protocol quick``
  (old name ``exact``) searches the threshold over every observed cosine, as ``ppfr train``'s quick check does.
  ``--max-pairs`` scores a subset: not the full protocol either. Every printed number and every block of
  metrics.json names its protocol (``protocol``, ``protocol_label``, ``full_set``) and its flip TTA (``flip``).
* Flip test-time augmentation: embedding = f(x) + f(flip(x)). The *RGB image* is flipped and then goes through the
  method's whole client transform and server (``method.embed``), so every method gets exactly the §7.1 treatment
  ("apply the method's client transform to x and to the flipped x separately"). On by default for 10-fold
  verification (``--flip/--no-flip``, as §7.1), off by default for IJB (``--ijb-flip`` turns it on; the
  reference's ``use_flip_test=False``). The random client draws (PartialFace ranks, MinusFace permutations, ...)
  come from one generator seeded by ``--seed``, so a run is reproducible. A method may declare its own default
  (``method.eval_flip``): PRO-Face C's is off, as its reference evaluates (METHODS §6.6); ``--flip`` turns it on.
* Evaluation variants, one row each beside the main result, asked of the method through generic hooks (the evaluator
  never asks which method it runs):
  * ``method.eval_variants() -> {name: context factory | None}``: the variants the method is evaluated under by
    default; ``None`` names the method as configured (the main row). PRO-Face C: one row per test blur (Gaussian,
    median, pixelate, hybrid; §6.6).
  * ``--per-rank``: for a method whose payload operator declares a secret space (``payload_operator()`` with more
    than one candidate channel list, e.g. PartialFace's m * n ranks), each secret pinned for every image, plus the
    min / max / mean accuracy over them (PFpaper Tab.2), beside the main random-rank result.

Writes ``metrics.json``, ``metrics.md`` (a Markdown table) and ``roc.png`` into ``--out``. Needs no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import numpy as np
import torch

JUDGES = ("faceapi",)
PROTOCOLS = {"reference": "reference", "quick": "quick", "exact": "quick"}  # --protocol value -> canonical name
PROTOCOL_LABELS = {
    "reference": "exact 10-fold (METHODS §7.1 reference: squared distance, thresholds 0:0.01:4)",
    "quick": "quick 10-fold (best observed-cosine threshold, as ppfr train's check; not the reference protocol)",
}
IJB_LABEL = "IJB 1:1 templates (METHODS §7.2 reference: media-weighted templates, cosine)"
TPR_LABEL = "nearest ROC point, TFace IJB_Evaluation rule"
TPR_AT_MOST_LABEL = "best TPR with FPR <= target (not the reference rule)"


def _tta(flip: bool) -> str:
    return "flip TTA on" if flip else "flip TTA off"


def _fmt_fpr(f: float) -> str:
    return f"{f:.0e}".replace("e-0", "e-")


def _build_embed(args: argparse.Namespace) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict, object]:
    """-> (embed(images (B,3,112,112) in [-1,1]) -> (B, D), description of the model for metrics.json, the method
    (None for a judge))."""
    from ppfr.models.faceapi import MANIFEST_NAME

    path = Path(args.checkpoint)
    judge = args.judge
    if judge is None and path.is_dir() and (path / MANIFEST_NAME).is_file():
        judge = "faceapi"  # a face-api.js weight folder is unambiguous
    device = torch.device(args.device)
    if judge == "faceapi":
        from ppfr.models.faceapi import load_faceapi_judge

        model = load_faceapi_judge(path, device=device)
        desc = {"kind": "judge", "judge": "faceapi", "checkpoint": str(path),
                "input": "clean RGB, warped to the dlib 150x150 chip"}
        return (lambda x: model.embed(x.to(device))), desc, None
    from ppfr.methods.spec import SpecError, load_model

    try:
        method, src = load_model(args.checkpoint, map_location=device)
    except SpecError as exc:
        hint = " (or --judge faceapi for a face-api.js weight folder)" if path.is_dir() else ""
        raise SpecError(f"{exc}{hint}") from None
    gen = torch.Generator().manual_seed(args.seed)
    desc = {"kind": "method", "method": method.name, "checkpoint": str(src.path or src.text),
            "options": {f.name: _jsonable(getattr(method.options, f.name)) for f in dataclasses.fields(method.options)}}
    return (lambda x: method.embed(x.to(device), generator=gen)), desc, method


def _in_context(method, factory: Callable[[], contextlib.AbstractContextManager], seed: int, device):
    gen = torch.Generator().manual_seed(seed)  # each variant draws exactly what the main row draws

    def embed(x: torch.Tensor) -> torch.Tensor:
        with factory():
            return method.embed(x.to(device), generator=gen)

    return embed


def method_variants(method, seed: int, device) -> dict[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The method's own evaluation variants (``method.eval_variants()``) as embed functions; None = the main row."""
    hook = getattr(method, "eval_variants", None)
    if method is None or hook is None:
        return {}
    return {name: None if f is None else _in_context(method, f, seed, device) for name, f in hook().items()}


def secret_variants(method, device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One embed function per secret of the method's declared secret space, pinned for every image: the payload
    operator's candidate channel lists (PartialFace: the m * n ranks, ``SiPj``). Empty when the method declares none
    (no operator, a single candidate, or a payload with more than the operator's tensor)."""
    from ppfr.methods.base import Payload
    from ppfr.ops.freq import freq_encode

    op = method.payload_operator() if method is not None else None
    if op is None or op.candidates.shape[0] < 2 or set(method.payload_spec) != {op.tensor}:
        return {}

    def pinned(row: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def embed(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device).float()
            return method.recognize(Payload(method.name, {op.tensor: freq_encode(x, row.to(device))}))

        return embed

    return {name: pinned(row) for name, row in zip(op.names, op.candidates)}


def _variant_row(v: dict) -> dict:
    keep = ("accuracy", "std", "auc", "threshold", "threshold_metric", "fold_accuracies", "tpr_at_fpr", "pairs")
    return {k: v[k] for k in keep}


def _variants_block(kind: str, label: str, rows: dict[str, dict], v: dict) -> dict:
    accs = [r["accuracy"] for r in rows.values()]
    return {"kind": kind, "label": label, "protocol_label": v["protocol_label"], "tta": v["tta"], "rows": rows,
            "min": min(accs), "max": max(accs), "mean": float(np.mean(accs)), "count": len(accs)}  # fmt: skip


def _jsonable(v):
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


class _NormMeter:
    """Wraps an embed function and records the norms of the raw embeddings it returns (before any normalising)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn, self.norms = fn, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.fn(x)
        self.norms.append(e.detach().float().norm(dim=1).cpu())
        return e

    def summary(self) -> dict:
        n = torch.cat(self.norms) if self.norms else torch.zeros(1)
        return {"mean": float(n.mean()), "min": float(n.min()), "max": float(n.max())}


def progress_printer(what: str, every_s: float = 5.0, stream: Any = None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback printing ``what: done/total images (t s)`` to stderr at most every
    ``every_s`` seconds, and always when done (long embeddings of a pair list show that they are moving)."""
    t0 = time.perf_counter()
    last = [t0]

    def report(done: int, total: int) -> None:
        now = time.perf_counter()
        if done >= total or now - last[0] >= every_s:
            last[0] = now
            print(f"{what}: {done}/{total} images ({now - t0:.0f} s)", file=stream or sys.stderr, flush=True)

    return report


def _verification(embed, args: argparse.Namespace, what: str = "embedding") -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    from ppfr.eval.verification import DEFAULT_FPRS, pair_scores, roc_curve, ten_fold, ten_fold_sqdist, tpr_at_fpr

    protocol = PROTOCOLS[args.protocol]
    s = pair_scores(embed, args.data, image_root=args.image_root, batch_size=args.batch_size, flip=args.flip,
                    num_workers=args.workers, max_pairs=args.max_pairs, progress=progress_printer(what))  # fmt: skip
    if protocol == "reference":
        res = ten_fold_sqdist(s.dists, s.same, s.folds)
    else:
        res = ten_fold(s.sims, s.same, s.folds)
    fpr, tpr, _ = roc_curve(s.sims, s.same)
    neg = int((~s.same).sum())
    full = res.pairs >= s.listed
    label = PROTOCOL_LABELS[protocol] + ("" if full else f", {res.pairs} of {s.listed} pairs only (an even spread)")
    out = {
        "data": str(args.data), "protocol": protocol, "protocol_label": label, "full_set": full,
        "flip": bool(args.flip), "tta": _tta(args.flip), "pairs": res.pairs, "pairs_listed": s.listed,
        "positives": int(s.same.sum()),
        "negatives": neg, "images": s.images, "unreadable_images": s.unreadable, "folds": len(res.fold_accuracies),
        "accuracy": res.accuracy, "std": res.std, "fold_accuracies": list(res.fold_accuracies),
        "threshold": res.threshold, "threshold_metric": res.metric, "auc": res.auc,
        "tpr_rule": TPR_LABEL,
        "tpr_at_fpr": {_fmt_fpr(k): v for k, v in tpr_at_fpr(s.sims, s.same, DEFAULT_FPRS).items()},
        "tpr_at_fpr_at_most": {_fmt_fpr(k): v for k, v in tpr_at_fpr(s.sims, s.same, DEFAULT_FPRS, "at_most").items()},
        "min_resolvable_fpr": 1.0 / neg,
    }  # fmt: skip
    return out, (fpr, tpr)


def _ijb(embed, args: argparse.Namespace) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    from ppfr.eval.ijb import evaluate_templates, open_ijb_dir
    from ppfr.eval.verification import tpr_at_fpr

    listing = open_ijb_dir(args.ijb_dir, args.ijb_name)
    r = evaluate_templates(embed, listing, batch_size=args.batch_size, flip=args.ijb_flip, num_workers=args.workers)
    neg = int((~r.labels).sum())
    out = {
        "dir": str(args.ijb_dir), "set": listing.name, "protocol": "ijb", "protocol_label": IJB_LABEL,
        "full_set": True, "flip": bool(args.ijb_flip), "tta": _tta(args.ijb_flip), "tpr_rule": TPR_LABEL,
        "aligned_from_landmarks": listing.landmarks is not None,
        "images": r.images, "unreadable_images": r.unreadable, "templates": r.templates,
        "template_pairs": len(r.scores), "positives": int(r.labels.sum()), "negatives": neg, "auc": r.auc,
        "tpr_at_fpr": {_fmt_fpr(k): v for k, v in r.tpr_at_fpr.items()},
        "tpr_at_fpr_at_most": {_fmt_fpr(k): v for k, v in tpr_at_fpr(r.scores, r.labels, rule="at_most").items()},
        "min_resolvable_fpr": 1.0 / max(neg, 1),
    }  # fmt: skip
    return out, r.roc


def _markdown(metrics: dict) -> str:
    m = metrics["model"]
    name = m.get("method") or m.get("judge")
    lines = [f"# ppfr eval: {name}", "", f"- checkpoint: `{m['checkpoint']}`", ""]
    v = metrics.get("verification")
    if v:
        bad = f", {v['unreadable_images']} unreadable" if v["unreadable_images"] else ""
        thr = f"{v['threshold']:.3f} ({v['threshold_metric']})"
        lines += [f"## 10-fold verification: {v['protocol_label']}; {v['tta']}", "",
                  f"`{v['data']}`: {v['pairs']} pairs ({v['positives']} genuine / {v['negatives']} impostor), "
                  f"{v['images']} images{bad}", "",
                  "| accuracy (%) | std (%) | threshold | AUC |", "|---|---|---|---|",
                  f"| {v['accuracy'] * 100:.2f} | {v['std'] * 100:.2f} | {thr} | {v['auc']:.4f} |", ""]  # fmt: skip
        lines += _tpr_table(v)
    for key in ("variants", "per_rank"):
        b = metrics.get(key)
        if b:
            lines += [f"## {b['label']}: {b['protocol_label']}; {b['tta']}", "",
                      f"| {b['kind']} | accuracy (%) | std (%) | AUC |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {n} | {r['accuracy'] * 100:.2f} | {r['std'] * 100:.2f} | {r['auc']:.4f} |"
                      for n, r in b["rows"].items()]  # fmt: skip
            lines += [f"| min / max / mean over {b['count']} | {b['min'] * 100:.2f} / {b['max'] * 100:.2f} / "
                      f"{b['mean'] * 100:.2f} | | |", ""]  # fmt: skip
    j = metrics.get("ijb")
    if j:
        lines += [f"## 1:1 template verification ({j['set']}): {j['protocol_label']}; {j['tta']}", "",
                  f"{j['template_pairs']} template pairs ({j['positives']} genuine / {j['negatives']} impostor), "
                  f"{j['templates']} templates, {j['images']} images; AUC {j['auc']:.4f}", ""]  # fmt: skip
        lines += _tpr_table(j)
    return "\n".join(lines)


def _tpr_table(block: dict) -> list[str]:
    keys = list(block["tpr_at_fpr"])
    low = [k for k in keys if float(k) < block["min_resolvable_fpr"]]
    near = " | ".join(f"{block['tpr_at_fpr'][k] * 100:.2f}" + ("*" if k in low else "") for k in keys)
    most = " | ".join(f"{block['tpr_at_fpr_at_most'][k] * 100:.2f}" for k in keys)
    lines = ["| FPR | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
             f"| TPR (%), {TPR_LABEL}; {block['tta']} | {near} |",
             f"| TPR (%), {TPR_AT_MOST_LABEL}; {block['tta']} | {most} |"]  # fmt: skip
    if low:
        lines.append(f"\n\\* below 1/impostors = {block['min_resolvable_fpr']:.1e}: not resolvable with this many "
                     "impostor pairs; the reference's nearest-point rule then reads the ROC at FPR 0 (or at the "
                     "smallest non-zero FPR), not at the target.")  # fmt: skip
    return lines + [""]


def _plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on CI or servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ppfr eval: roc.png needs matplotlib (pip install matplotlib==3.11.2, pinned in "
                         "requirements.txt); metrics.json and metrics.md were written") from None  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for label, (fpr, tpr) in curves.items():
        lo = fpr[fpr > 0].min() if (fpr > 0).any() else 1e-6
        # a log axis cannot show FPR = 0: draw those points at the smallest positive FPR (the step's left edge)
        ax.step(np.maximum(fpr, lo), tpr, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1)
    ax.set_ylim(0, 1.005)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _default_out(args: argparse.Namespace, desc: dict) -> Path:
    ck = Path(desc["checkpoint"])
    if desc.get("judge"):
        model = desc["judge"]
    elif desc["checkpoint"].startswith("method:"):  # an untrained method: its name (options make no folder name)
        model = f"{desc['method']}_untrained"
    else:
        model = ck.parent.name if ck.name == "model.pt" else ck.stem
    data = Path(args.data).stem if args.data else Path(args.ijb_dir).name
    return Path("runs") / "eval" / f"{model}-{data}"


def cmd_eval(args: argparse.Namespace) -> int:
    from ppfr.data._common import DataFormatError
    from ppfr.methods.spec import SpecError
    from ppfr.models.checkpoints import CheckpointError

    if not args.data and not args.ijb_dir:
        print("ppfr eval: nothing to evaluate: pass --data PAIRS_OR_BIN and/or --ijb-dir DIR", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"ppfr eval: --batch-size must be positive, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"ppfr eval: --device {args.device} asked for but no CUDA device is available", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    reading = f"checkpoint {args.checkpoint}"  # what is being read, for a decoding error (which names no file)
    try:
        embed, desc, method = _build_embed(args)
        if args.flip is None:  # the method's declared default (PRO-Face C: off, METHODS §6.6), else §7.1's flip
            args.flip = bool(getattr(method, "eval_flip", True)) if method is not None else True
        meter = _NormMeter(embed)
        # top-level flip = the 10-fold verification's (kept for older readers); each block names its own
        metrics: dict = {"model": desc, "flip": bool(args.flip), "ijb_flip": bool(args.ijb_flip), "seed": args.seed}
        curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if args.data:
            label = f"verification ({Path(args.data).name}, {_tta(args.flip)})"
            reading = f"--data {args.data}"
            metrics["verification"], curves[label] = _verification(meter, args)
            variants = method_variants(method, args.seed, args.device)
            if variants:
                rows = {n: _variant_row(metrics["verification"] if f is None else _verification(f, args, n)[0])
                        for n, f in variants.items()}  # fmt: skip
                metrics["variants"] = _variants_block("variant", f"evaluation variants of {desc['method']}", rows,
                                                      metrics["verification"])  # fmt: skip
            if args.per_rank:
                secrets = secret_variants(method, args.device)
                if secrets:
                    rows = {n: _variant_row(_verification(f, args, n)[0]) for n, f in secrets.items()}
                    metrics["per_rank"] = _variants_block("rank", "per-rank (each secret pinned for every image)",
                                                          rows, metrics["verification"])  # fmt: skip
                else:
                    print("ppfr eval: --per-rank: the model declares no secret space; only the main row",
                          file=sys.stderr)  # fmt: skip
        if args.ijb_dir:
            label = f"templates ({Path(args.ijb_dir).name}, {_tta(args.ijb_flip)})"
            reading = f"--ijb-dir {args.ijb_dir}"
            metrics["ijb"], curves[label] = _ijb(meter, args)
    except DataFormatError as exc:  # a file the data layer refuses: say which argument named it
        print(f"ppfr eval: {reading.split()[0]}: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, SpecError, FileNotFoundError) as exc:
        print(f"ppfr eval: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # a binary file (a .pkl, an image, ...) where a text listing was expected
        print(f"ppfr eval: {reading}: not a text listing nor a format ppfr reads (expected a pair list 'fold same "
              f"a b' / LFW pairs.txt or an insightface .bin; byte {exc.start} is not {exc.encoding} text)",
              file=sys.stderr)  # fmt: skip
        return 2
    metrics["embedding_norm"] = meter.summary()  # raw network outputs, before flip-sum and normalisation
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out) if args.out else _default_out(args, desc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "metrics.md").write_text(_markdown(metrics) + "\n")
    name = desc.get("method") or desc.get("judge")
    _plot_roc(curves, f"ppfr eval: {name}", out / "roc.png")
    if "verification" in metrics:
        v = metrics["verification"]
        tprs = ", ".join(f"{k}: {x * 100:.2f}" for k, x in v["tpr_at_fpr"].items())
        print(f"verification [{v['protocol_label']}; {v['tta']}] ({v['pairs']} pairs, {v['folds']} folds): "
              f"acc {v['accuracy'] * 100:.2f} +- {v['std'] * 100:.2f} %, threshold {v['threshold']:.3f} "
              f"({v['threshold_metric']}), AUC {v['auc']:.4f}")  # fmt: skip
        print(f"  TPR (%) @ FPR [{TPR_LABEL}; {v['tta']}] {tprs} (FPR below {v['min_resolvable_fpr']:.1e} not "
              "resolvable)")  # fmt: skip
        for key in ("variants", "per_rank"):
            b = metrics.get(key)
            if not b:
                continue
            print(f"{b['label']} [{b['protocol_label']}; {b['tta']}]:")
            for n, r in b["rows"].items():
                print(f"  {n}: acc {r['accuracy'] * 100:.2f} +- {r['std'] * 100:.2f} %, AUC {r['auc']:.4f}")
            print(f"  min {b['min'] * 100:.2f} / max {b['max'] * 100:.2f} / mean {b['mean'] * 100:.2f} % over "
                  f"{b['count']} {b['kind']}s")  # fmt: skip
    if "ijb" in metrics:
        j = metrics["ijb"]
        tprs = ", ".join(f"{k}: {x * 100:.2f}" for k, x in j["tpr_at_fpr"].items())
        print(f"templates [{j['protocol_label']}; {j['tta']}] ({j['template_pairs']} pairs, {j['templates']} "
              f"templates): AUC {j['auc']:.4f}")  # fmt: skip
        print(f"  TPR (%) @ FPR [{TPR_LABEL}; {j['tta']}] {tprs} (FPR below {j['min_resolvable_fpr']:.1e} not "
              "resolvable)")  # fmt: skip
    n = metrics["embedding_norm"]
    print(f"raw embedding norm {n['mean']:.3f} (min {n['min']:.3f}, max {n['max']:.3f}); {metrics['seconds']:.1f} s")
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'}, {out / 'roc.png'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="runs/<name>/model.pt (or its folder), method:NAME[:key=value,...] (untrained, "
                                      "fixed seed), or a judge's weight folder")
    p.add_argument("--data", default=None, help="pair list (fold same a b / LFW pairs.txt) or insightface .bin")
    p.add_argument("--image-root", default=None, help="where pair-list paths are resolved (default: the list's folder)")
    p.add_argument("--ijb-dir", default=None,
                   help="IJB folder (meta/<set>_face_tid_mid.txt ...) or a ppfr template folder (templates.txt)")  # fmt: skip
    p.add_argument("--ijb-name", default=None, help="IJB set name under meta/ (e.g. ijbc); default: the only one")
    p.add_argument("--judge", default=None, choices=JUDGES, help="evaluate a pretrained judge on clean RGB faces")
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<model>-<data>)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="10-fold verification: flip TTA f(x) + f(flip x) (default: the method's declared default, "
                        "else on, as §7.1; PRO-Face C: off, as §6.6)")  # fmt: skip
    p.add_argument("--per-rank", action="store_true",
                   help="also evaluate each secret of the method's secret space pinned (PartialFace: every rank), "
                        "with min / max / mean accuracy (PFpaper Tab.2)")  # fmt: skip
    p.add_argument("--ijb-flip", action=argparse.BooleanOptionalAction, default=False,
                   help="IJB templates: flip TTA, the reference's use_flip_test (default off, as §7.2)")  # fmt: skip
    p.add_argument("--protocol", default="reference", choices=sorted(PROTOCOLS),
                   help="10-fold thresholds: reference = the exact §7.1 protocol (squared-distance grid); quick = "
                        "every observed cosine (ppfr train's check; 'exact' is its old name)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--max-pairs", type=int, default=None, help="evaluate only the first N pairs (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the methods' random client draws")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ppfr eval", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return cmd_eval(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
