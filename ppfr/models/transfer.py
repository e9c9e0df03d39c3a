"""Pretrained transfer: a method's server backbone rebuilt as ``adapter -> pretrained recogniser -> projection``.

A practitioner with a pretrained RGB face recogniser (face-api.js FaceRecognitionNet, :mod:`ppfr.models.faceapi`,
or the server of a ppfr ``model.pt``) and a few thousand faces builds a protected model by putting a small trained
adapter in front of the recogniser: the adapter maps the method's payload tensor (C channels, S x S, the range its
``payload_spec`` declares) to what the recogniser reads, and a projection maps the recogniser's descriptor to the
method's ``embedding_size`` where the two differ.

* :class:`PayloadAdapter` -- (B, C, S, S) payload -> (B, C_r, S_r, S_r) recogniser input. A fixed affine map of the
  declared range onto [-1, 1] (a BatchNorm where the payload is unbounded, e.g. DCT channels), a base path (the
  identity when C == C_r, else a 1x1 conv) plus a residual conv net C -> w -> w -> C_r whose last conv starts at
  zero. For an RGB payload in [-1, 1] (ArcFace) the adapter is therefore exactly the identity at initialisation,
  and the transferred model starts as the pretrained recogniser itself.
* :class:`TransferredServer` -- the module that replaces ``method.server`` (or MinusFace's ``recognizer_p``): same
  call signature as :class:`ppfr.models.ir.IRNet`, (B, C, S, S) -> (B, D) embeddings, ``inject`` hooks included:
  the methods that inject client maps into the server's stages (DuetFace, PRO-Face C) name the payload tensor the
  adapter reads (``server_input``) and rebuild their injection parts for the recogniser's stage shapes
  (``adopt_server_stages``; face-api.js: 32 @ 35, 64 @ 17, 128 @ 8, 256 @ 4).
  ``pretrained_frozen`` freezes the recogniser (no gradient, eval mode) while the adapter and projection train.
* :func:`transfer_spec` / :func:`build_from_spec` -- the architecture as a plain dict, recorded in model.pt
  (``"transfer"``) so :func:`ppfr.methods.load_method` rebuilds it without the source weights: the state dict
  holds them.

Sources (``transfer.source``): ``faceapi`` (the face-api.js weights folder; its 128-d descriptor, via the same fixed
similarity warp from the 112 x 112 ArcFace crop to the 150 x 150 dlib chip as the judge), a ppfr ``model.pt``
whose server is an IR net (its whole server becomes the recogniser), or an ``.onnx`` recogniser (N, C, S, S) ->
(N, D), interpreted with PyTorch ops by :mod:`ppfr.models.onnx_module` so it fine-tunes like the others (it has
no marked stages, so DuetFace and PRO-Face C cannot inject into it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ppfr.models.faceapi import STAGE_SHAPES, FaceApiJudge
from ppfr.models.ir import IRNet

#: Where a method keeps the backbone that reads its payload, in the order looked for: most methods call it
#: ``server``; MinusFace's payload recogniser is ``recognizer_p`` (``recognizer`` in its toy task).
SERVER_ATTRS: tuple[str, ...] = ("server", "recognizer_p", "recognizer")
FACEAPI_DIM = 128


class TransferError(ValueError):
    """A transfer that cannot be built (the message names the key and what to do)."""


def server_attr(method: nn.Module) -> str:
    """The attribute name of the backbone that recognises ``method``'s payload (see :data:`SERVER_ATTRS`)."""
    for attr in SERVER_ATTRS:
        if isinstance(getattr(method, attr, None), nn.Module):
            return attr
    raise TransferError(f"{type(method).__name__} has no server backbone ({' / '.join(SERVER_ATTRS)}) to transfer into")


# ------------------------------------------------------------------------------------------------ modules
class PayloadAdapter(nn.Module):
    """(B, C, S, S) payload -> (B, out_channels, out_size, out_size) recogniser input (nominally [-1, 1]).

    Args:
        in_channels, in_size: the payload tensor's C and S.
        low, high: its declared range (``TensorSpec.low/high``); both given: mapped affinely onto [-1, 1] (a fixed
            map, no parameters); otherwise a BatchNorm2d standardises each channel (DCT payloads are unbounded and
            their channels differ in scale by orders of magnitude).
        out_channels, out_size: what the recogniser reads (3 x 112 for face-api, whose own warp makes the chip).
        width: hidden channels of the residual branch.
    Init: base path = identity when C == out_channels (else a 1x1 conv), residual branch's last conv = 0, so an RGB
    payload in [-1, 1] passes through unchanged.
    """

    def __init__(self, in_channels: int, in_size: int, out_channels: int = 3, out_size: int = 112,
                 low: float | None = None, high: float | None = None, width: int = 32) -> None:  # fmt: skip
        super().__init__()
        if width < 1:
            raise TransferError(f"transfer.adapter_width must be positive, got {width}")
        self.in_channels, self.in_size, self.out_channels, self.out_size = in_channels, in_size, out_channels, out_size
        self.bounded = low is not None and high is not None and high > low
        lo, hi = (float(low), float(high)) if self.bounded else (-1.0, 1.0)
        # y = x * a + b maps [lo, hi] onto [-1, 1]; buffers so the map is part of the saved model
        self.register_buffer("in_scale", torch.tensor(2.0 / (hi - lo)))
        self.register_buffer("in_shift", torch.tensor(-(hi + lo) / (hi - lo)))
        self.norm = nn.Identity() if self.bounded else nn.BatchNorm2d(in_channels)
        self.base = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 3, 1, 1),
        )  # fmt: skip
        nn.init.zeros_(self.residual[-1].weight)  # the residual starts at 0: identity (or the base map) at init
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PayloadAdapter expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = self.norm(x * self.in_scale + self.in_shift)
        y = self.base(x) + self.residual(x)
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y


