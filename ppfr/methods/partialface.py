"""PartialFace (ICCV 2023, METHODS.md §4): train and infer on a random rank of high-frequency channels.

Choices (docs/methods.md): the rank space defaults to the reference code's (m, n) = (6, 3) tables
(``rank_space="code"``); ``"paper"`` gives the paper's (s, m, n) = (9, 6, 6) and ``"keyed"`` a seeded space with any
(s, m, n). Training draws with the code's label-restricted rule (``train_rule="label"``; ``"uniform"`` is the
paper's reading); inference draws a uniformly random rank per image. The augmentation factor r is a data-loader
setting (dataset replication), not part of the method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppfr.methods.base import (
    FreqPayloadOperator, Method, MethodOptions, Payload, Stage, TensorSpec, register_method,
)  # fmt: skip
from ppfr.models.ir import IRNet
from ppfr.ops.freq import freq_encode
from ppfr.ops.sample_ranks import RankSpace, sample_ranks


@dataclass(frozen=True)
class PartialFaceOptions(MethodOptions):
    depth: int = 50
    width: int = 64  # IR base width (64 = standard; smaller for CPU-scale tiny models)
    image_size: int = 112
    rank_space: str = "code"  # code | paper | keyed
    s: int = 9
    m: int = 6
    n: int = 6
    key: int = 0
    train_rule: str = "label"  # label (code) | uniform (paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_space not in ("code", "paper", "keyed"):
            raise ValueError(f"rank_space must be code, paper or keyed, got {self.rank_space!r}")
        if self.train_rule not in ("label", "uniform"):
            raise ValueError(f"train_rule must be label or uniform, got {self.train_rule!r}")


@register_method
class PartialFace(Method):
    name = "partialface"
    Options = PartialFaceOptions

    def __init__(self, options: PartialFaceOptions) -> None:
        super().__init__(options)
        if options.rank_space == "code":
            self.space = RankSpace.code()
        elif options.rank_space == "paper":
            self.space = RankSpace.paper(options.key)
        else:
            self.space = RankSpace.generate(options.s, options.m, options.n, options.key)
        k = 3 * self.space.s
        sz = options.image_size
        self.server = IRNet(options.depth, k, options.embedding_size, sz, base_width=options.width)
        self.payload_spec = {"dct": TensorSpec((k, sz, sz), torch.float32)}

    def sample(self, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None):
        """One rank per image, sampled on ``images``' device (no host sync; see :func:`sample_ranks`)."""
        dev = images.device
        if self.training and labels is not None:
            return sample_ranks(labels, space=self.space, rule=self.options.train_rule, generator=generator,
                                device=dev)  # fmt: skip
        return sample_ranks(batch=images.shape[0], space=self.space, rule="uniform", generator=generator, device=dev)

    def protect(self, images, labels=None, generator=None) -> Payload:
        """(B, 3, 112, 112) -> one rank per image: (B, 27, 112, 112) raw DCT, encoded in one pass."""
        self.check_images(images)
        ranks = self.sample(images, labels, generator)
        return Payload(self.name, {"dct": freq_encode(images.float(), ranks.channels)})

    def payload_operator(self) -> FreqPayloadOperator:
        """Every rank of the space: m * n channel lists (subset i in permutation j -> row i * n + j, ``SiPj``)."""
        table = self.space.channel_table()
        names = tuple(f"S{i}P{j}" for i in range(self.space.m) for j in range(self.space.n))
        return FreqPayloadOperator("dct", table.reshape(-1, table.shape[-1]), names)

    def recognize(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        return self.server(payload.tensors["dct"])

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("train", ("server",), "IR net on random ranks"),)
