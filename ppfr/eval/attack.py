"""The recovery attack on a method's real payload (METHODS.md §7.4): can what leaves the client be turned back into
the face?

Threat model (the papers' *white-box* attacker): the attacker sees payloads on the wire, knows the method and, where
the payload depends on them, the client's trained weights (it rebuilds the method from the same ``model.pt``), but
not the per-image secrets drawn at protection time (PartialFace's rank, MinusFace's channel permutation, PRO-Face
C's blur layout). It trains a recovery network on public faces of *other* identities: each step it protects a batch
with a fresh random generator -- so it learns over the whole space of ranks / shuffles, as a real attacker
sampling its own protections would -- and regresses the RGB face. It is then scored on held-out identities: SSIM
and PSNR of recovered vs original, and re-identification, the 10-fold verification accuracy a face recogniser
(the judge) reaches on the recovered faces.

Pieces:

* :func:`payload_to_image` -- the payload-to-image adapter: every payload tensor flattened to channels and resized
  (bilinear) to the image size, concatenated: (B, C_total, S, S).
* :class:`RecoveryAttacker` -- per-channel standardisation + a learned 1x1 projection of that flattened tensor
  (:class:`PayloadStem`, computed at each tensor's native resolution, which is the same linear map without the
  huge intermediate) + :class:`ppfr.models.unet.UNet` (in = stem width, out = 3) + a linear 1x1 shortcut -> RGB.
* :func:`train_attacker`, :func:`evaluate_attack`, :func:`run_attack` -- training (L1 or L1 + SSIM, Adam, cosine
  lr), held-out scoring, and the whole run with its JSON / Markdown / PNG outputs.
* ``identity`` -- a pseudo-method whose payload is the plain RGB image: the harness check (the attacker must
  reproduce it almost perfectly, SSIM > 0.9, on a CPU budget).
* ``ppfr attack`` -- the CLI verb (:func:`register`, :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.data.sources import FolderSource, PairSource, Source, open_source
from ppfr.eval.image_metrics import psnr, ssim
from ppfr.eval.verification import VerificationResult, ten_fold
from ppfr.methods.base import Method, MethodOptions, Payload, Stage, TensorSpec
from ppfr.models.unet import UNet

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


# ----------------------------------------------------------------------------------------------- attacker
class PayloadStem(nn.Module):
    """Per-channel standardisation + a learned 1x1 projection of the flattened payload to ``width`` channels.

    Mathematically ``conv1x1(standardise(payload_to_image(payload)))``, computed per tensor at its native
    resolution and then resized: standardisation and a 1x1 convolution act on channels, bilinear resizing on space,
    so they commute (bilinear weights sum to 1, so the bias commutes too). DuetFace's payload flattens to 995
    channels at 112x112 (50 MB per image in float32); this form never builds that tensor.

    Raw DCT coefficients span +-1000 for the DC channel and ~1e-2 for high frequencies; the standardisation
    statistics (buffers ``mean_i``, ``std_i``, (C_i,)) are fitted once on training payloads by :meth:`fit`.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], width: int, size: int = IMAGE_SIZE) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"stem width must be >= 1, got {width}")
        self.names = list(shapes)
        self.shapes = dict(shapes)
        self.size = size
        self.proj = nn.ModuleList([nn.Conv2d(c, width, 1, bias=False) for c, _, _ in shapes.values()])
        self.bias = nn.Parameter(torch.zeros(width))
        for i, (c, _, _) in enumerate(shapes.values()):
            self.register_buffer(f"mean_{i}", torch.zeros(c))
            self.register_buffer(f"std_{i}", torch.ones(c))

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        if list(tensors) != self.names:
            raise ValueError(f"attacker expects payload tensors {self.names}, got {list(tensors)}")
        for name, t in tensors.items():
            if tuple(t.shape[1:]) != self.shapes[name]:
                raise ValueError(f"payload {name!r} is {tuple(t.shape[1:])}, the attacker was built for "
                                 f"{self.shapes[name]}")  # fmt: skip

    @torch.no_grad()
    def fit(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """Set per-channel mean and std from payload batches (float64 sums; a constant channel gets std 1)."""
        n = 0
        sums = [torch.zeros(c, dtype=torch.float64) for c, _, _ in self.shapes.values()]
        sqs = [torch.zeros(c, dtype=torch.float64) for c, _, _ in self.shapes.values()]
        counts = [0] * len(self.names)
        for tensors in batches:
            self.check(tensors)
            for i, t in enumerate(tensors.values()):
                t = t.detach().to("cpu", torch.float64)
                sums[i] += t.sum(dim=(0, 2, 3))
                sqs[i] += t.pow(2).sum(dim=(0, 2, 3))
                counts[i] += t.shape[0] * t.shape[2] * t.shape[3]
            n += 1
        if n == 0:
            raise ValueError("PayloadStem.fit needs at least one payload batch")
        for i in range(len(self.names)):
            mean = sums[i] / counts[i]
            std = (sqs[i] / counts[i] - mean.pow(2)).clamp_min(0).sqrt()
            std = torch.where(std > 1e-8 * (1 + mean.abs()), std, torch.ones_like(std))
            getattr(self, f"mean_{i}").copy_(mean.float())
            getattr(self, f"std_{i}").copy_(std.float())

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, C_i, H_i, W_i)} -> (B, width, size, size)."""
        self.check(tensors)
        out = None
        for i, t in enumerate(tensors.values()):
            mean, std = getattr(self, f"mean_{i}"), getattr(self, f"std_{i}")
            h = self.proj[i]((t.to(mean.dtype) - mean[:, None, None]) / std[:, None, None])
            if tuple(h.shape[-2:]) != (self.size, self.size):
                h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
            out = h if out is None else out + h
        return out + self.bias[:, None, None]


class RecoveryAttacker(nn.Module):
    """Payload -> RGB face: :class:`PayloadStem` (-> ``stem_width`` channels h), then ``UNet(stem_width, 3,
    base_width)(h) + shortcut(h) + 0.5``, with ``shortcut`` a 1x1 convolution.

    The linear shortcut is there because several payloads are (locally) linear in the image: the plain image, and
    the block DCT, whose 192 coefficients at a pixel determine that pixel linearly. A per-pixel linear map inverts
    those exactly, which a U-Net alone learns only slowly; the U-Net supplies everything non-linear. The output has
    no squashing (+0.5 centres the untrained output on mid-grey): the L1 loss sees the raw output, and
    :meth:`recover` clamps to [0, 1].

    forward({name: (B, C_i, H_i, W_i)}) -> (B, 3, size, size), unclamped. ``size`` must be a multiple of 16.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], *, stem_width: int = 32, base_width: int = 8,
                 size: int = IMAGE_SIZE) -> None:  # fmt: skip
        super().__init__()
        if size % 16:
            raise ValueError(f"image size must be a multiple of 16 for the U-Net, got {size}")
        if base_width < 1:
            raise ValueError(f"attacker base width must be >= 1, got {base_width}")
        self.stem = PayloadStem(shapes, stem_width, size)
        self.unet = UNet(stem_width, 3, base_width)
        self.shortcut = nn.Conv2d(stem_width, 3, 1)
        # channels-last: the narrow convolutions of a small U-Net run 2-3x faster on CPU in this layout (measured,
        # one thread, 112x112, widths 8..128)
        self.to(memory_format=torch.channels_last)

    def forward(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.stem(tensors).contiguous(memory_format=torch.channels_last)
        out, _ = self.unet(h)
        return out + self.shortcut(h) + 0.5

    def recover(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 3, size, size) in [0, 1]."""
        return self.forward(tensors).clamp(0, 1)


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

    def __post_init__(self) -> None:
        for key, lo in (("steps", 1), ("batch_size", 1), ("stem_width", 1), ("base_width", 1),
                        ("max_train_images", 1), ("norm_batches", 1), ("eval_batch_size", 1), ("grid_images", 0),
                        ("seed", 0), ("log_every", 1)):  # fmt: skip
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise AttackError(f"AttackConfig.{key} must be an integer >= {lo}, got {v!r}")
        for key in ("max_val_images", "max_pairs"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise AttackError(f"AttackConfig.{key} must be None or an integer >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise AttackError(f"AttackConfig.lr must be a positive number, got {self.lr!r}")
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


@torch.no_grad()
def _protect(method: Method, images: torch.Tensor, generator: torch.Generator) -> Payload:
    return method.protect(images, generator=generator)


def build_attacker(method: Method, train: FaceSet, cfg: AttackConfig,
                   device: torch.device | str = "cpu") -> RecoveryAttacker:  # fmt: skip
    """An attacker sized for ``method``'s payload, its standardisation fitted on ``cfg.norm_batches`` batches."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    for i in range(cfg.norm_batches):
        idx = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=g)
        batches.append(_protect(method, train.batch(idx).to(device), _generator(cfg.seed, NORM_STREAM, i)).tensors)
    shapes = payload_shapes(Payload("probe", batches[0]))
    attacker = RecoveryAttacker(shapes, stem_width=cfg.stem_width, base_width=cfg.base_width,
                                size=train.images.shape[-1])  # fmt: skip
    attacker.stem.fit(batches)
    return attacker.to(device)


