"""``make_loader(cfg)``: one data entry point over interchangeable backends (DALI, PyTorch, synthetic).

Every backend yields ``(images, labels)`` with images (B, 3, S, S) float32 in [-1, 1] RGB and labels (B,) int64,
has a fixed ``len`` (batches per epoch, equal on every rank), treats each ``iter()`` as one epoch and cuts epochs by
:class:`ppfr.pipelines.sharding.ShardPlan`. Bad samples never stop a run: they are found by the pre-scan
(``verify``) or at decode time, skipped (replaced by the next sample, so batches stay full), counted in
``loader.skipped``, and reported in a single :class:`~ppfr.data.CorruptDataWarning`.

The PyTorch path decodes, flips and normalises in DataLoader worker processes (NumPy, one thread each), so the main
process only hands batches on.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ppfr.data._common import CorruptSampleError
from ppfr.data.config import DataConfig
from ppfr.data.image import decode, resolve_decoder, sniff
from ppfr.data.sources import ScanResult, Source, open_source, scan, warn_bad
from ppfr.pipelines.sharding import ShardPlan

# The backend ``auto`` picks without a GPU: the faster CPU path of benchmarks/bench_loaders.py on celeba112
# (batch 64, 2 shared cores at load ~4): torch + OpenCV 2.2-2.6k img/s with 1 worker, 1.9-4.6k with 2; DALI CPU
# 1.4-2.0k img/s with 1 thread, 1.1-1.6k with 2 (docs/data.md). The benchmark's ratio check guards this choice.
AUTO_CPU_BACKEND = "torch"
_MAX_SUBSTITUTIONS = 16  # consecutive unreadable samples before the source is declared broken


# ----------------------------------------------------------------------------------------- resolution
def resolve_world(cfg: DataConfig) -> tuple[int, int]:
    """(world_size, rank): the config's, else torch.distributed's, else WORLD_SIZE/RANK, else (1, 0)."""
    world, rank = cfg.world_size, cfg.rank
    if world is None or rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dw, dr = torch.distributed.get_world_size(), torch.distributed.get_rank()
        else:
            dw, dr = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        world = dw if world is None else world
        rank = dr if rank is None else rank
    if not 0 <= rank < world:
        raise ValueError(f"DataConfig.rank must lie in [0, world_size={world}), got {rank}")
    return world, rank


def resolve_device(cfg: DataConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("DataConfig.device='cuda' but no CUDA device is available")
    return torch.device(cfg.device)


def resolve_backend(cfg: DataConfig) -> str:
    """The backend ``cfg.backend`` means here; raises ImportError (with the install line) for missing DALI."""
    from ppfr.pipelines.dali import dali_unavailable_reason

    if cfg.backend == "auto":
        if cfg.source == "synthetic":
            return "synthetic"
        dali_ok = dali_unavailable_reason() is None
        if resolve_device(cfg).type == "cuda" and dali_ok:
            return "dali"  # nvJPEG decode on the GPU
        return AUTO_CPU_BACKEND if (AUTO_CPU_BACKEND != "dali" or dali_ok) else "torch"
    if cfg.backend == "dali":
        reason = dali_unavailable_reason()
        if reason is not None:
            raise ImportError(f"DataConfig.backend='dali': {reason}")
    return cfg.backend


def _last_batch(cfg: DataConfig, n: int, world: int) -> str:
    if cfg.last_batch is not None:
        return cfg.last_batch
    # training as evaluation: TFace's DataLoader keeps the last partial batch (drop_last=False, METHODS §1.2); over
    # ranks that do not divide the data, every rank's tail is padded (its unsharded sampler pads the permutation)
    return "partial" if n % world == 0 else "pad"


# -------------------------------------------------------------------------------------- PyTorch path
class _FaceDataset(torch.utils.data.Dataset):
    """Decodes samples ``indices`` of ``source`` into a float batch; a bad sample is replaced by the next one.

    Items are ``(position, flip)`` pairs: the flip draw is made by the sampler in the main process (deterministic
    per seed, rank and epoch) and applied here, in the worker, with the decode and the normalisation -- all in
    NumPy on one thread. Doing flip + normalisation in the main process with torch instead cost 40 ms per batch of
    64 on this 2-core machine (OpenMP threads fighting the workers) vs ~2 ms single-threaded.
    """

    def __init__(self, source: Source, indices: np.ndarray, image_size: int, decoder: str) -> None:
        self.source, self.indices, self.size, self.decoder = source, indices, image_size, decoder
        self.labels = source.labels[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: list[tuple[int, bool]]) -> dict:
        n = len(self.indices)
        images = np.empty((len(items), 3, self.size, self.size), dtype=np.float32)
        labels = np.empty(len(items), dtype=np.int64)
        bad: list[tuple[int, str]] = []
        for j, (k, flip) in enumerate(items):
            for attempt in range(min(n, _MAX_SUBSTITUTIONS)):
                kk = (k + attempt) % n
                i = int(self.indices[kk])
                try:
                    data = self.source.read(i)
                    sniff(data)  # microseconds; a truncated JPEG would otherwise decode with a grey tail
                    img = decode(data, self.decoder, self.size)
                except CorruptSampleError as exc:
                    bad.append((i, str(exc)))
                    continue
                chw = img.transpose(2, 0, 1)
                if flip:
                    chw = chw[:, :, ::-1]
                np.subtract(chw, np.float32(127.5), out=images[j], dtype=np.float32)  # (x - 127.5) / 127.5,
                images[j] *= np.float32(1.0 / 127.5)  # the same arithmetic as DALI's normalisation
                labels[j] = self.labels[kk]
                break
            else:
                raise RuntimeError(f"{_MAX_SUBSTITUTIONS} consecutive unreadable samples at {self.source.name(i)}; "
                                   "is the source corrupt? (`ppfr data inspect` lists bad samples)")  # fmt: skip
        return {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels), "bad": bad}

    def __getitem__(self, k: int) -> dict:
        return self.__getitems__([(k, False)])


class _EpochBatchSampler:
    """Batches of (dataset position, flip) for the current epoch, per :class:`ShardPlan` (set ``epoch`` first)."""

    def __init__(self, plan: ShardPlan, shuffle: bool, flip: bool, seed: int) -> None:
        self.plan, self.shuffle, self.flip, self.seed, self.epoch = plan, shuffle, flip, seed, 0

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        order = self.plan.order(self.epoch, self.shuffle, self.seed)
        # TFace's RandomHorizontalFlip(0.5), drawn per sample from a per-(seed, rank, epoch) generator
        rng = np.random.default_rng([self.seed, self.plan.rank, self.epoch, 1])
        for step in range(self.plan.steps):
            pos = order[self.plan.positions(self.epoch, step)].tolist()
            flips = (rng.random(len(pos)) < 0.5).tolist() if self.flip else [False] * len(pos)
            yield list(zip(pos, flips))


def _collate(batch: dict) -> dict:
    return batch  # __getitems__ already built the batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode is single-threaded per worker; avoid oversubscribing the cores


class TorchFaceLoader:
    """PyTorch DataLoader path (see the module docstring); :func:`make_loader` builds it."""

    backend = "torch"

    def __init__(self, source: Source, indices: np.ndarray, plan: ShardPlan, *, num_workers: int = 2,
                 image_size: int = 112, flip: bool = False, shuffle: bool = False, seed: int = 0,
                 decoder: str = "auto", prefetch: int = 2, pin_memory: bool = False) -> None:  # fmt: skip
        self.plan = plan
        self.dataset = _FaceDataset(source, indices, image_size, resolve_decoder(decoder))  # type: ignore[arg-type]
        self.sampler = _EpochBatchSampler(plan, shuffle, flip, seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=num_workers, collate_fn=_collate,
            persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers > 0 else None,
            pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers > 0 else None,
        )  # fmt: skip
        self.epoch = 0
        self.substituted: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return self.plan.steps

    def reset(self) -> None:
        """Nothing to drain: each ``iter()`` starts a fresh DataLoader epoch."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        self.sampler.epoch = epoch
        for batch in self.loader:
            self.substituted += batch["bad"]
            yield batch["images"], batch["labels"]


