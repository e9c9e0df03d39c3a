"""The Method protocol: what leaves the client (a typed Payload), what the server computes, how it trains.

A method is an ``nn.Module`` plugin registered under a name with a frozen options dataclass:

* ``protect(images, labels=None, generator=None) -> Payload`` -- the client side; exactly METHODS.md §8's
  "what leaves the client".
* ``recognize(payload) -> (B, D) embeddings`` -- the server side; it accepts only its own Payload (schema-checked),
  never an image where a payload is expected.
* ``stages()`` -- the training stages in order; each names the submodules it trains (everything else is frozen and
  put in eval mode by ``set_stage``), and ``training_step(stage, images, labels, head)`` gives its loss.

Adding a method is one file with one ``@register_method`` class; the trainer never asks which method it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ppfr.methods.contract import check_origin, check_structure
from ppfr.methods.contract import check_values as check_payload_values

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """Per-sample shape, dtype and value range of one payload tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    low: float | None = None
    high: float | None = None


@dataclass
class Payload:
    """What crosses the wire for one batch: named tensors with a leading batch axis, tagged with the method."""

    method: str
    tensors: dict[str, torch.Tensor]
    schema_version: int = SCHEMA_VERSION

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def nbytes_per_sample(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> Payload:
        return Payload(self.method, {k: v.to(device) for k, v in self.tensors.items()}, self.schema_version)

    def validate(self, method: str, spec: dict[str, TensorSpec], check_values: bool | None = None) -> None:
        """Raise ValueError naming what is wrong if this payload is not ``method``'s payload.

        Structure (method, schema version, names, per-sample shape, dtype, batch size) is metadata and always
        checked. Values (finite, inside the spec's [low, high]) must be read on the host, which for a device
        tensor waits for every queued kernel; ``check_values=None`` (the default) therefore checks them only
        when every tensor is on the CPU and no trace is running. Payloads that arrive from outside are checked
        where they enter, on the host: ``ppfr serve`` refuses non-finite and out-of-range payloads before they
        reach a device, and refuses non-finite embeddings on the way out. On a device an unchecked NaN gives
        a NaN embedding, not an error; pass ``check_values=True`` to check anyway (it synchronises).
        """
        if not isinstance(self, Payload):
            raise TypeError(f"{method} expects a Payload, got {type(self).__name__}")
        # the one contract of ppfr.methods.contract, which the runners and the server check as well (through
        # ppfr.deploy.protocol)
        check_origin(self.method, self.schema_version, method, SCHEMA_VERSION)
        check_structure(spec, self.tensors, f"{method} payload", array_type=torch.Tensor, allow_empty=True)
        if _tracing():  # value checks need concrete data; an exported graph's runner checks ranges itself
            return
        if check_values is None:
            check_values = all(t.device.type == "cpu" for t in self.tensors.values())
        if check_values:
            check_payload_values(spec, self.tensors, f"{method} payload")


def _tracing() -> bool:
    """True while torch.jit.trace / torch.export / torch.compile trace (ONNX export): no data-dependent checks."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@dataclass(frozen=True)
class FreqPayloadOperator:
    """A payload tensor that is a known linear function of the face: ``payload.tensors[tensor] ==
    freq_encode(images, candidates[r])`` for one row r of ``candidates`` per image (METHODS.md §2: block DCT of the
    8x up-sampled image, a fixed linear map of the pixels).

    tensor: the payload tensor's name.
    candidates: (R, C) int64 colour-major channel indices (64 * colour + 8u + v), one row per channel list the
        client may have used -- its whole per-image secret space (R = 1: no secret). The closed-form inversion
        attack (``ppfr attack --kind inversion``) solves for the face over this operator and, where R > 1, searches
        the rows by residual: the attacker is never told which row an image used.
    names: (R,) a label per row (e.g. ``S2P1``: subset 2, permutation 1).
    """

    tensor: str
    candidates: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        c = self.candidates
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.dtype != torch.int64 or c.numel() == 0:
            raise ValueError("FreqPayloadOperator.candidates must be a non-empty (R, C) int64 tensor")
        if len(self.names) != c.shape[0]:
            raise ValueError(f"FreqPayloadOperator.names has {len(self.names)} labels for {c.shape[0]} candidates")
        if int(c.min()) < 0 or int(c.max()) >= 192:
            raise ValueError("FreqPayloadOperator.candidates must be channel indices in [0, 192)")


EMBEDDING_OUTPUT = "embedding"  # the server graph's one output: (B, D) raw embeddings


@dataclass(frozen=True)
class ExportGraph:
    """One graph of a method that ``ppfr export`` can write (``Method.export_graphs``).

    inputs: the graph's inputs in order (per-sample shapes; a leading batch axis is added).
    outputs: output name -> per-sample shape, in order.
    forward: ``forward(*inputs in order) -> a tensor or a tuple of tensors`` (the outputs in order).
    sample: ``sample(images, generator) -> {input name: tensor}``: realistic inputs made from (B, 3, H, W) faces by
        the method's own client pipeline (the export's parity check runs on them).
    discontinuous: the graph prunes or quantizes, so a 1e-7 difference upstream can flip an element across a
        threshold or a rounding boundary (the parity check then counts mismatching elements instead).
    refusal: why these options cannot be exported (e.g. a random layer drawn on every forward), or None.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, tuple[int, ...]]
    forward: Callable[..., Any]
    sample: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]
    discontinuous: bool = False
    refusal: str | None = None


