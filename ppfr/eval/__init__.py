"""Evaluation: 10-fold verification (METHODS §7.1), IJB-style template verification (§7.2), privacy attacks.

``ppfr eval`` (:mod:`ppfr.eval.cli`) runs them on a trained model or the face-api judge; see docs/eval.md.
"""

from ppfr.eval.ijb import evaluate_templates, open_ijb_dir, open_listing, template_features
from ppfr.eval.verification import (
    VerificationResult, evaluate_pairs, pair_scores, roc_curve, ten_fold, ten_fold_sqdist, tpr_at_fpr,
)  # fmt: skip

__all__ = [
    "VerificationResult", "evaluate_pairs", "evaluate_templates", "open_ijb_dir", "open_listing", "pair_scores",
    "roc_curve", "template_features", "ten_fold", "ten_fold_sqdist", "tpr_at_fpr",
]  # fmt: skip
