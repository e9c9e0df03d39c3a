"""``DataConfig``: the typed, frozen, validated description of a loader (what ``make_loader`` takes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ppfr.data.image import DECODERS
from ppfr.data.sources import VERIFY_LEVELS
from ppfr.pipelines.sharding import LAST_BATCH_POLICIES

BACKENDS = ("auto", "dali", "torch", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
Backend = Literal["auto", "dali", "torch", "synthetic"]


@dataclass(frozen=True)
class DataConfig:
    """Everything a loader needs. Invalid values raise ``ValueError`` naming the key (``DataConfig.<key>``).

    Attributes:
        source: a folder, ``.rec``/``.idx``, ``.tfrecord``, TFace index, ``.bin``, pair list, or ``"synthetic"``.
        backend: ``auto`` (DALI with GPU decode when a GPU and DALI are present, else the faster CPU path measured
            by benchmarks/bench_loaders.py), ``dali``, ``torch``, or ``synthetic`` (one fixed random batch on the
            device, repeated: measures the model, not the input; arcface_torch's convention).
        batch_size: per rank.
        train: shuffle each epoch and flip at random (TFace's only augmentation); False for evaluation.
        shuffle, flip: override what ``train`` implies (None = follow ``train``).
        last_batch: ``drop`` | ``pad`` | ``partial`` (see :mod:`ppfr.pipelines.sharding`); None = ``partial`` (the
            reference keeps the last partial batch, ``drop_last=False``; ``pad`` when sharded over ranks that do not
            divide the data).
        world_size, rank: data-parallel sharding; None reads torch.distributed when initialised, else the
            ``WORLD_SIZE``/``RANK`` environment variables, else a single process.
        num_workers: PyTorch worker processes, or DALI CPU threads.
        verify: ``none`` | ``header`` | ``decode``: what is checked for every sample before the first epoch.
        decoder: ``auto`` | ``cv2`` | ``pil`` (PyTorch path).
        device: ``auto`` | ``cpu`` | ``cuda``: where DALI decodes and where synthetic batches live.
        data_root: where TFace index paths are resolved (default: the index file's folder).
        image_size: output side; aligned face crops are already this size.
        shuffle_buffer: DALI's reader shuffle buffer (``initial_fill``) for container formats.
        num_classes, num_samples: for ``source="synthetic"`` / ``backend="synthetic"``.
    """

    source: str = "synthetic"
    backend: Backend = "auto"
    batch_size: int = 64
    train: bool = True
    shuffle: bool | None = None
    flip: bool | None = None
    last_batch: str | None = None
    world_size: int | None = None
    rank: int | None = None
    num_workers: int = 2
    seed: int = 0
    verify: str = "header"
    decoder: str = "auto"
    device: str = "auto"
    data_root: str | None = None
    image_size: int = 112
    shuffle_buffer: int = 4096
    prefetch: int = 2
    num_classes: int = 1000
    num_samples: int = 10_000

    def __post_init__(self) -> None:
        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"DataConfig.{key} must be {want}, got {getattr(self, key)!r}")

        if not isinstance(self.source, str) or not self.source:
            raise bad("source", "a non-empty path string or 'synthetic'")
        for key, choices in (("backend", BACKENDS), ("verify", VERIFY_LEVELS), ("decoder", DECODERS),
                             ("device", DEVICES)):  # fmt: skip
            if getattr(self, key) not in choices:
                raise bad(key, f"one of {choices}")
        if self.last_batch is not None and self.last_batch not in LAST_BATCH_POLICIES:
            raise bad("last_batch", f"None or one of {LAST_BATCH_POLICIES}")
        for key, lo in (("batch_size", 1), ("num_workers", 0), ("image_size", 8), ("shuffle_buffer", 1),
                        ("prefetch", 1), ("num_classes", 1), ("num_samples", 1), ("seed", 0)):  # fmt: skip
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise bad(key, f"an integer >= {lo}")
        if not isinstance(self.train, bool):
            raise bad("train", "a bool")
        for key in ("shuffle", "flip"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), bool):
                raise bad(key, "None or a bool")
        if self.world_size is not None and (not isinstance(self.world_size, int) or self.world_size < 1):
            raise bad("world_size", "None or an integer >= 1")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 0):
            raise bad("rank", "None or an integer >= 0")
        if self.rank is not None and self.world_size is not None and self.rank >= self.world_size:
            raise ValueError(f"DataConfig.rank must be < world_size={self.world_size}, got {self.rank}")
        if self.backend == "dali" and self.verify == "none":
            raise ValueError(
                "DataConfig.verify='none' cannot be used with backend='dali': DALI's decoder cannot skip a bad "
                "file, so every sample is header-checked first (use verify='header' or backend='torch')"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys are rejected by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)
