"""``ppfr study``'s command line (``python -m ppfr.study`` too)."""

from __future__ import annotations

import argparse
import sys


from ppfr.models.faceapi import FACEAPI_DIR_HELP
from ppfr.study.budget import BudgetError
from ppfr.study.config import DEFAULT_METHODS, StudyConfig
from ppfr.study.holdout import HoldoutError
from ppfr.study.run import run_study


def main(argv: list[str] | None = None) -> int:
    d = StudyConfig
    ap = argparse.ArgumentParser(prog="ppfr study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="training image folder (identity sub-folders)")
    ap.add_argument("--pairs", required=True, help="identity-disjoint pairs: 'fold same path_a path_b' per line")
    ap.add_argument("--out", required=True, help="output folder (runs, attacks, study.json)")
    ap.add_argument("--image-root", default=None, help="root of the pair paths (default: the pairs file's folder)")
    ap.add_argument("--configs", default=d.configs, help="folder with <method>_tiny.yaml (default: configs)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--epochs", type=int, default=d.epochs, help="epochs per training stage")
    ap.add_argument("--attack-steps", type=int, default=d.attack_steps)
    ap.add_argument("--attack-train-images", type=int, default=d.attack_train_images)
    ap.add_argument("--attack-pairs", type=int, default=d.attack_pairs)
    ap.add_argument("--attack-kinds", default=d.attack_kinds, help="attack kinds (comma-separated) or all")
    ap.add_argument("--linkage-steps", type=int, default=d.linkage_steps, help="linkage attacker training steps")
    ap.add_argument("--linkage-form", default=d.linkage_form,
                    help="linkage forms (comma-separated) or auto: adapter, finetune, insider (the figure is the "
                         "strongest)")  # fmt: skip
    ap.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                    help="the finetune linkage form's steps with the judge copy unfrozen")
    ap.add_argument("--judge", default=d.judge, help="faceapi | none | a model.pt")
    ap.add_argument("--judge-dir", default=None, help=FACEAPI_DIR_HELP)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the configs')")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="fit the whole study (training, evaluation, attacks) in this many minutes: probe each run, "
                         "plan its steps per epoch, print the plan, skip what the budget cannot hold")
    ap.add_argument("--transfer", action=argparse.BooleanOptionalAction, default=None,
                    help="also train each method with pretrained transfer (+ distillation) where it applies "
                         "(default: on with --budget-min, off without)")
    ap.add_argument("--transfer-schedule", choices=("uniform", "config"), default=d.transfer_schedule,
                    help="the transfer rows' epochs: uniform (--epochs per stage, as the scratch rows) or config "
                         "(each <method>_transfer.yaml's own stages, epochs and lr steps: its measured recipe)")
    ap.add_argument("--attack-share", type=float, default=d.attack_share,
                    help="with --budget-min: the budget's share the planner reserves for attacks it has not timed "
                         f"(default {d.attack_share})")
    ap.add_argument("--holdout-ids", type=int, default=0,
                    help="keep this many identities of --data out of training and check on pairs of them that the "
                         "methods keep their accuracy ordering (0: off; at least 20)")
    ap.add_argument("--report", default=None, help="write the Markdown report here (e.g. docs/results.md)")
    a = ap.parse_args(argv)
    try:
        cfg = StudyConfig(data=a.data, pairs=a.pairs, out=a.out, image_root=a.image_root, configs=a.configs,
                          methods=tuple(a.methods), epochs=a.epochs, attack_steps=a.attack_steps,
                          attack_train_images=a.attack_train_images, attack_pairs=a.attack_pairs,
                          attack_kinds=a.attack_kinds, linkage_steps=a.linkage_steps, judge=a.judge,
                          linkage_form=a.linkage_form, finetune_steps=a.finetune_steps,
                          judge_dir=a.judge_dir, threads=a.threads, report=a.report,
                          max_steps_per_epoch=a.max_steps_per_epoch, batch_size=a.batch_size,
                          budget_min=a.budget_min, holdout_ids=a.holdout_ids,
                          attack_share=a.attack_share, transfer_schedule=a.transfer_schedule,
                          transfer=a.transfer if a.transfer is not None else a.budget_min is not None)  # fmt: skip
        from ppfr.eval.attacks.cli import parse_kinds

        parse_kinds(cfg.attack_kinds)
    except ValueError as exc:
        print(f"ppfr study: {exc}", file=sys.stderr)
        return 2
    from ppfr.eval.attacks.common import AttackError
    from ppfr.models.checkpoints import CheckpointError

    try:
        run_study(cfg)
    # a damaged run folder, bad attack input or a budget too small: say which, no traceback
    except (CheckpointError, AttackError, BudgetError, HoldoutError) as exc:
        print(f"ppfr study: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
