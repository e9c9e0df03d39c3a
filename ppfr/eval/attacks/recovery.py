"""The learned recovery attack (METHODS.md §7.4): a U-Net trained to turn a method's real payload back into the face.

Threat model (the papers' *white-box* attacker): the attacker sees payloads on the wire, knows the method and, where
the payload depends on them, the client's trained weights (it rebuilds the method from the same ``model.pt``), but
not the per-image secrets drawn at protection time (PartialFace's rank, MinusFace's channel permutation, PRO-Face
C's blur layout). It trains a recovery network on public faces of *other* identities; with ``secrets="fresh"``
each step protects a batch with new per-image secrets -- so it learns over the whole space of ranks / shuffles, as
a real attacker sampling its own protections would -- and with ``secrets="fixed"`` one key for all (an attacker
holding the client's key). It regresses the RGB face and is scored on held-out identities by
:func:`ppfr.eval.attacks.results.score_images` (SSIM, PSNR, re-identification by the judge).

* :class:`PayloadStem` -- per-channel standardisation + a learned 1x1 projection of every payload tensor.
* :class:`RecoveryAttacker` -- stem + :class:`ppfr.models.unet.UNet` + a linear 1x1 shortcut -> RGB.
* ``init="inversion"``: where the payload is linear, the closed-form inversion estimate
  (:mod:`ppfr.eval.attacks.inversion`) is one more input tensor, so the network only learns what the solve cannot
  see.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ppfr.eval.attacks import register_attack
from ppfr.eval.attacks.common import IMAGE_SIZE, PAPER_PRIVACY, Attack, AttackConfig, AttackContext, payload_shapes
from ppfr.eval.attacks.data import EVAL_STREAM, NORM_STREAM, TRAIN_STREAM, FaceSet, protect_with
from ppfr.eval.attacks.fit import fit_attacker
from ppfr.eval.attacks.results import score_images
from ppfr.eval.image_metrics import ssim
from ppfr.methods.base import Method, Payload
from ppfr.models.unet import UNet


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

InputFn = Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]]


def attack_inputs(method: Method, cfg: AttackConfig, inverter: Any = None) -> InputFn:
    """``fn(images, stream, step) -> {name: tensor}``: what the attacker sees for a batch of clean faces -- the
    payload tensors (protected as ``cfg.secrets`` says), plus ``inversion`` (B, 3, S, S) in [-1, 1] when an
    inverter is given."""

    def fn(x: torch.Tensor, stream: int, step: int) -> dict[str, torch.Tensor]:
        payload = protect_with(method, x, cfg, stream, step)
        tensors = dict(payload.tensors)
        if inverter is not None:
            tensors["inversion"] = inverter.recover(payload)
        return tensors

    return fn


def build_attacker(inputs: InputFn, train: FaceSet, cfg: AttackConfig,
                   device: torch.device | str = "cpu") -> RecoveryAttacker:  # fmt: skip
    """An attacker sized for the inputs, its standardisation fitted on ``cfg.norm_batches`` batches."""
    g = torch.Generator().manual_seed(cfg.seed)
    batches = []
    with torch.no_grad():
        for i in range(cfg.norm_batches):
            idx = torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=g)
            batches.append(inputs(train.batch(idx).to(device), NORM_STREAM, i))
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


def train_attacker(inputs: InputFn, attacker: RecoveryAttacker, train: FaceSet, cfg: AttackConfig,
                   device: torch.device | str = "cpu", log: Callable[[str], None] | None = print) -> dict:  # fmt: skip
    """Train ``attacker`` on the inputs of training faces (new secrets every step unless ``cfg.secrets`` is fixed)
    with :func:`~ppfr.eval.attacks.fit.fit_attacker`; returns its summary."""

    def loss_fn(x: torch.Tensor, step: int, _draw: object = None) -> torch.Tensor:
        with torch.no_grad():
            tensors = inputs(x, TRAIN_STREAM, step)
        return attack_loss(attacker(tensors), x * 0.5 + 0.5, cfg)

    return fit_attacker(attacker, loss_fn, train, cfg, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                        seed=cfg.seed + 1, name="recovery", device=device, log=log)  # fmt: skip


@torch.no_grad()
def recover_heldout(inputs: InputFn, attacker: RecoveryAttacker, val: FaceSet, cfg: AttackConfig,
                    device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """(N, 3, H, W) in [0, 1]: the attacker's recovery of every held-out face (evaluation secrets per batch)."""
    attacker.eval()
    out = []
    for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
        x = val.batch(torch.arange(start, min(start + cfg.eval_batch_size, len(val)))).to(device)
        out.append(attacker.recover(inputs(x, EVAL_STREAM, k)).cpu())
    return torch.cat(out)


@register_attack
class RecoveryAttack(Attack):
    name = "recovery"
    description = "learned U-Net recovery of the face from the whole payload (the papers' white-box attacker)"
    produces_images = True

    def run(self, ctx: AttackContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg, method = ctx.cfg, ctx.method
        inverter = None
        if cfg.init == "inversion":
            from ppfr.eval.attacks.inversion import Inverter

            inverter = ctx.shared.get("inverter") or Inverter.for_method(method, ctx.train, cfg)
            ctx.shared["inverter"] = inverter
        inputs = attack_inputs(method, cfg, inverter)
        attacker = build_attacker(inputs, ctx.train, cfg, ctx.device)
        n_params = sum(p.numel() for p in attacker.parameters())
        if ctx.log:
            desc = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in attacker.stem.shapes.items())
            ctx.log(f"  recovery: inputs {desc}; attacker {n_params / 1e6:.2f} M parameters")
        summary = train_attacker(inputs, attacker, ctx.train, cfg, ctx.device, ctx.log)
        rec = recover_heldout(inputs, attacker, ctx.val, cfg, ctx.device)
        sec = score_images(ctx, rec)
        sec.update({
            "time_s": round(time.perf_counter() - t0, 2),
            "secrets": cfg.secrets,
            "init": "inversion" if inverter is not None else "none",
            "inputs": {k: list(v) for k, v in attacker.stem.shapes.items()},
            "attacker": {"stem_width": cfg.stem_width, "base_width": cfg.base_width, "parameters": n_params,
                         "loss": cfg.loss, "lr": cfg.lr},
            "train": summary,
            "paper": PAPER_PRIVACY.get(method.name, []),
            "_grid": rec[ctx.grid_index()],
        })  # fmt: skip
        return sec