# ------------------------------------------------------------------------------------- synthetic path
class SyntheticLoader:
    """arcface_torch's synthetic loader: one random batch, made once on the device and yielded ``len`` times."""

    backend = "synthetic"

    def __init__(self, plan: ShardPlan, *, image_size: int = 112, num_classes: int = 1000, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.plan = plan
        g = torch.Generator().manual_seed(seed * 1_000_003 + plan.rank)
        b = plan.batch_size
        self.images = (torch.rand(b, 3, image_size, image_size, generator=g) * 2 - 1).to(device)
        self.labels = torch.randint(0, num_classes, (b,), generator=g).to(device)
        self.epoch = 0
        self.substituted: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return self.plan.steps

    def reset(self) -> None:
        """Stateless: nothing to drain."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        for step in range(self.plan.steps):
            k = self.plan.size(epoch, step)
            yield self.images[:k], self.labels[:k]


# ------------------------------------------------------------------------------------------- facade
class Loader:
    """What :func:`make_loader` returns: the backend's loader plus the source, the scan and the bad-sample report.

    Attributes:
        backend: the resolved backend ('dali', 'torch' or 'synthetic').
        plan: the :class:`ShardPlan` (``len(loader) == plan.steps``).
        source: the opened :class:`Source` (None for the synthetic backend).
        num_classes, num_samples: classes of the source; usable samples after the scan.
    """

    def __init__(self, inner, backend: str, source: Source | None, scanned: ScanResult | None, num_classes: int,
                 workdir: tempfile.TemporaryDirectory | None = None) -> None:  # fmt: skip
        self.inner, self.backend, self.source, self.scan = inner, backend, source, scanned
        self.plan: ShardPlan = inner.plan
        self.num_classes = num_classes
        self.num_samples = self.plan.num_samples
        self._workdir = workdir  # DALI index files live here as long as the loader does
        self._reported = len(scanned.bad) if scanned is not None else 0

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def epoch(self) -> int:
        """Epochs started so far."""
        return self.inner.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` yield epoch ``epoch`` (the order is a function of (seed, epoch)): for resuming.

        DALI's readers keep their own position, so the DALI backend only accepts the epoch it is already at.
        """
        if self.backend == "dali" and int(epoch) != self.inner.epoch:
            raise NotImplementedError(f"the DALI loader is at epoch {self.inner.epoch} and cannot jump to {epoch}; "
                                      "resume with data.backend=torch")  # fmt: skip
        self.inner.epoch = int(epoch)

    def reset(self) -> None:
        """Finish an abandoned epoch (DALI drains its reader; a no-op elsewhere); ``iter()`` calls it anyway."""
        self.inner.reset()

    @property
    def skipped_samples(self) -> list[tuple[str, str]]:
        """(sample name, reason) for every distinct sample skipped so far (pre-scan and decode time)."""
        seen: dict[int, str] = {}
        for i, r in (self.scan.bad if self.scan is not None else []) + list(self.inner.substituted):
            seen.setdefault(i, r)
        return [(self.source.name(i) if self.source is not None else str(i), r) for i, r in seen.items()]

    @property
    def skipped(self) -> int:
        """How many distinct samples were skipped so far."""
        return len(self.skipped_samples)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self.inner
        # one summary warning for samples first found bad at decode time (the pre-scan warned for its own)
        if self.source is not None and self.skipped > self._reported:
            seen: dict[int, str] = {}
            for i, r in self.inner.substituted:
                seen.setdefault(i, r)
            prior = {i for i, _ in self.scan.bad} if self.scan is not None else set()
            warn_bad(self.source, [(i, r) for i, r in seen.items() if i not in prior], stacklevel=2)
            self._reported = self.skipped


def make_loader(cfg: DataConfig, source: Source | None = None) -> Loader:
    """Build the loader ``cfg`` describes.

    Args:
        cfg: a :class:`DataConfig`.
        source: an already opened source (default: ``open_source(cfg.source, data_root=cfg.data_root)``).
    Returns:
        A :class:`Loader`: iterate for ``(images (B, 3, S, S) float32 in [-1, 1], labels (B,) int64)``; ``len`` is
        the number of batches per epoch on every rank.
    Raises:
        ValueError: an invalid combination (the message names the key); ImportError: DALI asked for but missing;
        DataFormatError: the source cannot be read or is refused.
    """
    world, rank = resolve_world(cfg)
    backend = resolve_backend(cfg)
    shuffle = cfg.train if cfg.shuffle is None else cfg.shuffle
    flip = cfg.train if cfg.flip is None else cfg.flip
    if backend == "synthetic":
        n = cfg.num_samples
        # one fixed full batch repeated (it measures the model, not the data): whole batches only by default
        plan = ShardPlan(n, cfg.batch_size, world, rank, cfg.last_batch or "drop")
        inner = SyntheticLoader(plan, image_size=cfg.image_size, num_classes=cfg.num_classes, seed=cfg.seed,
                                device=resolve_device(cfg))  # fmt: skip
        return Loader(inner, backend, None, None, cfg.num_classes)
    if source is None:
        source = open_source(cfg.source, data_root=cfg.data_root, num_samples=cfg.num_samples,
                             num_classes=cfg.num_classes, size=cfg.image_size, seed=cfg.seed)  # fmt: skip
    scanned = scan(source, cfg.verify, cfg.decoder)  # type: ignore[arg-type]
    warn_bad(source, scanned.bad)
    n = int(scanned.good.size)
    if n == 0:
        raise ValueError(f"no usable samples in {source.path} (all {len(source)} failed verify={cfg.verify!r})")
    try:
        plan = ShardPlan(n, cfg.batch_size, world, rank, _last_batch(cfg, n, world))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"DataConfig (batch_size={cfg.batch_size}, last_batch, world_size={world}): {exc}") from None
    device = resolve_device(cfg)
    if backend == "dali":
        from ppfr.pipelines.dali import DALILoader

        workdir = tempfile.TemporaryDirectory(prefix="ppfr-dali-")
        reader = source.dali_reader(scanned.good, Path(workdir.name))
        inner = DALILoader(
            reader, batch_size=cfg.batch_size, world_size=world, rank=rank, last_batch=plan.last_batch,
            num_threads=max(1, cfg.num_workers),
            device_id=torch.cuda.current_device() if device.type == "cuda" else None,
            image_size=cfg.image_size, flip=flip, shuffle=shuffle, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
            prefetch=cfg.prefetch,
        )  # fmt: skip
        return Loader(inner, backend, source, scanned, source.num_classes, workdir)
    inner = TorchFaceLoader(
        source, scanned.good, plan, num_workers=cfg.num_workers, image_size=cfg.image_size, flip=flip,
        shuffle=shuffle, seed=cfg.seed, decoder=cfg.decoder, prefetch=cfg.prefetch, pin_memory=device.type == "cuda",
    )  # fmt: skip
    return Loader(inner, backend, source, scanned, source.num_classes)
