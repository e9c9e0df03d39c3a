"""DuetFace (ACM MM 2022, METHODS.md §3): a client/server split of the frequency channels with interactive masks.

The client keeps the 30 low-frequency channels and runs a MobileFaceNet on them; the server runs an IR net on the
162 high-frequency channels and, at the end of each of its 4 stages, fuses a one-channel mask made from the client's
feature maps (interface up-sample + 1x1 conv, channel mean, min-max, times the landmark ROI, min-max) as
``sigmoid(h) * (1 + w * mask)``.

Choices (docs/methods.md): the interfaces are registered and trained (``interface="learned"``, faithful to the
intent); ``interface="random_per_forward"`` reproduces the reference code, which re-creates a random 1x1 conv on
every forward. The ROI (``roi``):

* ``"template"`` (default): one fixed mask for every image, the convex hull of a canonical 98-point face layout placed
  on the 112x112 ArcFace-aligned template (:func:`template_landmarks`). The inputs are aligned crops, so the face sits
  in the same place in every image; this needs no landmark detector.
* ``"pfld"`` (the reference, METHODS.md §3.4; the paper configs): the convex hull of the 98 landmarks a pretrained
  PFLD detector finds in each image. It needs ``landmark_ckpt`` (no official weights exist, TFace #88): an untrained
  detector would give every image the same tiny corner ROI and a near-zero interactive mask, so it is refused.
* ``"none"``: no ROI (the mask is the normalised client mean alone).

``fusion``: ``"sigmoid"`` (default, the reference) or ``"scale"``, ``h * (1 + w * mask)`` with the same mask. With a
pretrained server (``transfer.source: faceapi``, configs/duetface_transfer.yaml) the reference's form would replace
every pretrained stage output by its sigmoid at the first step; ``scale`` with w = 0 starts as the recogniser itself.
The transferred server's stage shapes differ from the IR net's, so :meth:`DuetFace.adopt_server_stages` rebuilds
the interfaces for them (face-api.js: 32 @ 35, 64 @ 17, 128 @ 8, 256 @ 4).

Host syncs: with ``roi="template"`` or ``"none"``, ``protect`` and ``recognize`` never wait for the device (the
template mask is made on the host once per size and device). ``roi="pfld"`` runs the exact hull of
:func:`ppfr.ops.roi_mask.roi_mask` per batch on the device, whose torch / triton forms still read a few flags back
(about 20 per call in the torch form: the exact-arithmetic fallback runs only on the undecided points, which it
must count first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.methods.base import (
    ExportGraph, FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, register_method,
)  # fmt: skip
from ppfr.models.ir import IRNet
from ppfr.models.mobilefacenet import ClientMobileFaceNet
from ppfr.models.pfld import PFLDInference
from ppfr.ops.feature_mask_fuse import duet_mask_ref, feature_mask_fuse
from ppfr.ops.freq import freq_encode
from ppfr.ops.roi_mask import roi_mask, wflw_mean_face

# Client channel set SUB_CHS (raster k = 8u + v), the same for Y, Cb, Cr; the server gets the other 54 ascending.
SUB_CHS = (0, 1, 2, 3, 4, 5, 8, 9, 16, 24)
CLIENT_CHANNELS = tuple(64 * c + k for c in range(3) for k in SUB_CHS)
SERVER_CHANNELS = tuple(64 * c + k for c in range(3) for k in range(64) if k not in SUB_CHS)
ROI_KINDS = ("template", "pfld", "none")
FUSIONS = ("sigmoid", "scale")

# The WFLW points that correspond to the five ArcFace landmarks: eye centres (mean of each eye's 8 contour points),
# nose tip, mouth corners.
_WFLW_EYES = (range(60, 68), range(68, 76))
_WFLW_NOSE_TIP, _WFLW_MOUTH = 54, (76, 82)


def template_landmarks(size: int = 112) -> np.ndarray:
    """(98, 2) float64 canonical face landmarks (pixels, x = column, y = row) of a ``size`` x ``size`` ArcFace-aligned
    crop: the ROI of ``roi="template"``.

    Derivation: the WFLW-layout mean face of :func:`ppfr.ops.roi_mask.wflw_mean_face` (jaw contour, brows, nose,
    eyes, mouth) is mapped onto the crop by the least-squares similarity (Umeyama) that takes its five
    ArcFace-corresponding points (the two eye centres, the nose tip, the two mouth corners) onto the standard 5-point
    ArcFace template for 112x112 (METHODS.md §1.2), scaled by size / 112. Fit residual: at most 1.6 px at 112. The
    hull spans x 10..102, y 34..107 (brows to chin, temple to temple) and covers 43 % of the crop; overlaid on the
    mean of 300 celeba112 crops it follows the face outline.
    """
    from ppfr.models.faceapi import ARCFACE_TEMPLATE_112, similarity_transform

    layout = wflw_mean_face().numpy()
    eyes = [layout[list(r)].mean(0) for r in _WFLW_EYES]
    src = np.stack([*eyes, layout[_WFLW_NOSE_TIP], *(layout[i] for i in _WFLW_MOUTH)])
    a = similarity_transform(src, ARCFACE_TEMPLATE_112 * (size / 112.0))
    return layout @ a[:, :2].T + a[:, 2]


@lru_cache(maxsize=16)
def _template_roi_cached(height: int, width: int, device: torch.device) -> torch.Tensor:
    pts = template_landmarks(112) * np.array([width / 112.0, height / 112.0])
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference_mode
        # made on the host (roi_mask's exact hull reads its data) and copied to the device once
        return roi_mask(torch.from_numpy(pts)[None], (height, width)).to(device)  # (1, 1, H, W) float32


def template_roi(height: int = 112, width: int = 112, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, H, W) float32 mask of ``roi="template"``: ``ppfr.ops.roi_mask`` of :func:`template_landmarks`, computed
    once per (size, device) and cached (the returned tensor is shared: do not modify it in place)."""
    return _template_roi_cached(int(height), int(width), torch.device(device))