class TransferredServer(nn.Module):
    """``adapter -> recogniser -> projection``: (B, C, S, S) payload -> (B, D) embeddings (not normalised).

    ``recognizer`` is a :class:`FaceApiJudge` (fed through its fixed chip warp, so it reads (B, 3, S, S) in [-1, 1])
    or an :class:`IRNet`. ``projection`` is a Linear (semi-orthogonal init, so cosines of the recogniser's
    descriptors are kept exactly at the start) or the identity. ``spec`` is the dict :func:`build_from_spec` takes.
    """

    def __init__(self, adapter: PayloadAdapter, recognizer: nn.Module, projection: nn.Module, spec: dict) -> None:
        super().__init__()
        self.adapter, self.recognizer, self.projection = adapter, recognizer, projection
        self.spec = dict(spec)
        self.pretrained_frozen = False

    def forward(self, x: torch.Tensor, inject: Any = None) -> torch.Tensor:
        """``inject(stage, h) -> h`` runs at the recogniser's four stage ends (:meth:`stage_shapes`), as in
        :meth:`IRNet.forward`: the DuetFace / PRO-Face C hooks, rebuilt for these shapes by the method's
        ``adopt_server_stages`` when the transfer is attached."""
        z = self.adapter(x)
        if isinstance(self.recognizer, FaceApiJudge):
            e = self.recognizer.embed(z, inject)
        else:
            e = self.recognizer(z, inject=inject)
        return self.projection(e)

    def stage_shapes(self) -> tuple[tuple[int, int], ...]:
        """(channels, side) of the recogniser's four stage outputs that ``inject`` sees (TransferError for an ONNX
        graph, which has no marked stages)."""
        if isinstance(self.recognizer, FaceApiJudge):
            return STAGE_SHAPES
        if not isinstance(self.recognizer, IRNet):
            raise TransferError("an ONNX recogniser has no stage outputs to inject the client's maps into: transfer "
                                "DuetFace / PRO-Face C from faceapi or a ppfr model.pt")  # fmt: skip
        return self.recognizer.stage_shapes()

    def pretrained_parameters(self) -> list[nn.Parameter]:
        return list(self.recognizer.parameters())

    def set_pretrained_frozen(self, frozen: bool) -> None:
        """Freeze (no gradient, eval mode: BN statistics kept) or release the pretrained recogniser."""
        self.pretrained_frozen = bool(frozen)
        self.recognizer.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferredServer:
        super().train(mode)
        if self.pretrained_frozen:
            self.recognizer.eval()
        return self


def make_projection(in_dim: int, out_dim: int) -> nn.Module:
    """Identity where the sizes agree, else a Linear whose weight is semi-orthogonal (cosines preserved when
    out_dim >= in_dim, a random orthogonal projection otherwise) and whose bias is 0."""
    if in_dim == out_dim:
        return nn.Identity()
    lin = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


