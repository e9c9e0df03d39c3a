"""PRO-Face C (IEEE TIFS 2024, METHODS.md §6): hybrid-blurred image + client feature compensation into a frozen
server recogniser.

Client: R = X - blur(X); a MobileFaceNet on R gives 4 feature maps; trained interfaces (bilinear up-sample + 1x1
conv) map them to the server's stage shapes (64@56, 128@28, 256@14, 512@7); the first map is block-channel
shuffled with a key-derived permutation (and, optionally, pruned and quantized). What leaves the client: the
blurred image and the 4 maps. Server: a frozen IR net (AdaFace-style) on the blurred image, with
``h <- h + sigmoid(h) * A_i * K_i`` at the end of each stage (learned keys K_i, initialised to 1, shipped with the
model). Loss: ArcFace(e_c) + MSE(e_c, e_t), e_t the uncompensated server embedding of the clean image.

Choices (docs/methods.md): ``shuffle_block=2`` (the intended 28x28 grid of 2x2-pixel blocks; ``28`` reproduces the
code's 2x2 grid); ``bits=None`` / ``keep_ratio=1.0`` reproduce the code (no quantization or pruning; 8 or 4 bits
and a keep ratio < 1 turn them on, with a straight-through gradient in training); ``server_bgr=True`` feeds the
AdaFace server BGR as it was trained (``False`` reproduces the reference's RGB); the target embedding is computed
without gradient (the reference wastes a backward through it).

Evaluation (METHODS §6.6): the client blur at test time is ``eval_blur`` (``hybrid`` by default: n = 16, k = 13,
sigma = 5, b = 7, one random layout per image); :meth:`ProFaceC.eval_variants` gives ``ppfr eval`` one row per blur
type (Gaussian k 31 sigma 5, median k 13, pixelate b 7, hybrid) as the reference's ``perform_val`` does, and
``eval_flip=False`` (the reference: no flip TTA) is the evaluator's default for this method.

Pretrained transfer (configs/profacec_transfer.yaml): ``transfer.source: faceapi`` makes face-api.js the frozen
server (identity adapter on the blurred RGB image, fixed 128 -> 512 projection); :meth:`ProFaceC.adopt_server_stages`
rebuilds the interfaces, keys and aux0's block shuffle for its stage outputs, and training is the client stage alone.

Paper configs: ``server_ckpt: required`` (configs/profacec_ir50.yaml, profacec_ir100.yaml) marks the paper's setting,
a pretrained frozen server; such a config does not load until ``method_options.server_ckpt=PATH`` names one (a
ConfigError naming ``server_ckpt``, exit 2 from ``ppfr train``). The marker lives in ``server_ckpt`` itself, a
load-time option (``ppfr.methods.base.LOAD_TIME_OPTIONS``), so a trained model.pt rebuilds without the file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppfr.methods.base import (
    ExportGraph, Method, MethodOptions, Payload, Stage, TensorSpec, register_method,
)  # fmt: skip
from ppfr.models.ir import IRNet
from ppfr.models.mobilefacenet import ClientMobileFaceNet
from ppfr.ops.block_shuffle import block_channel_shuffle, block_grid, block_perm_table, dequantize, prune, quantize
from ppfr.ops.blur import (
    GAUSSIAN_K, TEST_MEDIAN_K, TEST_PIXEL_B, TEST_SIGMA, gaussian_blur, hybrid_blur, median_blur, pixelate,
)  # fmt: skip
from ppfr.ops.feature_mask_fuse import feature_mask_fuse_residual


# ``server_ckpt: required`` in a config: the paper's setting, a pretrained server must be named (see the docstring).
SERVER_CKPT_REQUIRED = "required"
# The test-time blurs of METHODS §6.6, in the order ``ppfr eval`` reports them.
EVAL_BLURS = ("gaussian", "median", "pixelate", "hybrid")


@dataclass(frozen=True)
class ProFaceCOptions(MethodOptions):
    depth: int = 50  # AdaFace IR-50 (IR-101 in the reference; 100 here)
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112
    server_ckpt: str | None = None  # a frozen recogniser: AdaFace .ckpt or a ppfr/TFace backbone state dict
    server_bgr: bool = True
    shuffle_block: int = 2
    shuffle_key: int = 56
    bits: int | None = None
    keep_ratio: float = 1.0
    eval_blur: str = "hybrid"  # the test-time blur (METHODS §6.6): hybrid | gaussian | median | pixelate
    eval_flip: bool = False  # the evaluator's flip-TTA default for this method (the reference: none, §6.6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.server_ckpt == SERVER_CKPT_REQUIRED:
            raise ValueError(
                "server_ckpt is required: this config is the paper's setting, a pretrained frozen server "
                "(METHODS §6.1, §6.4); pass method_options.server_ckpt=PATH (an AdaFace .ckpt such as "
                "adaface_ir101_webface12m.ckpt / adaface_ir50_webface4m.ckpt, or runs/<arcface run>/model.pt)")
        if self.eval_blur not in EVAL_BLURS:
            raise ValueError(f"eval_blur must be one of {', '.join(EVAL_BLURS)}, got {self.eval_blur!r}")
        if self.bits not in (None, 8, 4):
            raise ValueError(f"bits must be None, 8 or 4, got {self.bits}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in (0, 1], got {self.keep_ratio}")


class _Interface(nn.Module):
    def __init__(self, cin: int, cout: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(a, size=(self.size, self.size), mode="bilinear", align_corners=False))


def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """quantize -> dequantize with a straight-through gradient (training with the wire format in the loop)."""
    wire, scales = quantize(x.detach(), bits)
    deq = dequantize(wire, scales, bits, tuple(x.shape[2:])).to(x.dtype)
    return x + (deq - x).detach()


@register_method
class ProFaceC(Method):
    name = "profacec"
    Options = ProFaceCOptions
    server_input = "image"

    def __init__(self, options: ProFaceCOptions) -> None:
        super().__init__(options)
        s = options.image_size
        self.client = ClientMobileFaceNet(3, options.embedding_size, with_embedding=False)
        self.server = IRNet(options.depth, 3, options.embedding_size, s, base_width=options.width)
        self._build_compensation(self.server.stage_shapes())  # 64 @ 56, 128 @ 28, 256 @ 14, 512 @ 7
        if options.server_ckpt:
            from ppfr.models.checkpoints import load_backbone

            load_backbone(self.server, options.server_ckpt)
        self.server.requires_grad_(False).eval()

    def _build_compensation(self, shapes) -> None:
        """Interfaces, keys, the block-shuffle table and the payload's aux shapes for server stages ``shapes``."""
        s = self.options.image_size
        self.shapes = [tuple(cs) for cs in shapes]
        self.interfaces = nn.ModuleList(
            _Interface(cin, cout, sz) for (cin, _), (cout, sz) in zip(ClientMobileFaceNet.TAP_SHAPES, self.shapes)
        )
        self.keys = nn.ParameterList(nn.Parameter(torch.ones(c, sz, sz)) for c, sz in self.shapes)
        c0, s0 = self.shapes[0]
        n_blocks = math.prod(block_grid(s0, s0, self.options.shuffle_block))
        self.register_buffer("shuffle_perm", block_perm_table(self.options.shuffle_key, c0, n_blocks))
        self.payload_spec = {
            "image": TensorSpec((3, s, s), torch.float32, -1.0, 1.0),
            **{f"aux{i}": TensorSpec((c, sz, sz)) for i, (c, sz) in enumerate(self.shapes)},
        }

    def adopt_server_stages(self, shapes) -> None:
        """A pretrained transfer is the frozen server (face-api.js: 32 @ 35, 64 @ 17, 128 @ 8, 256 @ 4; aux0's
        block shuffle then runs on a 35 x 35 map, partial edge blocks included): the compensation is rebuilt for
        its stages, the server frozen, and training is the client stage alone, as with ``server_ckpt``."""
        self._build_compensation(shapes)
        self.transferred_server = True
        self.server.requires_grad_(False).eval()

    _eval_blur: str | None = None  # set by blur_as()

    def blur(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Training: the hybrid blur with per-batch random parameters (§6.2). Evaluation: ``eval_blur`` (or the kind
        :meth:`blur_as` selects) with the test parameters of §6.2 / §6.6."""
        x = images.float()
        kind = "hybrid" if self.training else (self._eval_blur or self.options.eval_blur)
        if kind == "gaussian":
            return gaussian_blur(x, GAUSSIAN_K, TEST_SIGMA)
        if kind == "median":
            return median_blur(x, TEST_MEDIAN_K)
        if kind == "pixelate":
            return pixelate(x, TEST_PIXEL_B)
        return hybrid_blur(x, generator=generator, train=self.training).image

    @contextlib.contextmanager
    def blur_as(self, kind: str) -> Iterator[ProFaceC]:
        """``with method.blur_as("median"):`` evaluation uses that blur (one of EVAL_BLURS); training is unaffected."""
        if kind not in EVAL_BLURS:
            raise ValueError(f"blur kind must be one of {', '.join(EVAL_BLURS)}, got {kind!r}")
        old, self._eval_blur = self._eval_blur, kind
        try:
            yield self
        finally:
            self._eval_blur = old

    def eval_variants(self) -> dict[str, Callable[[], contextlib.AbstractContextManager] | None]:
        """The evaluator hook: one variant per test blur (METHODS §6.6); ``None`` marks the method as configured
        (``eval_blur``), which the evaluator's main row already measures."""
        return {k: (None if k == self.options.eval_blur else (lambda k=k: self.blur_as(k))) for k in EVAL_BLURS}

    @property
    def eval_flip(self) -> bool:
        """The evaluator's flip-TTA default (``ppfr eval --flip`` overrides): off, as the reference evaluates."""
        return self.options.eval_flip

    def protect(self, images, labels=None, generator=None) -> Payload:
        """-> image (blurred, B x 3 x 112 x 112 in [-1, 1]) and aux0..3 compensation maps (aux0 block-shuffled)."""
        self.check_images(images)
        blurred = self.blur(images, generator)
        aux = self.compensation(images.float() - blurred)
        return Payload(self.name, {"image": blurred.clamp(-1, 1), **{f"aux{i}": a for i, a in enumerate(aux)}})

    def export_graphs(self) -> dict[str, ExportGraph]:
        """The server graph, and the client network: the residual X - blur(X) (B, 3, H, W) in [-2, 2] -> aux0..aux3
        (aux0 block-shuffled with the model's key; pruned / fake-quantized as the options ask: discontinuous)."""
        graphs = super().export_graphs()
        o, s = self.options, self.options.image_size
        refusal = None
        if o.bits == 4:
            refusal = ("profacec bits=4: the int4 wire packing (nibble shifts and masks on uint8) has no faithful ONNX "
                       "form in these exporters; export bits=8 or bits=None")  # fmt: skip
        graphs["client"] = ExportGraph(
            {"residual": TensorSpec((3, s, s), torch.float32, -2.0, 2.0)},
            {k: tuple(v.shape) for k, v in self.payload_spec.items() if k.startswith("aux")},
            lambda x: tuple(self.compensation(x)),
            lambda images, generator: {"residual": images - self.blur(images, generator)},
            discontinuous=o.keep_ratio < 1.0 or o.bits is not None, refusal=refusal)  # fmt: skip
        return graphs

    def compensation(self, residual: torch.Tensor) -> list[torch.Tensor]:
        """The client network: R = X - blur(X) (B, 3, H, W) in [-2, 2] -> aux0..3 (aux0 block-shuffled, then
        optional pruning / fake quantization). Split from ``protect`` so the network exports on its own."""
        _, taps = self.client(residual)
        aux = [iface(t) for iface, t in zip(self.interfaces, taps)]
        o = self.options
        aux[0] = block_channel_shuffle(aux[0], self.shuffle_perm, o.shuffle_block)
        if o.keep_ratio < 1.0:
            aux = [prune(a, o.keep_ratio) for a in aux]
        if o.bits is not None:
            aux = [_fake_quant(a, o.bits) for a in aux]
        return aux

    def _server_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.flip(1) if self.options.server_bgr else images

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        t = payload.tensors

        def inject(stage: int, h: torch.Tensor) -> torch.Tensor:
            return feature_mask_fuse_residual(h, t[f"aux{stage}"], self.keys[stage])

        return self.server(self._server_input(t["image"]), inject=inject)

    def stages(self) -> tuple[Stage, ...]:
        """``client`` only when a pretrained server is given (the paper's setting); without one, a ``server`` stage
        first trains the recogniser on clear images so the run is self-contained (e.g. the CPU-scale tiny config)."""
        client = Stage("client", ("client", "interfaces", "keys"), "server frozen: ArcFace(e_c) + MSE(e_c, e_t)")
        # stages() reads only the options and this flag (set by a transfer), so it answers on a bare instance too
        if self.options.server_ckpt or self.__dict__.get("transferred_server", False):
            return (client,)
        return (Stage("server", ("server",), "the server recogniser on clear images: ArcFace(f(X))"), client)

    def training_step(self, stage, images, labels, head, generator=None):
        if stage == "server":
            return self.margin_step(self.server(self._server_input(images.float())), labels, head)
        e_c = self.recognize(self.protect(images, labels=labels, generator=generator))
        with torch.no_grad():
            e_t = self.server(self._server_input(images.float()))
        cls, logits = head(e_c, labels)
        mse = F.mse_loss(F.normalize(e_c), F.normalize(e_t))
        return {"loss": cls + mse, "cls_loss": cls.detach(), "mse": mse.detach(), "logits": logits.detach()}
