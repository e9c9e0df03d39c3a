"""MinusFace (CVPR 2024, METHODS.md §5): generator-based feature subtraction, random channel shuffle, decoded image.

x = e(X); r = x - g(x); the client sends X_p = d(shuffle_theta(r)) (B, 3, 112, 112) in [0, 1] with a fresh random
192-permutation theta per image. Stage 1 trains g and a recogniser f on r with L = alpha L1(X, X') + beta ArcFace(f(r))
where X' = 2 d(g(x)) - 1; stage 2 freezes g and trains a fresh recogniser f_p on X_p with ArcFace only.

Choices (docs/methods.md): ``gen_width=64`` is the released code's full U-Net; smaller widths are the paper's
"reduced scale" option. The optimiser split (generator lr multiplier, weight decay) is a training-config matter;
the code's ``'Minusface'`` typo that disables it is not reproduced.

``task="toy"`` is the reference's ``TASK: toy`` (``MinusGenerativeModel(mode='toy')``, METHODS §5.3): the
subtraction in pixel space, a U-Net 3 -> 3 g and an IR recogniser on the pixel residue X - g(X), trained in one
stage with alpha L1(X, g(X)) + beta ArcFace(f(X - g(X))), no transform and no shuffle. It shows the problem
MinusFace solves: in pixel space the residue that keeps identity is not blank. Its payload is that residue (not
private; a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ppfr.methods.base import Method, MethodOptions, Payload, Stage, TensorSpec, register_method
from ppfr.models.ir import IRNet
from ppfr.models.unet import UNet
from ppfr.ops._validate import draw_device, to_device
from ppfr.ops.freq import freq_decode, freq_encode


@dataclass(frozen=True)
class MinusFaceOptions(MethodOptions):
    depth: int = 50
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112
    gen_width: int = 64
    alpha: float = 5.0
    beta: float = 1.0
    # CPU-scale addition, not in the paper: a ``fp_warmup`` stage first trains f_p on clear faces (in X_p's [0, 1]
    # range) so stage 2 starts from face features and only has to learn the shuffle invariance.
    fp_warmup: bool = False
    task: str = "minus"  # minus (stage1 + stage2, the method) | toy (the reference's pixel-space demonstration)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in ("minus", "toy"):
            raise ValueError(f"task must be minus or toy, got {self.task!r}")
        if self.task == "toy" and self.fp_warmup:
            raise ValueError("fp_warmup applies to task=minus (the toy task has no f_p)")


@register_method
class MinusFace(Method):
    name = "minusface"
    Options = MinusFaceOptions

    def __init__(self, options: MinusFaceOptions) -> None:
        super().__init__(options)
        s = options.image_size
        if options.task == "toy":  # pixel space: g 3 -> 3, f on X - g(X); the payload is that residue
            self.generator = UNet(3, 3, options.gen_width)
            self.recognizer = IRNet(options.depth, 3, options.embedding_size, s, base_width=options.width)
            self.payload_spec = {"image": TensorSpec((3, s, s), torch.float32)}
            return
        self.generator = UNet(192, 192, options.gen_width)
        self.recognizer = IRNet(options.depth, 192, options.embedding_size, s, base_width=options.width)  # stage 1: f on r
        self.recognizer_p = IRNet(options.depth, 3, options.embedding_size, s, base_width=options.width)  # stage 2: f_p on X_p
        self.payload_spec = {"image": TensorSpec((3, s, s), torch.float32, 0.0, 1.0)}

    def residue(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r = e(X) - g(e(X)), g(e(X))), both (B, 192, H, W)."""
        x = freq_encode(images.float())
        gx, _ = self.generator(x)
        return x - gx, gx

    @staticmethod
    def shuffle_perms(batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """(B, 192) int64 independent random permutations on ``device``, all at once (argsort of uniform noise).

        Drawn on ``generator``'s device (a CPU generator gives the same permutations on every device; the copy
        is non-blocking), else on ``device`` from its global RNG: no host sync either way.
        """
        where = draw_device(generator, device)
        return to_device(torch.argsort(torch.rand(batch, 192, generator=generator, device=where), dim=1), device)

    def protect(self, images, labels=None, generator=None) -> Payload:
        """-> image X_p (B, 3, H, W) in [0, 1]: the decoded, channel-shuffled residue."""
        self.check_images(images)
        if self.options.task == "toy":
            x = images.float()
            return Payload(self.name, {"image": x - self.generator(x)[0]})
        r, _ = self.residue(images)
        perm = self.shuffle_perms(images.shape[0], images.device, generator)
        return Payload(self.name, {"image": freq_decode(r, perm=perm)})

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        if self.options.task == "toy":
            return self.recognizer(payload.tensors["image"])
        return self.recognizer_p(payload.tensors["image"])

    def stages(self) -> tuple[Stage, ...]:
        if self.options.task == "toy":
            toy = "pixel space: alpha L1(X, g(X)) + beta ArcFace(f(X - g(X)))"
            return (Stage("toy", ("generator", "recognizer"), toy),)
        warm = (Stage("fp_warmup", ("recognizer_p",), "f_p on clear faces X/2 + 1/2 (CPU-scale warm start)"),)
        return (
            Stage("stage1", ("generator", "recognizer"), "g and f jointly: alpha L1(X, X') + beta ArcFace(f(r))"),
            *(warm if self.options.fp_warmup else ()),
            Stage("stage2", ("recognizer_p",), "g frozen; f_p on X_p with the margin head (ArcFace in the paper)"),
        )

    def training_step(self, stage, images, labels, head, generator=None):
        if stage == "toy":
            x = images.float()
            gx, _ = self.generator(x)
            l1 = F.l1_loss(gx, x)
            cls, logits = head(self.recognizer(x - gx), labels)
            loss = self.options.alpha * l1 + self.options.beta * cls
            return {"loss": loss, "cls_loss": cls.detach(), "l1": l1.detach(), "logits": logits.detach()}
        if stage == "fp_warmup":
            return self.margin_step(self.recognizer_p(images.float() * 0.5 + 0.5), labels, head)
        if stage == "stage1":
            r, gx = self.residue(images)
            recon = 2 * freq_decode(gx) - 1
            l1 = F.l1_loss(recon, images.float())
            cls, logits = head(self.recognizer(r), labels)
            loss = self.options.alpha * l1 + self.options.beta * cls
            return {"loss": loss, "cls_loss": cls.detach(), "l1": l1.detach(), "logits": logits.detach()}
        with torch.no_grad():
            payload = self.protect(images, generator=generator)
        return self.training_step_from_payload(payload, labels, head)

    def training_step_from_payload(self, payload, labels, head):
        return self.margin_step(self.recognize(payload), labels, head)
