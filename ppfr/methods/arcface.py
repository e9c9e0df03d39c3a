"""Unprotected baselines: ArcFace on RGB, and ArcFace-FD on all 192 frequency channels (METHODS.md §3.6, §4.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppfr.methods.base import (
    FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, register_method,
)  # fmt: skip
from ppfr.models.ir import IRNet
from ppfr.ops.freq import freq_encode


@dataclass(frozen=True)
class ArcFaceOptions(MethodOptions):
    depth: int = 50
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112


@register_method
class ArcFace(Method):
    """The image itself leaves the client (no protection); an IR net recognises it."""

    name = "arcface"
    Options = ArcFaceOptions

    def __init__(self, options: ArcFaceOptions) -> None:
        super().__init__(options)
        s = options.image_size
        self.server = IRNet(options.depth, 3, options.embedding_size, s, base_width=options.width)
        self.payload_spec = {"image": TensorSpec((3, s, s), torch.float32, -1.0, 1.0)}

    def protect(self, images, labels=None, generator=None) -> Payload:
        self.check_images(images)
        return Payload(self.name, {"image": images.float()})

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        return self.server(payload.tensors["image"])

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("train", ("server",), "IR net + margin head on RGB"),)


@register_method
class ArcFaceFD(Method):
    """All 192 block-DCT channels leave the client (the frequency-domain baseline, no protection)."""

    name = "arcface_fd"
    Options = ArcFaceOptions

    def __init__(self, options: ArcFaceOptions) -> None:
        super().__init__(options)
        s = options.image_size
        self.server = IRNet(options.depth, 192, options.embedding_size, s, base_width=options.width)
        self.payload_spec = {"dct": TensorSpec((192, s, s), torch.float32)}

    def protect(self, images, labels=None, generator=None) -> Payload:
        self.check_images(images)
        return Payload(self.name, {"dct": freq_encode(images.float())})

    def payload_operator(self) -> FreqPayloadOperator:
        """All 192 channels in order, no secret."""
        return FreqPayloadOperator("dct", torch.arange(192)[None], ("all",))

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        return self.server(payload.tensors["dct"])

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("train", ("server",), "IR net on all 192 DCT channels"),)
