"""``ppfr study``: every method side by side on one image-folder dataset, accuracy and privacy, in one command.

For each method (default: arcface, arcface_fd, duetface, partialface, minusface, profacec) the study

1. trains its ``configs/<method>_tiny.yaml`` (one common CPU-scale backbone, IR-18 at base width 16, and one
   schedule: ``--epochs`` per stage) on ``--data``; a method with a frozen server recogniser (an option called
   ``server_ckpt``: PRO-Face C) gets the study's trained ``arcface`` model as that server;
2. evaluates 10-fold verification on the identity-disjoint ``--pairs`` (flip test-time augmentation through the
   method's own client: the flipped image is protected and recognised, and the two embeddings are summed);
3. times the client (``protect``) and the server (``recognize``) per image and measures the payload bytes per image;
4. runs every attack kind of ``ppfr attack`` that applies to the method (closed-form inversion of linear payloads
   with the secret searched, FaceLinkGen-style identity linkage through the independent judge as teacher, learned
   U-Net recovery), scored on held-out identities, and keeps the picture grid;
5. writes ``<out>/study.json`` and a Markdown report (``--report``, e.g. docs/results.md) with the papers' figures.

With ``--budget-min M`` the study first probes a few training steps of every run (each method from scratch and,
with ``--transfer``, the default then, with its ``<method>_transfer.yaml``), plans one common number of steps per epoch so that training, evaluation and attacks
fit in M minutes (attacks at their time in the ``<out>/elapsed.json`` ledger, else a share of the budget), prints
the plan, skips what no longer fits and reports it, and prints the estimated and actual totals.

With ``--holdout-ids N`` the study first takes N identities of ``--data`` out of training (a seeded draw; nobody,
attacker included, trains on them), writes ``<out>/holdout/train.txt`` (a TFace index of the rest, what every run
trains on) and ``<out>/holdout/pairs.txt`` (10 identity-disjoint folds over the held-out identities), evaluates
every trained model on those pairs too, and reports whether the methods keep their accuracy ordering there (the
recipes were chosen by measuring on ``--pairs``; the held-out pairs were never looked at).

Every step is resumable: a finished training run (``<out>/runs/<method>/model.pt``) and a finished attack
(``<out>/attack/<method>/result.json``) are reused, so a killed study continues where it stopped.
"""


from __future__ import annotations

from ppfr.study.budget import BudgetError, BudgetPlan, RunCost, keep_first_plan, plan_budget, probe_costs
from ppfr.study.cli import main
from ppfr.study.config import DEFAULT_METHODS, PAPER, Run, StudyConfig, stage_epochs, study_runs, train_config
from ppfr.study.holdout import HoldoutError, ordering_check, split_holdout
from ppfr.study.report import chart_title, form_figures, privacy_ordering, write_report
from ppfr.study.run import payload_fingerprint, refresh_insider, reuse_attacks, run_study
from ppfr.study.evaluation import cached_verification, cost, verify, verify_cached, verify_tags

__all__ = [
    "BudgetError", "BudgetPlan", "DEFAULT_METHODS", "HoldoutError", "PAPER", "Run", "RunCost", "StudyConfig",
    "cached_verification", "chart_title", "cost", "form_figures", "keep_first_plan", "main", "ordering_check",
    "payload_fingerprint", "plan_budget", "privacy_ordering", "probe_costs", "refresh_insider", "reuse_attacks",
    "run_study", "split_holdout", "stage_epochs", "study_runs", "train_config", "verify", "verify_cached",
    "verify_tags", "write_report",
]  # fmt: skip
