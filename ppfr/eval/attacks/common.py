"""What every attack kind shares: targets, held-out and public faces, the judge, scoring and result files.

* :func:`resolve_target` -- ``identity`` | ``method:NAME[:key=value,...]`` | a ``model.pt`` -> :class:`Target`.
* :class:`FaceSet`, :func:`load_faces`, :func:`open_val` -- decoded faces in memory (public training faces of the
  attacker, held-out faces it is scored on).
* :class:`Judge`, :func:`make_judge`, :func:`pair_verification` -- the independent recogniser that scores
  re-identification and is the linkage attacker's teacher.
* :func:`score_images` -- the one scoring path of every kind that outputs images (SSIM, PSNR, re-id).
* :func:`merge_result`, :func:`write_summary`, :func:`save_grid` -- ``<out>/<target>/result.json`` (one section
  per kind, schema in docs/attack.md), the summary table and the picture grid (a row per attack).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppfr.data.sources import FolderSource, PairSource, Source, open_source
from ppfr.eval.image_metrics import psnr, ssim
from ppfr.eval.verification import VerificationResult, ten_fold
from ppfr.methods.base import Method, MethodOptions, Payload, Stage, TensorSpec

IMAGE_SIZE = 112
# Privacy figures the papers report for the white-box U-Net recovery attack (full-scale U-Net trained on BUPT,
# 1.3 M images; METHODS.md §4.5 and §5.5). Lower = more private. For context only: this project's attacker is
# CPU-sized and trained on a few thousand CelebA faces, so its numbers are a lower bound on what an attacker gets.
PAPER_PRIVACY: dict[str, list[dict[str, Any]]] = {
    "duetface": [
        {"source": "PartialFace paper Tab.3", "ssim": 0.866, "psnr": 19.88, "reid_acc": 0.9652},
        {"source": "MinusFace paper Fig.6", "ssim": 0.84, "psnr": 19.39},
    ],
    "partialface": [
        {"source": "PartialFace paper Tab.3", "ssim": 0.591, "psnr": 13.70, "reid_acc": 0.6535},
        {"source": "MinusFace paper Fig.6", "ssim": 0.59, "psnr": 13.23},
    ],
    "minusface": [{"source": "MinusFace paper Fig.6", "ssim": 0.50, "psnr": 10.98}],
}


class AttackError(ValueError):
    """Bad attack input (target, data, judge or budget); the message says what to pass instead."""


# The linkage attacker's forms (linkage.py); ``auto`` runs every one but the student.
LINKAGE_FORMS = ("adapter", "finetune", "insider", "student")
AUTO_LINKAGE_FORMS = ("adapter", "finetune", "insider")


# ------------------------------------------------------------------------------------------ identity method
@dataclass(frozen=True)
class IdentityOptions(MethodOptions):
    image_size: int = IMAGE_SIZE


class IdentityMethod(Method):
    """Pseudo-method for the harness check: the payload is the plain RGB image, (B, 3, S, S) in [-1, 1].

    Not registered with ``build_method`` (it is no privacy method and has no server); ``ppfr attack identity``
    builds it.
    """

    name = "identity"
    Options = IdentityOptions

    def __init__(self, options: IdentityOptions | None = None) -> None:
        super().__init__(options or IdentityOptions())
        s = self.options.image_size
        self.payload_spec = {"image": TensorSpec((3, s, s), torch.float32, -1.0, 1.0)}

    def protect(self, images, labels=None, generator=None) -> Payload:
        self.check_images(images)
        return Payload(self.name, {"image": images.float()})

    def recognize(self, payload: Payload) -> torch.Tensor:
        raise NotImplementedError("the identity pseudo-method has no server; it exists to check the attack harness")

    def stages(self) -> tuple[Stage, ...]:
        return ()


@dataclass
class Target:
    """A method under attack: the module (eval mode), a filesystem-safe label, and where it came from."""

    method: Method
    label: str
    spec: str
    trained: bool
    options: dict[str, Any] = field(default_factory=dict)


def _parse_inline_options(text: str) -> dict[str, Any]:
    import yaml

    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise AttackError(f"method option {item!r} must be key=value (e.g. method:minusface:gen_width=8,depth=18)")
        k, v = item.split("=", 1)
        opts[k.strip()] = yaml.safe_load(v)
    return opts


def resolve_target(spec: str, device: torch.device | str = "cpu") -> Target:
    """``identity`` | ``method:NAME[:key=value,...]`` (untrained, built with defaults + options) | a model.pt.

    A model.pt is rebuilt with :func:`ppfr.methods.load_method` (``weights_only`` load, never an arbitrary
    unpickle): the attacker uses the very client weights that produced the payloads.
    """
    from ppfr.methods import build_method, load_method
    from ppfr.models.checkpoints import CheckpointError

    if spec == "identity":
        return Target(IdentityMethod().to(device).eval(), "identity", spec, trained=False)
    if spec.startswith("method:"):
        _, _, rest = spec.partition(":")
        name, _, opt_text = rest.partition(":")
        opts = _parse_inline_options(opt_text)
        try:
            method = build_method(name, **opts)
        except (ValueError, TypeError) as exc:
            raise AttackError(f"{spec}: {exc}") from None
        suffix = "".join(f"_{k}{v}" for k, v in opts.items())
        return Target(method.to(device).eval(), _safe_label(f"{name}{suffix}_untrained"), spec, False, opts)
    path = Path(spec)
    if not path.is_file():
        raise AttackError(f"checkpoint {spec!r} not found: pass runs/<name>/model.pt, 'identity', or 'method:NAME'")
    try:
        method = load_method(path, map_location=device)
    except CheckpointError as exc:
        raise AttackError(str(exc)) from None
    label = path.parent.name if path.name == "model.pt" else path.stem
    opts = _plain_options(method.options)
    return Target(method.eval(), _safe_label(f"{label}"), str(path), True, opts)


def _safe_label(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s).strip("_") or "target"


def _plain_options(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(obj).items() if isinstance(v, (int, float, str, bool, type(None)))}


# --------------------------------------------------------------------------------------- payload adapter
def payload_shapes(payload: Payload) -> dict[str, tuple[int, int, int]]:
    """{name: (C, H, W)} of every payload tensor, in the payload's order; refuses anything not (B, C, H, W)."""
    if not isinstance(payload, Payload):
        raise TypeError(f"expected a Payload, got {type(payload).__name__}")
    if not payload.tensors:
        raise ValueError(f"{payload.method} payload holds no tensors")
    out = {}
    for name, t in payload.tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{payload.method} payload {name!r} must be a float (B, C, H, W) tensor, got {got}")
        out[name] = tuple(int(s) for s in t.shape[1:])
    return out


