"""DuetFace (ACM MM 2022, METHODS.md §3): a client/server split of the frequency channels with interactive masks.

The client keeps the 30 low-frequency channels and runs a MobileFaceNet on them; the server runs an IR net on the
162 high-frequency channels and, at the end of each of its 4 stages, fuses a one-channel mask made from the client's
feature maps (interface up-sample + 1x1 conv, channel mean, min-max, times the landmark ROI, min-max) as
``sigmoid(h) * (1 + w * mask)``.

Choices (docs/methods.md): the interfaces are registered and trained (``interface="learned"``, faithful to the
intent); ``interface="random_per_forward"`` reproduces the reference code, which re-creates a random 1x1 conv on
every forward. The ROI comes from a PFLD landmark model when ``landmark_ckpt`` is given (``roi="pfld"``); with
``roi="none"`` no ROI is applied (the mask is the normalised client mean alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppfr.methods.base import (
    FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, register_method,
)  # fmt: skip
from ppfr.models.ir import IRNet
from ppfr.models.mobilefacenet import ClientMobileFaceNet
from ppfr.models.pfld import PFLDInference
from ppfr.ops.feature_mask_fuse import feature_mask_fuse
from ppfr.ops.freq import freq_encode
from ppfr.ops.roi_mask import roi_mask

# Client channel set SUB_CHS (raster k = 8u + v), the same for Y, Cb, Cr; the server gets the other 54 ascending.
SUB_CHS = (0, 1, 2, 3, 4, 5, 8, 9, 16, 24)
CLIENT_CHANNELS = tuple(64 * c + k for c in range(3) for k in SUB_CHS)
SERVER_CHANNELS = tuple(64 * c + k for c in range(3) for k in range(64) if k not in SUB_CHS)


@dataclass(frozen=True)
class DuetFaceOptions(MethodOptions):
    depth: int = 50  # the reference maps any BACKBONE_NAME but IR_18 to IR-50
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112
    interface: str = "learned"  # learned | random_per_forward (reference behaviour)
    roi: str = "pfld"  # pfld | none
    landmark_ckpt: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interface not in ("learned", "random_per_forward"):
            raise ValueError(f"interface must be learned or random_per_forward, got {self.interface!r}")
        if self.roi not in ("pfld", "none"):
            raise ValueError(f"roi must be pfld or none, got {self.roi!r}")


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
            fresh = nn.Conv2d(self.cin, self.cout, 1).to(a.device, a.dtype)
            return fresh(a)
        return self.conv(a)


@register_method
class DuetFace(Method):
    name = "duetface"
    Options = DuetFaceOptions

    def __init__(self, options: DuetFaceOptions) -> None:
        super().__init__(options)
        s = options.image_size
        self.client = ClientMobileFaceNet(len(CLIENT_CHANNELS), options.embedding_size)
        self.server = IRNet(options.depth, len(SERVER_CHANNELS), options.embedding_size, s, base_width=options.width)
        sizes = [s // 2, s // 4, s // 8, s // 16]  # server stage outputs: 56, 28, 14, 7
        rnd = options.interface == "random_per_forward"
        self.interfaces = nn.ModuleList(
            Interface(c_client, c_server, size, rnd)
            for (c_client, _), c_server, size in zip(ClientMobileFaceNet.TAP_SHAPES, self.server.widths, sizes)
        )
        self.mask_weights = nn.Parameter(torch.zeros(4))  # w per interactive block, initialised to 0
        self.landmarks = PFLDInference() if options.roi == "pfld" else None
        if self.landmarks is not None and options.landmark_ckpt:
            from ppfr.models.checkpoints import load_pfld

            load_pfld(self.landmarks, options.landmark_ckpt)
        if self.landmarks is not None:
            self.landmarks.requires_grad_(False).eval()
        self.register_buffer("client_channels", torch.tensor(CLIENT_CHANNELS), persistent=False)
        self.register_buffer("all_channels", torch.tensor(CLIENT_CHANNELS + SERVER_CHANNELS), persistent=False)
        tap_spec = {f"feat{i}": TensorSpec((c, sz, sz)) for i, (c, sz) in enumerate(ClientMobileFaceNet.TAP_SHAPES)}
        self.payload_spec = {"dct": TensorSpec((len(SERVER_CHANNELS), s, s)), **tap_spec,
                             "roi": TensorSpec((1, s, s), torch.float32, 0.0, 1.0)}  # fmt: skip

    def split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One encode pass of all 192 channels in (client, server) order -> (B, 30, ...) and (B, 162, ...)."""
        f = freq_encode(images.float(), self.all_channels)
        return f[:, : len(CLIENT_CHANNELS)], f[:, len(CLIENT_CHANNELS) :]

    def roi(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
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

    def payload_operator(self) -> FreqPayloadOperator:
        """The server's 162 high-frequency channels (fixed, no secret). The client maps and the ROI are not linear
        in the image and are left to the learned kinds."""
        return FreqPayloadOperator("dct", torch.tensor(SERVER_CHANNELS)[None], ("server",))

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        t = payload.tensors

        def inject(stage: int, h: torch.Tensor) -> torch.Tensor:
            z = self.interfaces[stage](t[f"feat{stage}"])
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