# ------------------------------------------------------------------------------------------------ specs
def ir_spec(net: IRNet) -> dict:
    """The constructor arguments of an IRNet (enough to rebuild it with placeholder weights)."""
    lin = net.output_layer[3]
    side = int(round((lin.in_features // net.widths[-1]) ** 0.5))
    return {"kind": "ir", "depth": net.depth, "in_channels": net.in_channels, "embedding_size": lin.out_features,
            "input_size": side * 16, "width": net.widths[0]}  # fmt: skip


def build_recognizer(spec: dict) -> tuple[nn.Module, int, int, int]:
    """spec -> (recogniser with placeholder weights, its input channels, input size, descriptor size)."""
    kind = spec.get("kind")
    if kind == "faceapi":
        return FaceApiJudge(in_size=int(spec["in_size"])), 3, int(spec["in_size"]), FACEAPI_DIM
    if kind == "onnx":
        from ppfr.models.onnx_module import OnnxError, build_onnx_recognizer

        try:
            net = build_onnx_recognizer(spec)
        except OnnxError as exc:
            raise TransferError(f"the recorded ONNX recogniser cannot be rebuilt: {exc}") from None
        return net, int(spec["in_channels"]), int(spec["in_size"]), int(spec["dim"])
    if kind == "ir":
        net = IRNet(int(spec["depth"]), int(spec["in_channels"]), int(spec["embedding_size"]), int(spec["input_size"]),
                    base_width=int(spec["width"]))  # fmt: skip
        return net, net.in_channels, int(spec["input_size"]), int(spec["embedding_size"])
    raise TransferError(f"unknown recogniser kind {kind!r} in a transfer record")


def build_from_spec(spec: dict) -> TransferredServer:
    """A TransferredServer with placeholder weights from its record (``TransferredServer.spec``)."""
    rec, c_r, s_r, dim = build_recognizer(spec["recognizer"])
    p = spec["payload"]
    adapter = PayloadAdapter(int(p["channels"]), int(p["size"]), c_r, s_r, p.get("low"), p.get("high"),
                             int(spec.get("adapter_width", 32)))  # fmt: skip
    proj = make_projection(dim, int(spec["embedding_size"]))
    return TransferredServer(adapter, rec, proj, spec)


def payload_tensor_spec(method: nn.Module) -> tuple[str, Any]:
    """The payload tensor the adapter reads: the payload's one tensor, or the method's ``server_input`` where its
    server also takes injected ones (DuetFace, PRO-Face C); TransferError where neither names one."""
    spec = getattr(method, "payload_spec", None) or {}
    name = getattr(method, "server_input", None)
    if len(spec) != 1 and name not in spec:
        raise TransferError(f"{getattr(method, 'name', type(method).__name__)}'s server reads {len(spec)} payload "
                            f"tensors ({', '.join(sorted(spec))}) and names none of them as its input "
                            "(server_input), so an adapter cannot put another recogniser in its place. Use "
                            "transfer.source=<a ppfr model.pt> with transfer.adapter=none (its IR weights load "
                            "where the shapes match)")  # fmt: skip
    if name not in spec:
        name = next(iter(spec))
    ts = spec[name]
    if len(ts.shape) != 3 or ts.shape[1] != ts.shape[2]:
        raise TransferError(f"payload tensor {name!r} has shape {ts.shape}; the adapter needs (C, S, S)")
    return name, ts


def attach(method: nn.Module, recognizer: nn.Module, recognizer_spec: dict, *, source: str, adapter_width: int = 32,
           projection: bool = True) -> TransferredServer:  # fmt: skip
    """Replace ``method``'s server backbone by ``adapter -> recognizer -> projection``; returns the new module.

    ``recognizer`` already holds its pretrained weights; ``recognizer_spec`` describes its architecture. The new
    module is on the device of the old one. With ``projection=False`` the recogniser's descriptor size must equal
    the method's ``embedding_size`` (TransferError otherwise).
    """
    attr = server_attr(method)
    _, ts = payload_tensor_spec(method)
    dim = build_recognizer(recognizer_spec)[3]
    d = int(method.options.embedding_size)
    if dim != d and not projection:
        raise TransferError(f"transfer.projection=false but the recogniser gives {dim}-d descriptors and the method "
                            f"{d}-d embeddings: set method_options.embedding_size={dim} or transfer.projection=true")
    payload = {"channels": int(ts.shape[0]), "size": int(ts.shape[1]), "low": ts.low, "high": ts.high}
    spec = {"attr": attr, "source": source, "adapter_width": int(adapter_width), "embedding_size": d,
            "recognizer": dict(recognizer_spec), "payload": payload}  # fmt: skip
    server = build_from_spec(spec)
    server.recognizer.load_state_dict(recognizer.state_dict())
    old = getattr(method, attr)
    device = next(iter(old.parameters())).device
    setattr(method, attr, server.to(device))
    _adopt(method, server, device)
    return server


def _adopt(method: nn.Module, server: TransferredServer, device: torch.device | None = None) -> None:
    """Let a method that injects into its server's stages (it names a ``server_input``) rebuild those parts for the
    new server's stage shapes."""
    if getattr(method, "server_input", None) is None:
        return
    method.adopt_server_stages(server.stage_shapes())
    if device is not None:
        method.to(device)


def apply_record(method: nn.Module, record: dict) -> None:
    """Rebuild the architecture a model.pt's ``"transfer"`` record describes (placeholder weights: the state dict
    that follows fills them). A record with ``adapter: none`` changed only weights, so nothing is rebuilt."""
    if record.get("adapter") == "none":
        return
    server = record.get("server")
    if not isinstance(server, dict):
        raise TransferError("the model's transfer record has no server description")
    new = build_from_spec(server)
    setattr(method, str(server["attr"]), new)
    _adopt(method, new)
