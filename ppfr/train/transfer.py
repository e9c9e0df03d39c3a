"""The trainer's side of pretrained transfer and teacher distillation (config sections ``transfer:`` and ``distill:``).

* :func:`apply_transfer` -- right after the method is built: its server backbone becomes ``adapter -> pretrained
  recogniser -> projection`` (:mod:`ppfr.models.transfer`), or, with ``adapter: none``, the source's IR weights load
  into the method's own IR net where the shapes match (the methods whose server takes the client's extra inputs:
  DuetFace masks, PRO-Face C compensation). Returns a :class:`TransferPlan`: which parameters are pretrained (their
  own optimiser group, ``lr_mult``), the freeze schedule (the first ``freeze_epochs`` epochs of every stage that
  trains the server leave them frozen), and the record model.pt keeps so ``load_method`` rebuilds the model.
* :class:`Distiller` -- an extra loss ``weight * (1 - cos(u - mean(u), t - mean(t)))``, means over the batch: u = P s,
  s the (B, D) output of the server backbone in the step (captured by a forward hook: the first output in the step
  that carries a gradient, i.e. the protected embedding), P a learned Linear D -> D_t where the sizes differ
  (identity otherwise), t the teacher's embedding of the *clean* images (before ``protect``), computed in eval mode
  under ``no_grad``. Both sides are centred (raw descriptors share a large common direction; see
  ``Distiller.loss``). Teacher embeddings are cached
  per image, keyed by a BLAKE2 hash of the image's float32 bytes (the loader gives no dataset index): a flipped
  image has other bytes, so each (image, flip) is its own entry and a cache hit is always the exact input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.models.transfer import (
    TransferError, TransferredServer, attach, ir_spec, payload_tensor_spec, server_attr,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ sources
def _load_faceapi(weights_dir: str | None, key: str, dir_key: str, device: torch.device | str = "cpu"):
    """The face-api.js recogniser (eval mode, no gradients); TransferError naming ``key`` / ``dir_key`` if absent."""
    from ppfr.models.checkpoints import CheckpointError
    from ppfr.models.faceapi import faceapi_dir, load_faceapi_judge

    try:
        return load_faceapi_judge(faceapi_dir(weights_dir), device=device)
    except CheckpointError as exc:
        raise TransferError(f"{key}=faceapi: {exc} (set {dir_key}=DIR or PPFR_FACEAPI_DIR)") from None


def _load_onnx(path: str, key: str):
    """An ONNX recogniser as a differentiable module (:mod:`ppfr.models.onnx_module`); TransferError naming ``key``."""
    from ppfr.models.onnx_module import OnnxError, load_onnx_recognizer

    try:
        return load_onnx_recognizer(path)
    except OnnxError as exc:
        raise TransferError(f"{key}={path}: {exc}") from None


def is_onnx(source: str | None) -> bool:
    return bool(source) and str(source).lower().endswith(".onnx")


def _load_model(path: str, key: str):
    from ppfr.methods import load_method
    from ppfr.models.checkpoints import CheckpointError

    try:
        return load_method(path)
    except CheckpointError as exc:
        raise TransferError(f"{key}={path}: {exc}") from None


def check_source(value: str | None, key: str) -> None:
    """The checks that need no method: ``faceapi``, an existing file, not ONNX. TransferError naming ``key``."""
    if value is None or value == "faceapi":
        return
    if not Path(value).is_file():
        raise TransferError(f"{key}={value}: no such file; expected faceapi, a ppfr model.pt (runs/<name>/model.pt) "
                            "or an .onnx recogniser")  # fmt: skip


# ------------------------------------------------------------------------------------------------ transfer
@dataclass
class TransferPlan:
    """What the trainer needs after the transfer: the pretrained parameters, their schedule, the model.pt record."""

    attr: str
    pretrained: list[nn.Parameter]
    freeze_epochs: int
    lr_mult: float
    record: dict
    server: TransferredServer | None = None  # None for adapter: none (weights only)
    frozen: bool | None = field(default=None, init=False)

    def pretrained_ids(self) -> set[int]:
        return {id(p) for p in self.pretrained}

    def apply_epoch(self, method: nn.Module, trainable: tuple[str, ...], epoch: int) -> bool | None:
        """Set the freeze state for ``epoch`` (counted in the stage's epochs) of a stage that trains ``trainable``.
        Returns whether the pretrained part is frozen now (None: this stage does not train the server at all)."""
        if self.attr not in trainable:
            self.frozen = None
            return None
        frozen = epoch < self.freeze_epochs
        if self.server is not None:
            self.server.set_pretrained_frozen(frozen)
        else:
            for p in self.pretrained:
                p.requires_grad_(not frozen)
        self.frozen = frozen
        return frozen


def apply_transfer(method: nn.Module, cfg) -> TransferPlan | None:
    """Apply ``cfg`` (a :class:`ppfr.train.config.TransferConfig`) to a freshly built ``method``; None when off.

    Raises TransferError (one line, naming the ``transfer.*`` key) when the source is unusable or cannot be
    transferred into this method."""
    if cfg.source is None:
        return None
    check_source(cfg.source, "transfer.source")
    attr = server_attr(method)
    # auto: an adapter in front of the new recogniser, except for a model.pt into a server that also takes injected
    # client maps (DuetFace, PRO-Face C): its IR weights load into the method's own IR where the shapes match
    injected = len(getattr(method, "payload_spec", None) or {}) > 1
    adapter = cfg.adapter
    if adapter == "auto":
        adapter = "conv" if cfg.source == "faceapi" or is_onnx(cfg.source) or not injected else "none"
    name = getattr(method, "name", type(method).__name__)
    if adapter == "conv":
        payload_tensor_spec(method)  # raises its message where the server's input tensor is not named
    if cfg.source == "faceapi":
        if adapter == "none":
            raise TransferError("transfer.source=faceapi needs transfer.adapter=conv (or auto): face-api.js is not "
                                f"an IR net, so its weights cannot load into {name}'s own server")  # fmt: skip
        judge = _load_faceapi(cfg.source_dir, "transfer.source", "transfer.source_dir")
        size = payload_tensor_spec(method)[1].shape[1]
        rec_spec = {"kind": "faceapi", "in_size": int(size)}
        server = attach(method, judge, rec_spec, source="faceapi", adapter_width=cfg.adapter_width,
                        projection=cfg.projection)  # fmt: skip
        return TransferPlan(attr, server.pretrained_parameters(), cfg.freeze_epochs, cfg.lr_mult,
                            {"adapter": "conv", "server": server.spec}, server)  # fmt: skip
    if is_onnx(cfg.source):
        if adapter == "none":
            raise TransferError(f"transfer.source={cfg.source} needs transfer.adapter=conv (or auto): an ONNX graph's "
                                f"weights cannot load into {name}'s own server")  # fmt: skip
        net = _load_onnx(cfg.source, "transfer.source")
        server = attach(method, net, net.spec, source=str(cfg.source), adapter_width=cfg.adapter_width,
                        projection=cfg.projection)  # fmt: skip
        return TransferPlan(attr, server.pretrained_parameters(), cfg.freeze_epochs, cfg.lr_mult,
                            {"adapter": "conv", "server": server.spec}, server)  # fmt: skip
    src = _load_model(cfg.source, "transfer.source")
    src_server = getattr(src, server_attr(src))
    if isinstance(src_server, TransferredServer):
        raise TransferError(f"transfer.source={cfg.source} was itself trained with a transfer; transferring from it "
                            "again is not supported (use its own source)")  # fmt: skip
    if not isinstance(src_server, nn.Module) or not hasattr(src_server, "output_layer"):
        raise TransferError(f"transfer.source={cfg.source}: its server is not an IR net")
    if adapter == "conv":
        server = attach(method, src_server, ir_spec(src_server), source=str(cfg.source),
                        adapter_width=cfg.adapter_width, projection=cfg.projection)  # fmt: skip
        return TransferPlan(attr, server.pretrained_parameters(), cfg.freeze_epochs, cfg.lr_mult,
                            {"adapter": "conv", "server": server.spec}, server)  # fmt: skip
    # adapter: none -- the source's IR weights into the method's own IR where names and shapes match
    own = getattr(method, attr)
    own_state = own.state_dict()
    take = {k: v for k, v in src_server.state_dict().items() if k in own_state and own_state[k].shape == v.shape}
    if not any(k.endswith("weight") for k in take):
        raise TransferError(f"transfer.source={cfg.source}: none of its server weights fit {name}'s {attr} "
                            "(depth / width differ)")  # fmt: skip
    own.load_state_dict(take, strict=False)
    params = dict(own.named_parameters())
    pretrained = [params[k] for k in take if k in params]
    record = {"adapter": "none", "source": str(cfg.source), "attr": attr, "loaded": len(take), "of": len(own_state)}
    return TransferPlan(attr, pretrained, cfg.freeze_epochs, cfg.lr_mult, record, None)


# ------------------------------------------------------------------------------------------------ distillation
def image_keys(images: torch.Tensor) -> list[bytes]:
    """One 16-byte BLAKE2b digest per image of (B, 3, H, W) float images (of its float32 bytes, on the host)."""
    arr = np.ascontiguousarray(images.detach().float().cpu().numpy())
    return [hashlib.blake2b(a.tobytes(), digest_size=16).digest() for a in arr]


class Distiller:
    """Teacher distillation (see the module docstring). ``teacher``: ``faceapi``, a ppfr model.pt (its end-to-end
    ``embed`` with a fixed generator) or an ``.onnx`` recogniser of 112 x 112 RGB in [-1, 1]; ``cache``: reuse teacher embeddings of byte-identical images."""

    def __init__(self, teacher: str, weight: float = 1.0, cache: bool = True, teacher_dir: str | None = None,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        check_source(teacher, "distill.teacher")
        self.weight = float(weight)
        self.device = torch.device(device)
        if teacher == "faceapi":
            judge = _load_faceapi(teacher_dir, "distill.teacher", "distill.teacher_dir", self.device)
            self.teacher_module: nn.Module = judge
            self._embed: Callable[[torch.Tensor], torch.Tensor] = judge.embed
        elif is_onnx(teacher):  # an ONNX recogniser of RGB faces in [-1, 1], interpreted with PyTorch ops
            net = _load_onnx(teacher, "distill.teacher")
            if (net.spec["in_channels"], net.spec["in_size"]) != (3, 112):
                raise TransferError(f"distill.teacher={teacher}: the teacher reads the clean 112 x 112 RGB faces, but "
                                    f"the graph's input is ({net.spec['in_channels']}, {net.spec['in_size']}, "
                                    f"{net.spec['in_size']})")  # fmt: skip
            net = net.to(self.device).eval().requires_grad_(False)
            self.teacher_module = net
            self._embed = net
        else:
            m = _load_model(teacher, "distill.teacher").to(self.device).eval()
            m.requires_grad_(False)
            self.teacher_module = m
            self._embed = lambda x: m.embed(x, generator=torch.Generator().manual_seed(0))
        self.cache: dict[bytes, torch.Tensor] | None = {} if cache else None
        self.hits = self.misses = 0
        self.dim: int | None = None
        self.projection: nn.Module | None = None
        self._captured: torch.Tensor | None = None
        self._hook = None

    # -- teacher ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) clean images in [-1, 1] -> (B, D_t) float32 teacher embeddings (cached per image)."""
        self.teacher_module.eval()
        with torch.autocast(images.device.type, enabled=False):
            if self.cache is None:
                return self._embed(images.float()).float()
            keys = image_keys(images)
            todo = [i for i, k in enumerate(keys) if k not in self.cache]
            self.hits += len(keys) - len(todo)
            self.misses += len(todo)
            if todo:
                new = self._embed(images[todo].float()).float().cpu()
                for i, e in zip(todo, new):
                    self.cache[keys[i]] = e
            return torch.stack([self.cache[k] for k in keys]).to(images.device)

    def teacher_dim(self, image_size: int = 112) -> int:
        if self.dim is None:  # probed past the cache, which may already hold the training set (teacher_store)
            probe = torch.zeros(2, 3, image_size, image_size, device=self.device)
            self.teacher_module.eval()
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                self.dim = int(self._embed(probe).shape[1])
        return self.dim

    # -- student ---------------------------------------------------------------------------------------------
    def new_projection(self, student_dim: int, image_size: int = 112, start: nn.Module | None = None) -> nn.Module:
        """A fresh projection for a stage (Linear D -> D_t, or the identity where D == D_t), on the device.

        ``start``: the transfer's own projection (a Linear D_t -> D) when the teacher is also the transfer source;
        the new projection then starts as its left inverse, so a transferred model that still reproduces the
        teacher has distillation loss 0 (a random P would pull the adapter away from the pretrained features)."""
        t = self.teacher_dim(image_size)
        if student_dim == t:
            self.projection = nn.Identity()
        else:
            lin = nn.Linear(student_dim, t)
            if isinstance(start, nn.Linear) and start.in_features == t and start.out_features == student_dim:
                with torch.no_grad():
                    inv = torch.linalg.pinv(start.weight.detach().double())  # (t, D): inv @ W = I for W of rank t
                    lin.weight.copy_(inv.float())
                    lin.bias.copy_(-(inv @ start.bias.detach().double()).float())
            self.projection = lin
        self.projection = self.projection.to(self.device)
        return self.projection

    def watch(self, module: nn.Module) -> None:
        """Capture ``module``'s output during each step (the first one that carries a gradient)."""
        if self._hook is not None:
            self._hook.remove()

        def hook(_mod, _inp, out):
            if self._captured is None and isinstance(out, torch.Tensor) and out.requires_grad:
                self._captured = out

        self._hook = module.register_forward_hook(hook)

    def begin_step(self) -> None:
        self._captured = None

    def loss(self, images: torch.Tensor) -> torch.Tensor | None:
        """1 - mean cos(u - mean(u), t - mean(t)) with u = P s, means over the batch, for the step just run; None
        when the server backbone ran with no gradient (a stage that does not reach it, e.g. DuetFace's client).

        Why centred: raw descriptors share a large common direction (face-api.js: cosine ~0.9 between different
        people), so an uncentred cosine already scores ~0.1 for a constant student output and cannot tell
        identities apart (measured: a transferred ArcFace collapsed to one direction at distill ~0.08). Centred on
        each side by its own batch mean, a constant output scores 1, the scale of P s does not matter, and P's
        left-inverse start still gives exactly 0."""
        s, self._captured = self._captured, None
        if s is None or self.projection is None:
            return None
        t = self.teacher_embeddings(images)
        u = self.projection(s.float())
        return 1.0 - F.cosine_similarity(u - u.mean(0, keepdim=True), t - t.mean(0, keepdim=True), dim=1).mean()

    def state_dict(self) -> dict:
        """What a checkpoint keeps for an exact resume: the projection."""
        return {"projection": self.projection.state_dict() if self.projection is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def watched_module(method: nn.Module) -> nn.Module:
    """The server backbone whose output the distillation pulls toward the teacher."""
    return getattr(method, server_attr(method))