def attack_loss(recovered: torch.Tensor, target: torch.Tensor, cfg: AttackConfig) -> torch.Tensor:
    """L1 (or L1 + w (1 - SSIM)) between the attacker's raw output and the original faces, (B, 3, H, W); target
    in [0, 1]."""
    loss = (recovered - target).abs().mean()
    if cfg.loss == "l1+ssim":  # SSIM is defined on [0, 1]; the L1 term keeps pulling clamped pixels back
        s = ssim(recovered.clamp(0, 1), target, dtype=torch.float32)  # float32: ~4x cheaper than float64
        loss = loss + cfg.ssim_weight * (1.0 - s.mean())
    return loss


def train_attacker(method: Method, attacker: RecoveryAttacker, train: FaceSet, cfg: AttackConfig,
                   device: torch.device | str = "cpu", log: Callable[[str], None] | None = print) -> dict:  # fmt: skip
    """Train ``attacker`` on ``method.protect`` of training faces, a fresh protection generator every step.

    Returns a summary: steps run, seconds, images/s, first/last loss (mean of up to ``log_every`` steps) and the
    loss curve.
    """
    opt = torch.optim.Adam(attacker.parameters(), lr=cfg.lr)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bs = min(cfg.batch_size, len(train))
    attacker.train()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    first = None
    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(train), (bs,), generator=g)
        x = train.batch(idx)
        if cfg.flip:
            flip = torch.rand(bs, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.to(device)
        payload = _protect(method, x, _generator(cfg.seed, TRAIN_STREAM, step))
        loss = attack_loss(attacker(payload.tensors), x * 0.5 + 0.5, cfg)
        if not torch.isfinite(loss):
            raise RuntimeError(f"attack loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean = float(np.mean(window))
            first = mean if first is None else first
            curve.append((step, mean))
            window = []
            if log:
                el = time.perf_counter() - t0
                log(f"  step {step}/{cfg.steps}  loss {mean:.4f}  {step * bs / el:.1f} img/s  {el:.0f}s")
        if cfg.time_limit is not None and time.perf_counter() - t0 > cfg.time_limit:
            if window:
                curve.append((step, float(np.mean(window))))
            if log:
                log(f"  time limit {cfg.time_limit:.0f}s reached after {step} steps")
            break
    secs = time.perf_counter() - t0
    attacker.eval()
    return {"steps": step, "batch_size": bs, "seconds": round(secs, 2), "images_per_s": round(step * bs / secs, 2),
            "loss_first": curve[0][1] if curve else None, "loss_last": curve[-1][1] if curve else None,
            "loss_curve": curve}  # fmt: skip


# ---------------------------------------------------------------------------------------------- scoring
Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Judge:
    """A face recogniser scoring re-identification: ``embed(images (B,3,112,112) in [-1,1]) -> (B, D)``."""

    name: str
    embed: Embed


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
        return Judge("faceapi", lambda x: judge.embed(x))
    if spec == "identity":
        raise AttackError("--judge identity: the identity pseudo-method has no recogniser; use faceapi or a model.pt")
    target = resolve_target(spec, device)
    if not target.trained:
        warnings.warn(f"judge {spec!r} is untrained: its verification accuracy is meaningless", stacklevel=2)
    m = target.method

    def embed(x: torch.Tensor) -> torch.Tensor:
        # a fixed generator: the judge's own protection (if any) must not add noise between the two images of a pair
        return m.embed(x, generator=torch.Generator().manual_seed(0))

    return Judge(f"{target.label} ({m.name})", embed)


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


@torch.no_grad()
def evaluate_attack(method: Method, attacker: RecoveryAttacker, val: FaceSet, cfg: AttackConfig,
                    judge: Judge | None = None, device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Protect every held-out face (fixed per-batch generators), recover it, and score it.

    Returns {"ssim": (N,) float64, "psnr": (N,) float64, "judge_emb": (N, D) or None, "grid": (original, payload
    view, recovered) each (G, 3, H, W) in [0, 1], or None}. The G = ``cfg.grid_images`` grid faces are spread
    evenly over the held-out set (a pair list or folder lists an identity's images together).
    """
    attacker.eval()
    ssims, psnrs, embs = [], [], []
    g = min(cfg.grid_images, len(val))
    picks = set(torch.linspace(0, len(val) - 1, g).round().long().tolist()) if g else set()
    rows: list[list[torch.Tensor]] = [[], [], []]
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        idx = torch.arange(start, min(start + cfg.eval_batch_size, len(val)))
        x = val.batch(idx).to(device)
        payload = _protect(method, x, _generator(cfg.seed, EVAL_STREAM, k))
        rec = attacker.recover(payload.tensors)
        target = x * 0.5 + 0.5
        ssims.append(ssim(rec, target).cpu())
        psnrs.append(psnr(rec, target).cpu())
        if judge is not None:
            embs.append(F.normalize(judge.embed(rec * 2 - 1).float(), dim=1).cpu())
        sel = [j for j, i in enumerate(idx.tolist()) if i in picks]
        if sel:
            view = visualise_payload(Payload(payload.method, {n: v[sel] for n, v in payload.tensors.items()}),
                                     getattr(method, "payload_spec", None))  # fmt: skip
            for row, t in zip(rows, (target[sel], view, rec[sel])):
                row.append(t.cpu())
    grid = tuple(torch.cat(r) for r in rows) if g else None
    return {"ssim": torch.cat(ssims), "psnr": torch.cat(psnrs), "judge_emb": torch.cat(embs) if embs else None,
            "grid": grid}  # fmt: skip


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


def run_attack(target: Target, train: FaceSet, val: FaceSet, cfg: AttackConfig, out_dir: Path | None = None,
               judge: Judge | None = None, judge_on_originals: VerificationResult | None = None,
               device: torch.device | str = "cpu", log: Callable[[str], None] | None = print) -> dict:  # fmt: skip
    """Train the attacker on ``train``, score it on ``val``, and (with ``out_dir``) write
    ``out_dir/<label>/result.json`` and ``grid.png``. Returns the result dict written to the JSON."""
    method = target.method
    t0 = time.perf_counter()
    attacker = build_attacker(method, train, cfg, device)
    shapes = attacker.stem.shapes
    n_params = sum(p.numel() for p in attacker.parameters())
    if log:
        desc = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())
        log(f"[{target.label}] payload {desc}; attacker {n_params / 1e6:.2f} M parameters; "
            f"{len(train)} train / {len(val)} held-out faces")  # fmt: skip
    summary = train_attacker(method, attacker, train, cfg, device, log)
    ev = evaluate_attack(method, attacker, val, cfg, judge, device)
    s, p = ev["ssim"].numpy(), ev["psnr"].numpy()
    result: dict[str, Any] = {
        "label": target.label,
        "target": target.spec,
        "method": method.name,
        "trained": target.trained,
        "method_options": target.options,
        "payload": {k: list(v) for k, v in shapes.items()},
        "payload_channels": sum(v[0] for v in shapes.values()),
        "attacker": {"stem_width": cfg.stem_width, "base_width": cfg.base_width, "parameters": n_params},
        "config": asdict(cfg),
        "train": {**{k: v for k, v in summary.items()}, "images": len(train),
                  "identities": int(torch.unique(train.labels).numel()), "source": str(train.source.path)},
        "heldout": {"images": len(val), "source": str(val.source.path), "ssim_mean": float(s.mean()),
                    "ssim_std": float(s.std()), "psnr_mean": float(p.mean()), "psnr_std": float(p.std()),
                    "psnr_median": float(np.median(p))},
        "identity_overlap": identity_overlap(train.source, val.source),
        "reid": None,
        "paper": PAPER_PRIVACY.get(method.name, []),
    }  # fmt: skip
    if judge is not None and isinstance(val.source, PairSource):
        rec = pair_verification(ev["judge_emb"], val.labels, val.source.pairs)
        result["reid"] = {"judge": judge.name, "recovered": _vr(rec), "original": _vr(judge_on_originals)}
    result["seconds_total"] = round(time.perf_counter() - t0, 2)
    if log:
        reid = result["reid"]
        extra = f", re-id acc {reid['recovered']['accuracy'] * 100:.2f} %" if reid else ""
        log(f"[{target.label}] held-out SSIM {s.mean():.4f} +- {s.std():.4f}, PSNR {p.mean():.2f} dB{extra} "
            f"({result['seconds_total']:.0f}s)")  # fmt: skip
    if out_dir is not None:
        d = Path(out_dir) / target.label
        d.mkdir(parents=True, exist_ok=True)
        if ev["grid"] is not None:
            save_grid(ev["grid"], d / "grid.png")
            result["grid"] = "grid.png"
        (d / "result.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------- reporting
def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_table(results: list[dict]) -> str:
    """One row per attacked target: payload, budget, held-out SSIM/PSNR, re-identification, the papers' figures."""
    lines = [
        "| target | method | payload ch. | train steps × batch | held-out faces | SSIM ↓ | PSNR dB ↓ "
        "| re-id acc % ↓ (judge on originals) | paper SSIM / PSNR / acc % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        h, t, reid = r["heldout"], r["train"], r.get("reid")
        if reid and reid.get("recovered"):
            orig = reid.get("original")
            acc = f"{reid['recovered']['accuracy'] * 100:.2f}"
            acc += f" ({orig['accuracy'] * 100:.2f}, {reid['judge']})" if orig else f" ({reid['judge']})"
        else:
            acc = "–"
        paper = r.get("paper") or []
        if paper:
            pp = paper[0]
            acc_p = f"{pp['reid_acc'] * 100:.2f}" if "reid_acc" in pp else "–"
            ptxt = f"{pp['ssim']:.3f} / {pp['psnr']:.2f} / {acc_p} ({pp['source']})"
        else:
            ptxt = "–"
        lines.append(f"| {r['label']} | {r['method']} | {r['payload_channels']} | {t['steps']} × {t['batch_size']} | "
                     f"{h['images']} | {_fmt(h['ssim_mean'], '.4f')} | {_fmt(h['psnr_mean'], '.2f')} | {acc} | "
                     f"{ptxt} |")  # fmt: skip
    lines.append("")
    lines.append("SSIM: Wang et al. 2004, 11×11 Gaussian σ=1.5, per channel then averaged (ppfr.eval.image_metrics); "
                 "PSNR on [0, 1]. ↓ = lower is more private. Paper figures: full-scale U-Net trained on BUPT "
                 "(1.3 M images), METHODS.md §4.5/§5.5.")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path) -> tuple[Path, Path]:
    """Collect every ``out_dir/*/result.json`` into ``results.json`` and ``results.md`` (so attacks run one at a
    time accumulate into one table)."""
    out_dir = Path(out_dir)
    results = []
    for p in sorted(out_dir.glob("*/result.json")):
        try:
            results.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable {p}: {exc}", stacklevel=2)
    results.sort(key=lambda r: r.get("label", ""))
    jp, mp = out_dir / "results.json", out_dir / "results.md"
    jp.write_text(json.dumps(results, indent=2) + "\n")
    mp.write_text("# Recovery attack results\n\n" + markdown_table(results))
    return jp, mp


# --------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = AttackConfig()
    ap = argparse.ArgumentParser(
        prog="ppfr attack",
        description="White-box recovery attack: train a U-Net to turn a method's payload back into the face, then "
        "report SSIM / PSNR and re-identification on held-out identities (docs/attack.md).",
    )
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                    help="runs/<name>/model.pt, 'identity' (harness check: payload = the RGB image), or "
                         "'method:NAME[:key=value,...]' (an untrained method, e.g. method:minusface:gen_width=8)")
    ap.add_argument("--data", required=True, help="training faces (identities disjoint from --val): a folder etc.")
    ap.add_argument("--val", required=True,
                    help="held-out faces: a pair list (enables re-identification) or a folder/other source")
    ap.add_argument("--judge", default="faceapi",
                    help="re-identification judge: faceapi (default), a model.pt (e.g. your arcface), or none")
    ap.add_argument("--judge-dir", default=None,
                    help="face-api.js weights folder (default $PPFR_FACEAPI_DIR or ../shared/models/faceapi)")
    ap.add_argument("--out", default="runs/attack", help="output folder (default runs/attack)")
    ap.add_argument("--steps", type=int, default=d.steps, help="attacker training steps (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="faces per step (default %(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr, help="Adam lr, cosine-decayed (default %(default)s)")
    ap.add_argument("--width", type=int, default=d.base_width, help="attacker U-Net base width (default %(default)s)")
    ap.add_argument("--stem-width", type=int, default=d.stem_width,
                    help="channels of the payload projection (default %(default)s)")
    ap.add_argument("--loss", default=d.loss, choices=["l1", "l1+ssim"],
                    help="l1 is the papers' loss (default %(default)s)")
    ap.add_argument("--max-train-images", type=int, default=d.max_train_images,
                    help="training faces kept in memory, a random subset (default %(default)s)")
    ap.add_argument("--max-val-images", type=int, default=None, help="held-out folder: score a random subset")
    ap.add_argument("--max-pairs", type=int, default=None, help="held-out pair list: a balanced subset of pairs")
    ap.add_argument("--no-flip", action="store_true", help="no random flips of the training faces")
    ap.add_argument("--time-limit", type=float, default=None, help="stop training each attacker after SECONDS")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        cfg = AttackConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, stem_width=args.stem_width,
                           base_width=args.width, loss=args.loss, max_train_images=args.max_train_images,
                           max_val_images=args.max_val_images, max_pairs=args.max_pairs, flip=not args.no_flip,
                           seed=args.seed, time_limit=args.time_limit)  # fmt: skip
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise AttackError("--device cuda: no CUDA device is available")
        # resolve everything that can fail on user input before spending minutes on training
        targets = [resolve_target(c, device) for c in args.checkpoints]
        val_src = open_val(args.val, cfg.max_pairs)
        judge = make_judge(args.judge, args.judge_dir, device) if isinstance(val_src, PairSource) else None
        if args.judge != "none" and not isinstance(val_src, PairSource):
            print("ppfr attack: --val is not a pair list: re-identification is skipped", file=sys.stderr)
        train = load_faces(args.data, max_images=cfg.max_train_images, seed=cfg.seed)
        val = load_faces(val_src, max_images=cfg.max_val_images, seed=cfg.seed)
    except AttackError as exc:
        print(f"ppfr attack: {exc}", file=sys.stderr)
        return 2
    overlap = identity_overlap(train.source, val.source)
    if overlap:
        print(f"ppfr attack: warning: {overlap} identities appear in both --data and --val; held-out figures are "
              "optimistic for the attacker", file=sys.stderr)  # fmt: skip
    print(f"ppfr attack: {len(train)} training faces ({int(torch.unique(train.labels).numel())} identities), "
          f"{len(val)} held-out faces; torch threads {torch.get_num_threads()}")  # fmt: skip
    original = None
    if judge is not None:
        t0 = time.perf_counter()
        emb = judge_embeddings(judge, (val.batch(torch.arange(i, min(i + cfg.eval_batch_size, len(val)))).to(device)
                                       for i in range(0, len(val), cfg.eval_batch_size)))  # fmt: skip
        original = pair_verification(emb, val.labels, val.source.pairs)
        print(f"judge {judge.name} on the original faces: {original} ({time.perf_counter() - t0:.0f}s)")
    out = Path(args.out)
    for target in targets:
        run_attack(target, train, val, cfg, out, judge, original, device)
    jp, mp = write_summary(out)
    print(f"wrote {out}/<target>/result.json + grid.png, {jp}, {mp}")
    print(mp.read_text())
    return 0


def register(sub) -> None:
    """Add the ``attack`` verb to ``ppfr``'s parser (parsed by :func:`main`, so ``ppfr attack -h`` is complete)."""
    from ppfr.cli import add_delegating_verb

    add_delegating_verb(sub, "attack", "white-box recovery attack on a method's payload (SSIM/PSNR/re-id)", main)


if __name__ == "__main__":
    sys.exit(main())