@dataclass(frozen=True)
class DuetFaceOptions(MethodOptions):
    depth: int = 50  # the reference maps any BACKBONE_NAME but IR_18 to IR-50
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112
    interface: str = "learned"  # learned | random_per_forward (reference behaviour)
    roi: str = "template"  # template | pfld (needs landmark_ckpt; the paper setting) | none
    landmark_ckpt: str | None = None  # PFLD checkpoint (key pfld_backbone) for roi="pfld"
    # sigmoid: the reference's sigmoid(h) * (1 + w * mask); scale: h * (1 + w * mask), which with w = 0 leaves h as
    # it is -- for a pretrained (transferred) server, whose features sigmoid(h) would overwrite at the start
    fusion: str = "sigmoid"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interface not in ("learned", "random_per_forward"):
            raise ValueError(f"interface must be learned or random_per_forward, got {self.interface!r}")
        if self.roi not in ROI_KINDS:
            raise ValueError(f"roi must be one of {', '.join(ROI_KINDS)}, got {self.roi!r}")
        if self.roi == "pfld" and not self.landmark_ckpt:
            raise ValueError("roi='pfld' needs landmark_ckpt (a PFLD checkpoint, key pfld_backbone; no official "
                             "weights exist): an untrained detector gives every image the same tiny corner ROI. Set "
                             "method_options.landmark_ckpt=PATH, or roi=template (a fixed face hull on the aligned "
                             "112x112 template) or roi=none")  # fmt: skip
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.landmark_ckpt and self.roi != "pfld":
            raise ValueError(f"landmark_ckpt is only used with roi='pfld', got roi={self.roi!r}")


