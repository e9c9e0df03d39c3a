"""The base of the attack kinds: the attack plugin interface, the method under attack and the attack budget.

* :class:`Attack`, :class:`AttackContext` -- what a kind implements and what it is given (one file per kind,
  registered with :func:`ppfr.eval.attacks.register_attack`).
* :func:`resolve_target` -- ``identity`` | a model spec (``ppfr.methods.spec``: model.pt, run folder,
  ``method:NAME[:key=value,...]``) -> :class:`Target`.
* :class:`AttackConfig` -- budgets and hyper-parameters; :class:`AttackError` -- bad attack input.
* :func:`payload_shapes`, :func:`payload_to_image` -- a payload seen as image-shaped tensors.

The rest lives beside it, one responsibility per module: :mod:`.data` (public and held-out faces, protection with
fresh or fixed secrets), :mod:`.judge` (the independent recogniser), :mod:`.fit` (the training loop every learned
kind shares), :mod:`.results` (the scoring path, ``result.json``, the picture grid).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ppfr.methods.base import Method, MethodOptions, Payload, Stage, TensorSpec

if TYPE_CHECKING:  # the context carries them; their modules build on this one
    from ppfr.eval.attacks.data import FaceSet
    from ppfr.eval.attacks.judge import Judge
    from ppfr.eval.verification import VerificationResult


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


def resolve_target(spec: str, device: torch.device | str = "cpu") -> Target:
    """``identity`` (the harness check) or a model spec -> :class:`Target` (method in eval mode on ``device``).

    The spec is read by :func:`ppfr.methods.spec.load_model`, as every verb reads it: a model.pt or its run folder
    (rebuilt with ``weights_only`` loading: the attacker uses the very client weights that produced the payloads),
    or ``method:NAME[:key=value,...]`` (untrained, with the one fixed seed, so ``ppfr attack method:duetface``
    attacks the weights ``ppfr export`` / ``ppfr serve`` run). AttackError (one line) for a spec that names
    nothing, a file that is no ppfr model, or a model whose method is not installed.
    """
    from ppfr.methods.spec import SpecError, load_model
    from ppfr.models.checkpoints import CheckpointError

    if spec == "identity":
        return Target(IdentityMethod().to(device).eval(), "identity", spec, trained=False)
    try:
        method, src = load_model(spec, map_location=device)
    except (SpecError, CheckpointError) as exc:
        raise AttackError(str(exc)) from None
    if src.kind == "method":
        suffix = "".join(f"_{k}{v}" for k, v in src.options.items())
        return Target(method, _safe_label(f"{src.name}{suffix}_untrained"), spec, False, dict(src.options))
    assert src.path is not None
    label = src.path.parent.name if src.path.name == "model.pt" else src.path.stem
    return Target(method, _safe_label(label), str(src.path), True, _plain_options(method.options))


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
    ``run(ctx)`` returns the kind's section of ``result.json`` (the keys of :data:`.results.RESULT_KEYS` that apply, plus
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