@dataclass(frozen=True)
class Stage:
    """A training stage: which submodules (attribute names) it trains; all others are frozen."""

    name: str
    trainable: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by all methods. Subclasses add their own (frozen dataclasses; unknown keys are errors)."""

    embedding_size: int = 512

    def __post_init__(self) -> None:
        if self.embedding_size < 1:
            raise ValueError(f"embedding_size must be positive, got {self.embedding_size}")


class Method(nn.Module):
    """Base class of the method plugins (see the module docstring)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    payload_spec: dict[str, TensorSpec]

    def __init__(self, options: MethodOptions) -> None:
        super().__init__()
        self.options = options
        self.stage: str | None = None

    # ---- client / server -----------------------------------------------------------------------------
    def protect(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Payload:  # fmt: skip
        """The client side: (B, 3, H, W) RGB in [-1, 1] -> this method's Payload, on ``images``' device.

        Never waits for the device (no value read back to the host; DuetFace's ``roi="pfld"`` is the one
        exception, see its module): random secrets are drawn on ``generator``'s device when one is given (a CPU
        generator gives the same draws on every device, copied over non-blocking), else on ``images``' device
        from its global RNG. Random parameters that fix shapes (PRO-Face C's blur grid and kernel sizes) are
        host draws and never touch the device.
        """
        raise NotImplementedError

    def recognize(self, payload: Payload) -> torch.Tensor:
        """The server side: this method's Payload -> (B, D) embeddings.

        Validation policy (:meth:`check_payload`): the payload's structure is always checked (Python-level
        metadata, no host sync); its values (finite, in range) are refused with a ValueError on CPU tensors and
        not read on a GPU, where reading them would stall the stream -- ``ppfr serve`` checks them on the host
        before the batch is moved to the device.
        """
        raise NotImplementedError

    def payload_operator(self) -> FreqPayloadOperator | None:
        """The payload as a known linear function of the image, or None (the default: not linear, e.g. a learned
        client network's output). Declaring it gives the method the closed-form inversion attack for free."""
        return None

    def export_graphs(self) -> dict[str, ExportGraph]:
        """The graphs ``ppfr export --part PART`` can write: ``server`` (payload -> ``embedding``, every method) and,
        for a method whose client side holds a learned network, ``client`` (that network: its input -> the payload
        tensors it produces). A method with such a network, or with options that cannot be exported, overrides
        this (calling it for the server graph)."""
        names = list(self.payload_spec)

        def server(*tensors: torch.Tensor) -> torch.Tensor:
            return self.recognize(Payload(self.name, dict(zip(names, tensors))))

        def payloads(images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
            return dict(self.protect(images, generator=generator).tensors)

        size = (int(self.options.embedding_size),)
        return {"server": ExportGraph(dict(self.payload_spec), {EMBEDDING_OUTPUT: size}, server, payloads)}

    def embed(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """recognize(protect(images)): the end-to-end embedding (B, D) used for evaluation."""
        return self.recognize(self.protect(images, generator=generator))

    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.name}.protect expects RGB images (B, 3, H, W) in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"{self.name}.protect expects floating images, got {images.dtype}")

    def check_payload(self, payload: Payload) -> None:
        """Refuse anything but this method's Payload (see :meth:`Payload.validate`: the structure always; the
        values -- finite, in range -- on CPU tensors only, so ``recognize`` on a GPU never waits for the host)."""
        if not isinstance(payload, Payload):
            raise TypeError(f"{self.name}.recognize accepts only a {self.name} Payload, got {type(payload).__name__}")
        payload.validate(self.name, self.payload_spec)

    # ---- pretrained transfer -------------------------------------------------------------------------
    #: The payload tensor the server backbone reads where the payload holds others too (DuetFace ``dct``, PRO-Face
    #: C ``image``: the rest are injected into its stages); None: the payload's one tensor.
    server_input: ClassVar[str | None] = None

    def adopt_server_stages(self, shapes: tuple[tuple[int, int], ...]) -> None:
        """A pretrained transfer replaced the server by one whose four stage outputs are ``shapes`` ((channels,
        side) each, e.g. face-api.js's 32 @ 35 ... 256 @ 4): rebuild what this method injects there (interfaces,
        keys, payload shapes) to fit, freshly initialised. Methods that inject nothing have nothing to rebuild."""

    # ---- training ------------------------------------------------------------------------------------
    def stages(self) -> tuple[Stage, ...]:
        raise NotImplementedError

    def set_stage(self, name: str) -> Stage:
        """Freeze everything the stage does not train (requires_grad False, eval mode); return the stage."""
        stage = {s.name: s for s in self.stages()}.get(name)
        if stage is None:
            raise ValueError(f"{self.name} has stages {[s.name for s in self.stages()]}, not {name!r}")
        self.stage = name
        for p in self.parameters():
            p.requires_grad_(False)
        for attr in stage.trainable:
            obj = getattr(self, attr)
            params = obj.parameters() if isinstance(obj, nn.Module) else [obj]
            for p in params:
                p.requires_grad_(True)
        self.train(self.training)
        return stage

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.stage is not None:  # frozen modules stay in eval mode (BN statistics, dropout)
            trainable = set(next(s for s in self.stages() if s.name == self.stage).trainable)
            for name, child in self.named_children():
                if name not in trainable:
                    child.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def training_step(self, stage: str, images: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Default single-stage step: margin loss on recognize(protect(images))."""
        return self.margin_step(self.recognize(self.protect(images, labels=labels, generator=generator)), labels, head)

    @staticmethod
    def margin_step(embeddings: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> dict[str, torch.Tensor]:
        """The margin-loss-only step: (B, D) embeddings, (B,) labels -> the trainer's step dict."""
        loss, logits = head(embeddings, labels)
        return {"loss": loss, "cls_loss": loss.detach(), "logits": logits.detach()}


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_options(cls: type[MethodOptions], values: dict[str, Any], where: str = "") -> MethodOptions:
    """Build a frozen options dataclass from a dict; unknown or mistyped keys raise errors naming the key."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ValueError(f"unknown option {where}{key!r} for {cls.__name__}; known: {sorted(known)}")
    return cls(**values)


def method_class(name: str) -> type[Method]:
    """The registered class of a method (its ``Options`` dataclass says what it can be configured with)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, **options: Any) -> Method:
    """``ppfr.build_method("partialface", depth=18)`` -> a ready method module (see available_methods())."""
    cls = method_class(name)
    return cls(make_options(cls.Options, options))


def _load_builtin() -> None:
    import importlib

    for mod in ("arcface", "duetface", "partialface", "minusface", "profacec"):
        importlib.import_module(f"ppfr.methods.{mod}")



# Options that point at files on the machine that trained the model. A saved model.pt already holds the weights
# they loaded, so they are dropped when the model is rebuilt elsewhere.
LOAD_TIME_OPTIONS: frozenset[str] = frozenset({"server_ckpt"})


def load_method(path: Any, map_location: str | torch.device = "cpu", **overrides: Any) -> Method:
    """Rebuild a trained method from a ``runs/<name>/model.pt`` written by ``ppfr train``.

    The file is read with ``torch.load(weights_only=True)`` (never an arbitrary unpickle). ``overrides`` replace
    saved options (e.g. ``backend="cpp"``). Returns the method in eval mode. Raises CheckpointError on a file that
    is not a ppfr model (the message says what is missing), whose method is not installed here, or whose weights do
    not fit.
    """
    from ppfr.models.checkpoints import CheckpointError, safe_load

    ck = safe_load(path)
    missing = [k for k in ("model", "method", "method_options") if k not in ck]
    if missing:
        raise CheckpointError(f"{path} is not a ppfr model file (missing {missing}); pass runs/<name>/model.pt")
    name = str(ck["method"])
    _load_builtin()
    if name not in _REGISTRY:  # e.g. trained with a plugin that is not installed in this environment
        raise CheckpointError(f"{path} holds a {name!r} model, and no installed method is called {name!r} "
                              f"(available: {', '.join(sorted(_REGISTRY))}); install the package that provides "
                              "it (a ppfr.methods plugin)")  # fmt: skip
    opts = {k: v for k, v in dict(ck["method_options"]).items() if k not in LOAD_TIME_OPTIONS}
    opts.update(overrides)
    method = build_method(name, **opts)
    if isinstance(ck.get("transfer"), dict):  # trained with ``transfer:``: rebuild its server (weights follow)
        from ppfr.models.transfer import TransferError, apply_record

        try:
            apply_record(method, ck["transfer"])
        except (TransferError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild its transferred server: {exc}") from None
    result = method.load_state_dict(ck["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit {ck['method']} (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")  # fmt: skip
    return method.to(map_location).eval()
