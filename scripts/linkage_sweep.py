"""Choose the ``finetune`` linkage recipe by a sweep scored on *training* identities, never on the evaluation pairs.

The public faces (``--data``, an image folder) are split by identity (``ppfr.study.split_holdout``): the attacker
trains on the rest and every recipe is scored on the ``--heldout-ids`` identities it never saw (gallery = their first
clean face, queries = the others, protected with fresh secrets). One adapter is trained and shared, so the recipes
differ only in the unfrozen phase. Prints a Markdown table (docs/attack.md keeps it) and writes ``<out>/sweep.json``.

    python scripts/linkage_sweep.py runs/mft/model.pt --data ../shared/data/celeba112/train --out runs/sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ppfr.models.faceapi import FACEAPI_DIR_HELP

# name: (finetune_loss, finetune_lr_mult); the first is FaceLinkGen's naive replica (plain 1 - cos, one rate)
RECIPES = {
    "plain cos, copy at 1x": ("cosine", 1.0),
    "centred, copy at 1x": ("centred", 1.0),
    "centred, copy at 0.1x": ("centred", 0.1),
    "centred, copy at 0.01x": ("centred", 0.01),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="runs/<name>/model.pt (or another model spec) of the method under attack")
    ap.add_argument("--data", required=True, help="the attacker's public faces: an image folder")
    ap.add_argument("--out", default="runs/linkage_sweep")
    ap.add_argument("--heldout-ids", type=int, default=30, help="public identities the recipes are scored on")
    ap.add_argument("--max-pairs", type=int, default=300, help="pairs of the held-out identities kept (their faces)")
    ap.add_argument("--linkage-steps", type=int, default=100)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--max-train-images", type=int, default=1500)
    ap.add_argument("--judge-dir", default=None, help=FACEAPI_DIR_HELP)
    a = ap.parse_args(argv)

    from ppfr.eval.attacks.common import AttackConfig, AttackContext, resolve_target
    from ppfr.eval.attacks.data import load_faces, open_val
    from ppfr.eval.attacks.judge import make_judge
    from ppfr.eval.attacks.linkage import LinkageAttack
    from ppfr.eval.attacks.linkers import clean_embeddings, finetune_linker, frozen_teacher
    from ppfr.study import split_holdout

    out = Path(a.out)
    train_index, held_pairs = split_holdout(a.data, a.heldout_ids, out / "split", seed=7)
    cfg = AttackConfig(linkage_steps=a.linkage_steps, finetune_steps=a.finetune_steps,
                       max_train_images=a.max_train_images, max_pairs=a.max_pairs)  # fmt: skip
    judge = make_judge("faceapi", a.judge_dir)
    train = load_faces(str(train_index), max_images=cfg.max_train_images, seed=cfg.seed)
    val = load_faces(open_val(str(held_pairs), cfg.max_pairs))
    target = resolve_target(a.model)
    ctx = AttackContext(target, train, val, cfg, judge, log=print)
    attack = LinkageAttack()
    anchor = clean_embeddings(judge, val, batch_size=cfg.eval_batch_size).all()
    rows = []
    t0 = time.perf_counter()
    adapter, summary = attack.train_form(ctx, "adapter")
    sec, _ = attack.score_linker(ctx, adapter, summary, anchor, t0)
    rows.append({"recipe": "adapter (frozen teacher)", "top1": sec["linkage_top1"], "pair_acc": sec["pair_acc"],
                 "chosen": "–", "seconds": sec["time_s"]})  # fmt: skip
    ins = attack.run_insider(ctx, anchor, time.perf_counter())
    rows.append({"recipe": "insider (no training)", "top1": ins["linkage_top1"], "pair_acc": ins["pair_acc"],
                 "chosen": "–", "seconds": ins["time_s"]})  # fmt: skip
    for name, (loss, mult) in RECIPES.items():
        t1 = time.perf_counter()
        rcfg = dataclasses.replace(cfg, finetune_loss=loss, finetune_lr_mult=mult)
        rctx = dataclasses.replace(ctx, cfg=rcfg)
        with frozen_teacher(judge), torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 1)
            linker, fsum = finetune_linker(adapter, target.method, judge, train, rcfg, ctx.device, print)
        s, _ = attack.score_linker(rctx, linker, fsum, anchor, t1)
        rows.append({"recipe": f"finetune: {name}", "top1": s["linkage_top1"], "pair_acc": s["pair_acc"],
                     "chosen": fsum["selection"]["chosen"], "selection": fsum["selection"]["candidates"],
                     "loss_first": fsum["loss_first"], "loss_last": fsum["loss_last"], "seconds": s["time_s"]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"model": a.model, "rows": rows, "config": dataclasses.asdict(cfg),
                                                "heldout_faces": len(val), "train_faces": len(train)}, indent=2))
    print(f"\n{len(train)} public training faces; scored on {len(val)} faces of {a.heldout_ids} held-out public "
          f"identities ({a.model})\n")
    print("| recipe | top-1 % | 1:1 acc % | kept (selection on public ids) | loss first → last | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lf = f"{r['loss_first']:.3f} → {r['loss_last']:.3f}" if r.get("loss_first") is not None else "–"
        pa = f"{r['pair_acc'] * 100:.1f}" if r["pair_acc"] is not None else "–"
        print(f"| {r['recipe']} | {r['top1'] * 100:.1f} | {pa} | {r['chosen']} | {lf} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