def payload_to_image(payload: Payload, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The payload as one image-shaped tensor: (B, sum of channels, size, size), raw values, the payload's dtype.

    Every tensor is kept whole (all channels, raw range); maps of another spatial size (DuetFace's and PRO-Face C's
    feature maps, 7..56 px) are resized with bilinear interpolation (``align_corners=False``), then all are
    concatenated along channels in the payload's order. A MinusFace payload is already a (B, 3, 112, 112) image.
    """
    payload_shapes(payload)
    parts = []
    for t in payload.tensors.values():
        if tuple(t.shape[-2:]) != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        parts.append(t)
    return torch.cat(parts, dim=1)


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

# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AttackConfig:
    """Budgets and hyper-parameters of one attack (defaults: a ~5 minute run per method on 2 CPU cores).

    steps, batch_size: attacker training steps and images per step.
    lr: Adam learning rate, cosine-decayed to 0 over ``steps``. The papers train with 1e-3 "until convergence"
        (MinusFace paper B.2); with a few hundred CPU steps 5e-3 ends better (measured on an untrained PartialFace,
        200 steps x 16: held-out SSIM 0.35 at 1e-3, 0.42 at 5e-3, 0.34 at 1e-2, L1 loss), and a decayed rate ends in
        a better fit than stopping a constant-rate run mid-flight.
    stem_width, base_width: attacker size (U-Net widths base_width * 1, 2, 4, 8, 16; the papers' attacker is the
        full-scale 64).
    loss: ``l1+ssim`` (default: L1 + ssim_weight * (1 - SSIM)) or ``l1`` (the papers' loss). The SSIM term makes
        the stronger attacker at this budget (same PartialFace run at 5e-3: SSIM 0.55 / PSNR 13.5 dB vs 0.42 /
        13.1 dB with L1), and a privacy estimate should use the strongest attacker it can afford.
    max_train_images: how many training images are decoded and kept in memory (a random subset).
    max_val_images: held-out images scored (a random subset of a folder; None = all). With a pair list use
        max_pairs instead (a subset balanced over folds and genuine/impostor).
    flip: random horizontal flips of the training faces.
    norm_batches: payload batches used to fit the attacker's per-channel standardisation.
    time_limit: stop training after this many seconds (None: run all steps).
    secrets: ``fresh`` (every training batch protected with new per-image secrets, scored on fresh secrets: an
        attacker who does not know the key) or ``fixed`` (one key, the same for every face, in training and
        scoring: an attacker who holds the client's key, as in the key-adaptive variants of the papers).
    init: ``none`` or ``inversion``: the recovery U-Net also gets the closed-form inversion estimate as input where
        the payload is linear (ignored where it is not). The linkage adapter always starts from it where the payload
        is linear: it is the strongest form, and linkage reports the strongest attack.
    inversion_ridge: Tikhonov weight of the inversion toward the public mean face (docs/attack.md).
    inversion_patch: side of the payload patch the secret search scores candidates on (centre of the face).
    linkage_form: ``auto`` (every form that applies but the student: ``adapter,finetune,insider``; the linkage
        figure is the strongest), one form, or a comma-separated list of forms: ``adapter`` (payload -> image
        network -> frozen teacher), ``finetune`` (the adapter in front of a copy of the teacher with every weight
        trainable: FaceLinkGen's code path), ``insider`` (the server's own client and recogniser, no training) or
        ``student`` (a from-scratch IR net on the payload, FaceLinkGen's paper form). See linkage.py.
    linkage_steps, linkage_batch_size, linkage_lr: budget of the linkage attacker's training (the adapter's, and
        the frozen first phase of ``finetune`` when it runs without the adapter).
    linkage_topk: k of the top-k linkage figure.
    finetune_steps: steps of the unfrozen phase of ``finetune`` (teacher copy and adapter both train).
    finetune_lr_mult: the teacher copy's learning rate as a multiple of ``linkage_lr`` (the adapter keeps
        ``linkage_lr``); its rate warms up linearly over the first ``finetune_warmup`` steps. 0.01: the best of
        1, 0.1 and 0.01 in the sweep on held-out public identities (docs/attack.md, scripts/linkage_sweep.py).
    finetune_loss: ``centred`` (1 - cos between batch-centred prediction and target, the recipe that learns at this
        scale; queries and gallery are then scored centred on their public means) or ``cosine`` (FaceLinkGen's
        plain 1 - cos, which collapses on face-api.js: see docs/attack.md).
    select_share: share of the public identities ``finetune`` holds out of its unfrozen phase to choose, by
        linkage top-1 on them, between the phase's start (the adapter), middle and end. Never the scored faces.
    insider_views: protections of each clean photo the insider averages into its enrolment (independent secrets,
        every other one mirrored: flip TTA); 1 = one protection, the plain photo.
    linkage_init: a ``linker_<form>.pt`` written by an earlier linkage run (against any method): the linker starts
        from its weights wherever the shapes match (few-shot transfer; ``--max-train-images 256``).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-3
    stem_width: int = 32
    base_width: int = 8
    loss: str = "l1+ssim"
    ssim_weight: float = 1.0
    max_train_images: int = 2000
    max_val_images: int | None = None
    max_pairs: int | None = None
    flip: bool = True
    norm_batches: int = 4
    eval_batch_size: int = 32
    grid_images: int = 8
    seed: int = 0
    log_every: int = 50
    time_limit: float | None = None
    secrets: str = "fresh"
    init: str = "none"
    inversion_ridge: float = 1e-9
    inversion_patch: int = 24
    linkage_form: str = "auto"
    linkage_steps: int = 100
    linkage_batch_size: int = 16
    linkage_lr: float = 1e-3
    linkage_topk: int = 5
    finetune_steps: int = 100
    finetune_lr_mult: float = 0.01
    finetune_warmup: int = 10
    finetune_loss: str = "centred"
    select_share: float = 0.2
    insider_views: int = 4
    linkage_init: str | None = None

    def __post_init__(self) -> None:
        for key, lo in (("steps", 1), ("batch_size", 1), ("stem_width", 1), ("base_width", 1),
                        ("max_train_images", 1), ("norm_batches", 1), ("eval_batch_size", 1), ("grid_images", 0),
                        ("seed", 0), ("log_every", 1), ("inversion_patch", 4), ("linkage_steps", 1),
                        ("linkage_batch_size", 2), ("linkage_topk", 1), ("finetune_steps", 1),
                        ("finetune_warmup", 0), ("insider_views", 1)):  # fmt: skip
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise AttackError(f"AttackConfig.{key} must be an integer >= {lo}, got {v!r}")
        for key in ("max_val_images", "max_pairs"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise AttackError(f"AttackConfig.{key} must be None or an integer >= 1, got {v!r}")
        for key in ("lr", "linkage_lr", "inversion_ridge", "finetune_lr_mult"):
            v = getattr(self, key)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise AttackError(f"AttackConfig.{key} must be a positive number, got {v!r}")
        for key, allowed in (("secrets", ("fresh", "fixed")), ("init", ("none", "inversion")),
                             ("finetune_loss", ("centred", "cosine"))):  # fmt: skip
            if getattr(self, key) not in allowed:
                raise AttackError(f"AttackConfig.{key} must be one of {'|'.join(allowed)}, got {getattr(self, key)!r}")
        forms = [f.strip() for f in str(self.linkage_form).split(",")] if isinstance(self.linkage_form, str) else []
        bad = [f for f in forms if f not in LINKAGE_FORMS] if forms != ["auto"] else []
        if not forms or bad or "" in forms:
            raise AttackError(f"AttackConfig.linkage_form must be auto or forms of {'|'.join(LINKAGE_FORMS)} "
                              f"(comma-separated), got {self.linkage_form!r}")  # fmt: skip
        if not (isinstance(self.select_share, float) and 0.0 < self.select_share < 1.0):
            raise AttackError(f"AttackConfig.select_share must be a number in (0, 1), got {self.select_share!r}")
        if self.linkage_init is not None and not Path(self.linkage_init).is_file():
            raise AttackError(f"AttackConfig.linkage_init: {self.linkage_init!r} is not a file (pass a linker_<form>.pt "
                              "an earlier linkage run wrote)")  # fmt: skip
        if self.loss not in ("l1", "l1+ssim"):
            raise AttackError(f"AttackConfig.loss must be 'l1' or 'l1+ssim', got {self.loss!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise AttackError(f"AttackConfig.time_limit must be None or > 0 seconds, got {self.time_limit!r}")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class FaceSet:
    """Decoded faces kept in memory: images (N, 3, S, S) uint8 (exactly the loader's pixels: 4x smaller than
    float), labels (N,) int64 (identity for folders, file index for pair lists), and the source they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: Source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 in [-1, 1] (the loader's normalisation)."""
        return self.images[idx].float() / 127.5 - 1.0


class PairSubset(PairSource):
    """A pair list restricted to ``max_pairs`` pairs balanced over folds and genuine/impostor, and to the images
    those pairs use (``files``/``labels`` re-indexed; ``pairs`` rows (fold, same, a, b) point into them)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, max_pairs: int | None = None) -> None:
        super().__init__(path, image_root)
        if max_pairs is None or max_pairs >= len(self.pairs):
            return
        folds = np.unique(self.pairs[:, 0])
        if max_pairs < 2 * len(folds):
            raise AttackError(f"max_pairs={max_pairs}: 10-fold verification needs at least one genuine and one "
                              f"impostor pair per fold ({2 * len(folds)} for {len(folds)} folds)")  # fmt: skip
        per_fold = max_pairs // len(folds)
        keep = []
        for f in folds:
            for same, k in ((1, (per_fold + 1) // 2), (0, per_fold // 2)):
                rows = np.flatnonzero((self.pairs[:, 0] == f) & (self.pairs[:, 1] == same))
                keep.extend(rows[:k].tolist())
        sub = self.pairs[np.sort(np.asarray(keep))]
        used = np.unique(sub[:, 2:])
        remap = np.full(len(self.files), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        self.files = [self.files[i] for i in used]
        self.labels = np.arange(len(used), dtype=np.int64)
        sub = sub.copy()
        sub[:, 2], sub[:, 3] = remap[sub[:, 2]], remap[sub[:, 3]]
        self.pairs = sub


def open_val(spec: str, max_pairs: int | None = None) -> Source:
    """The held-out set: a pair list (-> :class:`PairSubset`, enables re-identification) or any other source."""
    from ppfr.data import DataFormatError

    try:
        src = open_source(spec)
    except DataFormatError as exc:
        raise AttackError(f"--val: {exc}") from None
    if isinstance(src, PairSource):
        return PairSubset(spec, None, max_pairs)
    return src


def load_faces(source: Source | str, *, max_images: int | None = None, seed: int = 0, batch_size: int = 64,
               size: int = IMAGE_SIZE) -> FaceSet:  # fmt: skip
    """Decode (a random subset of at most ``max_images`` of) a source into memory through ``make_loader``.

    Pair lists are read whole and in order (their labels are file indices, which the pair rows refer to).
    """
    from ppfr.data import DataFormatError
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader

    if isinstance(source, str):
        try:
            source = open_source(source)
        except DataFormatError as exc:
            raise AttackError(str(exc)) from None
    subset = max_images is not None and max_images < len(source) and not isinstance(source, PairSource)
    cfg = DataConfig(source=str(source.path), backend="torch", batch_size=batch_size, train=False, shuffle=subset,
                     flip=False, last_batch="partial", world_size=1, rank=0, num_workers=0, seed=seed,
                     image_size=size)  # fmt: skip
    images, labels, n = [], [], 0
    for x, y in make_loader(cfg, source=source):
        # the loader's x = (v - 127.5) / 127.5 for uint8 v: this inverts it exactly
        images.append(((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(y)
        n += x.shape[0]
        if subset and n >= max_images:
            break
    if not images:
        raise AttackError(f"no images could be read from {source.path}")
    imgs, labs = torch.cat(images), torch.cat(labels)
    if subset:
        imgs, labs = imgs[:max_images], labs[:max_images]
    return FaceSet(imgs, labs, source)


def _identity_names(src: Source) -> set[str] | None:
    if isinstance(src, FolderSource):
        return set(src.identities)
    if isinstance(src, PairSource):
        return {p.parent.name for p in src.files}
    return None


def identity_overlap(train: Source, val: Source) -> int | None:
    """Identity folders present in both sets (None when a source has no identity names, e.g. a .rec file)."""
    a, b = _identity_names(train), _identity_names(val)
    return None if a is None or b is None else len(a & b)


# ---------------------------------------------------------------------------------------------- training
def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A fresh, reproducible generator per (seed, stream, step): each protection draws new secrets."""
    return torch.Generator().manual_seed((seed * 4 + stream) * 1_000_003 + step)


TRAIN_STREAM, NORM_STREAM, EVAL_STREAM = 0, 1, 2


FIXED_KEY_SEED = 20_260_101


@torch.no_grad()
def protect_with(method: Method, images: torch.Tensor, cfg: AttackConfig, stream: int, step: int) -> Payload:
    """Protect a batch as ``cfg.secrets`` says: ``fresh`` draws new per-image secrets from a generator per
    (seed, stream, step); ``fixed`` gives every face the same key (each face protected alone with the same seed,
    so it gets the first draw of one generator: the same rank / permutation / layout for all)."""
    if cfg.secrets == "fresh":
        return method.protect(images, generator=_generator(cfg.seed, stream, step))
    parts = [method.protect(images[i : i + 1], generator=torch.Generator().manual_seed(FIXED_KEY_SEED))
             for i in range(images.shape[0])]  # fmt: skip
    return Payload(parts[0].method, {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


Draw = tuple[torch.Tensor, torch.Tensor]  # (indices (B,) into the FaceSet, flipped (B,) bool) of one batch


def fit_attacker(module: torch.nn.Module, loss_fn: Callable[[torch.Tensor, int, Draw], torch.Tensor],
                 train: FaceSet, cfg: AttackConfig, *, steps: int, lr: float, batch_size: int, seed: int, name: str,
                 device: torch.device | str = "cpu", log: Callable[[str], None] | None = print,
                 stop_below: float | None = None, groups: list[dict[str, Any]] | None = None,
                 on_step: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The training loop every learned kind shares: ``steps`` batches of ``batch_size`` public faces (random
    horizontal flips when ``cfg.flip``, drawn from a generator seeded with ``seed``), ``loss_fn(faces (B, 3, S, S)
    in [-1, 1], step, (indices, flipped)) -> scalar`` (the draw lets a caller look up per-face targets it cached),
    Adam on ``module``'s trainable parameters at ``lr`` cosine-decayed to 0, early stop at ``cfg.time_limit``
    seconds, or once the mean loss of the last 10 steps is below ``stop_below`` (the attacker has nothing left to
    learn: e.g. linkage through an exact inversion). ``groups``: Adam parameter groups instead (each may carry
    ``lr`` and ``warmup``, steps of a linear ramp before the cosine decay). ``on_step(step)`` runs after each step
    (e.g. a model selection). Runs under ``enable_grad`` (a caller's ``no_grad`` must not make training a silent
    no-op). Returns steps, seconds, images/s, first/last loss (means over ``cfg.log_every``-step windows) and the
    loss curve."""
    if groups is None:
        groups = [{"params": [p for p in module.parameters() if p.requires_grad]}]
    opt = torch.optim.Adam([{k: v for k, v in g.items() if k != "warmup"} for g in groups], lr=lr)

    def factor(warmup: int) -> Callable[[int], float]:
        return lambda s: min(1.0, (s + 1) / warmup if warmup else 1.0) * 0.5 * (
            1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(int(g.get("warmup", 0))) for g in groups])
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train))
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    recent: list[float] = []
    module.train()
    t0 = time.perf_counter()
    step = 0
    with torch.enable_grad():
        for step in range(1, steps + 1):
            idx = torch.randint(len(train), (bs,), generator=g)
            x = train.batch(idx)
            flip = torch.zeros(bs, dtype=torch.bool)
            if cfg.flip:  # flip the clean face before protection: payload and target see the same face
                flip = torch.rand(bs, generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = loss_fn(x.to(device), step, (idx, flip))
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name} loss became {loss.item()} at step {step}; lower its learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if on_step is not None:
                on_step(step)
            window.append(loss.item())
            recent.append(window[-1])
            converged = stop_below is not None and len(recent) >= 10 and float(np.mean(recent[-10:])) < stop_below
            timed_out = cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit
            if step % cfg.log_every == 0 or step == steps or timed_out or converged:
                curve.append((step, float(np.mean(window))))
                window = []
                if log:
                    el = time.perf_counter() - t0
                    log(f"  {name} step {step}/{steps}  loss {curve[-1][1]:.4f}  {step * bs / el:.1f} img/s  "
                        f"{el:.0f}s")  # fmt: skip
            if timed_out or converged:
                if log:
                    why = f"time limit {cfg.time_limit:.0f}s reached" if timed_out else f"converged (loss < {stop_below})"
                    log(f"  {name}: {why} after {step} steps")
                break
    secs = time.perf_counter() - t0
    module.eval()
    return {"steps": step, "batch_size": bs, "seconds": round(secs, 2),
            "images_per_s": round(step * bs / max(secs, 1e-9), 2), "loss_first": curve[0][1] if curve else None,
            "loss_last": curve[-1][1] if curve else None, "loss_curve": curve}  # fmt: skip


def identity_index(faces: FaceSet) -> torch.Tensor:
    """(N,) int64 identity of every face: the folder label, or for a pair list the image's parent folder."""
    src = faces.source
    if isinstance(src, PairSource):
        names = [p.parent.name for p in src.files]
        table = {n: i for i, n in enumerate(sorted(set(names)))}
        per_file = torch.tensor([table[n] for n in names], dtype=torch.int64)
        return per_file[faces.labels]
    return faces.labels.clone()

# ---------------------------------------------------------------------------------------------- scoring
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
    """``none`` | ``faceapi`` (the pretrained face-api.js judge, ``ppfr.models.faceapi``) | a model.pt (e.g. the
    user's trained arcface; its end-to-end ``embed``)."""
    if spec == "none":
        return None
    if spec == "faceapi":
        try:
            from ppfr.models.faceapi import load_faceapi_judge
        except ImportError as exc:
            raise AttackError(f"--judge faceapi: ppfr.models.faceapi is not available ({exc}); use --judge none or "
                              "--judge runs/<name>/model.pt") from None  # fmt: skip
        d = judge_dir or os.environ.get("PPFR_FACEAPI_DIR") or str(Path("..") / "shared" / "models" / "faceapi")
        if not Path(d).is_dir():
            raise AttackError(f"--judge faceapi: weights folder {d!r} not found; pass --judge-dir DIR (or set "
                              "PPFR_FACEAPI_DIR)")  # fmt: skip
        from ppfr.models.checkpoints import CheckpointError

        try:
            judge = load_faceapi_judge(d, device=device)
        except CheckpointError as exc:
            raise AttackError(f"--judge faceapi: {exc}") from None
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



# ------------------------------------------------------------------------------------ the plugin interface
@dataclass
class AttackContext:
    """Everything one attack kind needs for one target; ``shared`` carries results between kinds of one run
    (e.g. the inversion estimates that ``--init inversion`` feeds to the learned kinds)."""

    target: Target
    train: FaceSet
    val: FaceSet
    cfg: AttackConfig
    judge: Judge | None = None
    judge_original: VerificationResult | None = None
    device: torch.device | str = "cpu"
    log: Callable[[str], None] | None = print
    shared: dict[str, Any] = field(default_factory=dict)
    save_dir: Path | None = None  # where a kind may keep what it trained (``<out>/<target>``), None: keep nothing

    @property
    def method(self) -> Method:
        return self.target.method

    def grid_index(self) -> torch.Tensor:
        """Indices into ``val`` of the faces shown in the grid, spread evenly over the held-out set."""
        g = min(self.cfg.grid_images, len(self.val))
        return torch.linspace(0, len(self.val) - 1, g).round().long() if g else torch.zeros(0, dtype=torch.long)


class Attack:
    """An attack kind: one file under ``ppfr/eval/attacks/``, registered with :func:`register_attack`.

    ``applies(method)`` returns None or the reason the kind does not apply to that method (recorded in the result);
    ``run(ctx)`` returns the kind's section of ``result.json`` (the keys of :data:`RESULT_KEYS` that apply, plus
    kind-specific details) and may put the grid row under ``"_grid"`` ((G, 3, H, W) in [0, 1], the faces of
    ``ctx.grid_index()``).
    """

    name: str = ""
    description: str = ""
    produces_images: bool = False

    def applies(self, method: Method) -> str | None:
        return None

    def run(self, ctx: AttackContext) -> dict[str, Any]:
        raise NotImplementedError


# Every kind's section of result.json carries these keys (None where they do not apply to the kind).
RESULT_KEYS = ("ssim", "psnr", "reid_acc", "linkage_top1", "linkage_topk", "tar_at_fmr", "key_recovery", "n_faces",
               "time_s")  # fmt: skip


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
