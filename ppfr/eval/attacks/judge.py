"""The judge: an independent face recogniser that scores re-identification and teaches the linkage attacker.

* :class:`Judge`, :func:`make_judge` -- ``faceapi`` (face-api.js, weights from
  :func:`ppfr.models.faceapi.faceapi_dir`), a model spec, or none.
* :func:`judge_embeddings`, :func:`pair_verification` -- embeddings of face batches and 10-fold verification on a
  pair list.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.eval.attacks.common import AttackError, resolve_target
from ppfr.eval.verification import VerificationResult, ten_fold

Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Judge:
    """A face recogniser scoring re-identification: ``embed(images (B,3,112,112) in [-1,1]) -> (B, D)``.

    ``module``: the network behind ``embed`` (a teacher is frozen through it); ``rebind(copy_of_module)`` gives the
    same ``embed`` on a copy (how the linkage ``finetune`` form gets a teacher whose weights it may train). A judge
    whose ``embed`` is itself a module needs neither. ``cache`` holds per-dataset clean embeddings (linkage targets
    and gallery), computed once and shared by every form and target of a run.
    """

    name: str
    embed: Embed
    module: torch.nn.Module | None = None
    rebind: Callable[[torch.nn.Module], Embed] | None = None
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def trainable_copy(self) -> Judge | None:
        """A judge over a deep copy of the network, every weight trainable, eval mode (BatchNorm statistics stay
        the teacher's); None when the network behind ``embed`` is not known."""
        import copy

        if isinstance(self.embed, torch.nn.Module):
            m = copy.deepcopy(self.embed)
            embed: Embed = m
        elif self.module is not None and self.rebind is not None:
            m = copy.deepcopy(self.module)
            embed = self.rebind(m)
        else:
            return None
        m.eval().requires_grad_(True)
        return Judge(f"{self.name} (fine-tuned copy)", embed, m, self.rebind)


def make_judge(spec: str, judge_dir: str | None = None, device: torch.device | str = "cpu") -> Judge | None:
    """``none`` | ``faceapi`` (the pretrained face-api.js judge, ``ppfr.models.faceapi``; ``judge_dir`` or the
    default folder of :func:`ppfr.models.faceapi.faceapi_dir`) | a model spec (e.g. the user's trained arcface; its
    end-to-end ``embed``)."""
    if spec == "none":
        return None
    if spec == "faceapi":
        try:
            from ppfr.models.faceapi import faceapi_dir, load_faceapi_judge
        except ImportError as exc:
            raise AttackError(f"--judge faceapi: ppfr.models.faceapi is not available ({exc}); use --judge none or "
                              "--judge runs/<name>/model.pt") from None  # fmt: skip
        from ppfr.models.checkpoints import CheckpointError

        try:
            judge = load_faceapi_judge(faceapi_dir(judge_dir), device=device)
        except CheckpointError as exc:
            raise AttackError(f"--judge faceapi: {exc}; pass --judge-dir DIR (or set PPFR_FACEAPI_DIR)") from None
        return Judge("faceapi", lambda x: judge.embed(x), judge, rebind=lambda m: m.embed)
    if spec == "identity":
        raise AttackError("--judge identity: the identity pseudo-method has no recogniser; use faceapi or a model.pt")
    target = resolve_target(spec, device)
    if not target.trained:
        warnings.warn(f"judge {spec!r} is untrained: its verification accuracy is meaningless", stacklevel=2)
    m = target.method

    def rebind(mm: torch.nn.Module) -> Embed:
        # a fixed generator: the judge's own protection (if any) must not add noise between the two images of a pair
        return lambda x: mm.embed(x, generator=torch.Generator().manual_seed(0))

    return Judge(f"{target.label} ({m.name})", rebind(m), m, rebind)


@torch.no_grad()
def judge_embeddings(judge: Judge, images: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2-normalised judge embeddings (N, D) of batches of (B, 3, H, W) images in [-1, 1]."""
    return torch.cat([F.normalize(judge.embed(x).float(), dim=1).cpu() for x in images])


def pair_verification(emb: torch.Tensor, labels: torch.Tensor, pairs: np.ndarray) -> VerificationResult:
    """10-fold verification (ppfr.eval.verification.ten_fold) of embeddings (N, D) whose rows are images
    ``labels`` (N,) of a pair list with rows (fold, same, a, b). Pairs with an image that was not embedded (an
    unreadable file the loader skipped) are left out, with a warning; the result's ``pairs`` says how many count."""
    n = int(max(labels.max().item(), pairs[:, 2:].max())) + 1
    full = torch.zeros(n, emb.shape[1])
    full[labels] = emb
    have = torch.zeros(n, dtype=torch.bool)
    have[labels] = True
    keep = (have[torch.from_numpy(pairs[:, 2])] & have[torch.from_numpy(pairs[:, 3])]).numpy()
    if not keep.all():
        if not keep.any():
            raise AttackError("no pair has both images embedded")
        warnings.warn(f"{int((~keep).sum())} of {len(pairs)} pairs refer to images that could not be read; "
                      "verification uses the rest", stacklevel=2)  # fmt: skip
        pairs = pairs[keep]
    sims = (full[pairs[:, 2]] * full[pairs[:, 3]]).sum(1).numpy()
    return ten_fold(sims, pairs[:, 1].astype(bool), pairs[:, 0])