class Interface(nn.Module):
    """Bilinear up-sample of a client map to the server stage size, then Conv1x1 (C_client -> C_server)."""

    def __init__(self, cin: int, cout: int, size: int, random_per_forward: bool = False) -> None:
        super().__init__()
        self.size, self.cin, self.cout = size, cin, cout
        self.random_per_forward = random_per_forward
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = F.interpolate(a, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.random_per_forward:  # the reference builds a fresh, untrained conv inside every forward
            # initialised on a's device: a CPU init + copy would make every forward wait for the stream
            fresh = nn.Conv2d(self.cin, self.cout, 1, device=a.device, dtype=a.dtype)
            return fresh(a)
        return self.conv(a)


@register_method
class DuetFace(Method):
    name = "duetface"
    Options = DuetFaceOptions
    server_input = "dct"

    def __init__(self, options: DuetFaceOptions) -> None:
        super().__init__(options)
        s = options.image_size
        self.client = ClientMobileFaceNet(len(CLIENT_CHANNELS), options.embedding_size)
        self.server = IRNet(options.depth, len(SERVER_CHANNELS), options.embedding_size, s, base_width=options.width)
        self.interfaces = self._interfaces(self.server.stage_shapes())  # server stage outputs: 56, 28, 14, 7
        self.mask_weights = nn.Parameter(torch.zeros(4))  # w per interactive block, initialised to 0
        self.landmarks = PFLDInference() if options.roi == "pfld" else None
        if self.landmarks is not None:  # the options guarantee a checkpoint
            from ppfr.models.checkpoints import load_pfld

            load_pfld(self.landmarks, options.landmark_ckpt)
            self.landmarks.requires_grad_(False).eval()
        self.register_buffer("client_channels", torch.tensor(CLIENT_CHANNELS), persistent=False)
        self.register_buffer("all_channels", torch.tensor(CLIENT_CHANNELS + SERVER_CHANNELS), persistent=False)
        tap_spec = {f"feat{i}": TensorSpec((c, sz, sz)) for i, (c, sz) in enumerate(ClientMobileFaceNet.TAP_SHAPES)}
        self.payload_spec = {"dct": TensorSpec((len(SERVER_CHANNELS), s, s)), **tap_spec,
                             "roi": TensorSpec((1, s, s), torch.float32, 0.0, 1.0)}  # fmt: skip

    def _interfaces(self, shapes) -> nn.ModuleList:
        rnd = self.options.interface == "random_per_forward"
        return nn.ModuleList(Interface(c_client, c_server, size, rnd)
                             for (c_client, _), (c_server, size) in zip(ClientMobileFaceNet.TAP_SHAPES, shapes))

    def adopt_server_stages(self, shapes) -> None:
        """A transferred server (e.g. face-api.js: 32 @ 35 ... 256 @ 4): new interfaces up-sample the client maps
        to its stage sizes and map them to its widths (the mask weights stay, 0 at the start)."""
        self.interfaces = self._interfaces(shapes)

    def split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One encode pass of all 192 channels in (client, server) order -> (B, 30, ...) and (B, 162, ...)."""
        f = freq_encode(images.float(), self.all_channels)
        return f[:, : len(CLIENT_CHANNELS)], f[:, len(CLIENT_CHANNELS) :]

    def roi(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) float32 binary ROI of ``images`` (see the module docstring for ``roi``)."""
        b, _, h, w = images.shape
        if self.options.roi == "template":  # the same for every aligned crop: one cached mask, copied per sample
            return template_roi(h, w, images.device).expand(b, 1, h, w).clone()
        if self.landmarks is None:
            return images.new_ones(b, 1, h, w, dtype=torch.float32)
        with torch.no_grad():
            return roi_mask(self.landmarks.landmarks(images.float()), (h, w))

    def protect(self, images, labels=None, generator=None) -> Payload:
        """-> dct (B,162,112,112), feat0..3 (client maps 64@28, 128@14, 128@7, 512@7, detached), roi (B,1,112,112)."""
        self.check_images(images)
        x_client, x_server = self.split(images)
        _, taps = self.client(x_client)
        tensors = {"dct": x_server, **{f"feat{i}": t.detach() for i, t in enumerate(taps)}, "roi": self.roi(images)}
        return Payload(self.name, tensors)

    def export_graphs(self) -> dict[str, ExportGraph]:
        """The server graph, and the client network: 30 DCT channels (B, 30, H, W) -> feat0..feat3."""
        graphs = super().export_graphs()
        if self.options.interface == "random_per_forward":
            graphs["server"] = dataclasses.replace(graphs["server"], refusal=(
                "duetface interface='random_per_forward' draws a fresh random conv on every forward (the reference's "
                "behaviour): there is no fixed graph to export; use interface='learned'"))  # fmt: skip
        s = self.options.image_size
        feats = {k: tuple(v.shape) for k, v in self.payload_spec.items() if k.startswith("feat")}
        graphs["client"] = ExportGraph(
            {"dct_client": TensorSpec((len(CLIENT_CHANNELS), s, s))}, feats, lambda x: tuple(self.client(x)[1]),
            lambda images, generator: {"dct_client": self.split(images)[0]})  # fmt: skip
        return graphs

    def payload_operator(self) -> FreqPayloadOperator:
        """The server's 162 high-frequency channels (fixed, no secret). The client maps and the ROI are not linear
        in the image and are left to the learned kinds."""
        return FreqPayloadOperator("dct", torch.tensor(SERVER_CHANNELS)[None], ("server",))

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        t = payload.tensors

        def inject(stage: int, h: torch.Tensor) -> torch.Tensor:
            z = self.interfaces[stage](t[f"feat{stage}"])
            if self.options.fusion == "scale":  # the same mask, as a gain on h (no fused kernel: one multiply-add)
                return h * (1 + self.mask_weights[stage] * duet_mask_ref(z, t["roi"]))
            return feature_mask_fuse(h, z, self.mask_weights[stage], t["roi"])

        return self.server(t["dct"], inject=inject)

    def stages(self) -> tuple[Stage, ...]:
        return (
            Stage("client", ("client",), "client pre-training: MobileFaceNet on the 30 low channels + head"),
            Stage("server", ("server", "interfaces", "mask_weights"), "client and landmarks frozen"),
        )

    def training_step(self, stage, images, labels, head, generator=None):
        if stage == "client":
            x_client, _ = self.split(images)
            emb, _ = self.client(x_client)
            return self.margin_step(emb, labels, head)
        return super().training_step(stage, images, labels, head, generator)
