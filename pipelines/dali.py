"""DALI input pipelines for face recognition, wrapped to behave like a DataLoader.

:func:`face_pipeline` is a ``@pipeline_def``: a reader (DALI's file, RecordIO or TFRecord reader, or an external
source over any ppfr source), ``fn.decoders.image`` (``device="mixed"`` -- nvJPEG -- on a GPU, ``"cpu"`` otherwise),
a resize to the model's size (the identity for aligned 112x112 crops: verified bit-exact), a random horizontal flip
and normalisation to [-1, 1] in CHW float32. Readers are sharded with ``shard_id``/``num_shards`` and always run
with ``pad_last_batch=True`` and ``stick_to_shard=False``: every shard then produces the same number of batches per
epoch, and :class:`DALILoader` cuts the policy's epoch (``drop``/``pad``/``partial``) out of that stream and
drains the rest, so epochs never drift (the failure modes of DALI issues #2607, #4608, #4440 and insightface #1890).
The semantics are those of :mod:`ppfr.pipelines.sharding`, shared with the PyTorch path.

DALI is optional: nothing here imports it until a pipeline is built, so ``import ppfr.pipelines`` works without it.
Install: ``pip install nvidia-dali-cuda130==2.4.0`` (CUDA 13 wheels; its CPU mode needs no GPU or driver).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ppfr.pipelines.sharding import LastBatch, ShardPlan

READER_NAME = "Reader"


# ------------------------------------------------------------------------------------ reader descriptions
@dataclass(frozen=True)
class FileReader:
    """Image files with their labels (``fn.readers.file(files=..., labels=...)``)."""

    files: list[str]
    labels: np.ndarray


@dataclass(frozen=True)
class RecordIOReader:
    """An MXNet/insightface ``.rec`` with an index that lists image records only (``fn.readers.mxnet``)."""

    rec: str
    idx: str
    labels: np.ndarray


@dataclass(frozen=True)
class TFRecordReader:
    """TFRecord files with DALI ``offset size`` index files; records carry ``image`` and ``label`` features."""

    paths: list[str]
    index_paths: list[str]
    labels: np.ndarray
    image_key: str = "image"
    label_key: str = "label"


@dataclass(frozen=True)
class ExternalReader:
    """Any indexable source: ``read(indices[k])`` gives sample k's encoded bytes (``fn.external_source``).

    Sharding, shuffling and padding follow :class:`ShardPlan` exactly as the PyTorch path does, so the two backends
    produce the same samples in the same order. A sample that fails the header check is replaced by the next one
    and recorded in ``DALILoader.substituted``.
    """

    read: Callable[[int], bytes]
    indices: np.ndarray
    labels: np.ndarray


Reader = FileReader | RecordIOReader | TFRecordReader | ExternalReader


def dali_unavailable_reason() -> str | None:
    """None if DALI imports here, else why not and how to get it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"NVIDIA DALI is not installed ({exc}); pip install nvidia-dali-cuda130==2.4.0"
    return None


def _require_dali() -> None:
    reason = dali_unavailable_reason()
    if reason is not None:
        raise ImportError(reason)


# ------------------------------------------------------------------------------------------ the pipeline
@dataclass
class _ExternalFeed:
    """Per-sample callback of the external source: sample_info.iteration -> (reader epoch, step) -> sample."""

    reader: ExternalReader
    plan: ShardPlan
    shuffle: bool
    seed: int
    substituted: list[tuple[int, str]] = field(default_factory=list)
    _orders: dict[int, np.ndarray] = field(default_factory=dict)

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray]:
        from ppfr.data._common import CorruptSampleError
        from ppfr.data.image import sniff

        epoch, step = divmod(info.iteration, self.plan.reader_batches)
        order = self._orders.get(epoch)
        if order is None:
            self._orders = {epoch: self.plan.order(epoch, self.shuffle, self.seed)}  # keep one epoch's order
            order = self._orders[epoch]
        pos = int(self.plan.positions(epoch, step, full=True)[info.idx_in_batch])
        n = self.plan.num_samples
        for attempt in range(min(n, 16)):
            k = int(order[(pos + attempt) % n])
            idx = int(self.reader.indices[k])
            try:
                data = self.reader.read(idx)
                sniff(data)
            except CorruptSampleError as exc:
                self.substituted.append((idx, str(exc)))
                continue
            return np.frombuffer(data, dtype=np.uint8), np.asarray([self.reader.labels[k]], dtype=np.int64)
        raise RuntimeError(f"16 consecutive unreadable samples from position {pos}; is the source corrupt?")


@functools.cache
def _pipeline_def():
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import tfrecord as tfrec

    @pipeline_def
    def face_pipeline(reader: Reader, plan: ShardPlan, shuffle: bool, reader_seed: int, shuffle_buffer: int,
                      decoder_device: str, image_size: int, flip: bool, feed: _ExternalFeed | None):  # fmt: skip
        """(images (B, 3, S, S) float32 in [-1, 1] RGB, labels (B, 1)) from ``reader``; see the module docstring."""
        common = dict(shard_id=plan.rank, num_shards=plan.world_size, pad_last_batch=True, stick_to_shard=False,
                      random_shuffle=shuffle, initial_fill=shuffle_buffer, seed=reader_seed,
                      name=READER_NAME)  # fmt: skip
        if isinstance(reader, FileReader):
            jpegs, labels = fn.readers.file(files=reader.files, labels=[int(x) for x in reader.labels], **common)
        elif isinstance(reader, RecordIOReader):
            jpegs, labels = fn.readers.mxnet(path=[reader.rec], index_path=[reader.idx], **common)
        elif isinstance(reader, TFRecordReader):
            feats = fn.readers.tfrecord(
                path=reader.paths, index_path=reader.index_paths,
                features={reader.image_key: tfrec.FixedLenFeature((), tfrec.string, ""),
                          reader.label_key: tfrec.FixedLenFeature([1], tfrec.int64, -1)},
                **common,
            )  # fmt: skip
            jpegs, labels = feats[reader.image_key], feats[reader.label_key]
        else:
            jpegs, labels = fn.external_source(source=feed, num_outputs=2, batch=False,
                                               dtype=[types.UINT8, types.INT64])  # fmt: skip
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)  # fmt: skip
        return images, labels

    return face_pipeline


def face_pipeline(reader: Reader, plan: ShardPlan, *, num_threads: int = 2, device_id: int | None = None,
                  image_size: int = 112, flip: bool = False, shuffle: bool = False, seed: int = 0,
                  shuffle_buffer: int = 4096, prefetch: int = 2):  # fmt: skip
    """Build (but do not run) the DALI pipeline for ``reader`` sharded by ``plan``.

    Args:
        device_id: None for DALI's CPU-only mode (decode on the CPU; no CUDA needed), else the GPU (nvJPEG decode).
    Returns:
        (pipeline, external feed or None).
    """
    _require_dali()
    if shuffle and isinstance(reader, FileReader):
        # One global permutation (same seed on every rank) before sharding: DALI's shuffle buffer only mixes
        # locally, and folders list identities in order, so unpermuted shards would be blocks of identities.
        perm = np.random.default_rng(seed).permutation(len(reader.files))
        reader = FileReader([reader.files[i] for i in perm], np.asarray(reader.labels)[perm])
    feed = _ExternalFeed(reader, plan, shuffle, seed) if isinstance(reader, ExternalReader) else None
    pipe = _pipeline_def()(
        reader, plan, shuffle, (seed * 7919 + plan.rank) % (1 << 31), shuffle_buffer,
        "cpu" if device_id is None else "mixed", image_size, flip, feed,
        batch_size=plan.batch_size, num_threads=num_threads, device_id=device_id,
        seed=(seed * 104729 + plan.rank + 1) % (1 << 31), prefetch_queue_depth=prefetch,
    )  # fmt: skip
    pipe.build()
    if feed is None:
        meta = pipe.reader_meta(READER_NAME)
        if meta["epoch_size"] != plan.num_samples:
            raise RuntimeError(f"DALI reader sees {meta['epoch_size']} samples, the plan {plan.num_samples}")
    return pipe, feed


# ---------------------------------------------------------------------------------------- the loader
class DALILoader:
    """A DALI pipeline with DataLoader semantics.

    * ``len(loader)`` = batches per epoch, the same on every rank (:class:`ShardPlan`);
    * iterating yields ``(images, labels)``: (B, 3, S, S) float32 in [-1, 1] RGB (on the GPU when ``device_id`` is
      set, else CPU) and (B,) int64; ``partial`` trims the last batch to its real samples;
    * every ``iter()`` is one epoch; an epoch abandoned part-way (``break``) is drained by :meth:`reset` (called by
      the next ``iter()``), so the next epoch starts at its true beginning.
    """

    backend = "dali"

    def __init__(self, reader: Reader, *, batch_size: int, world_size: int = 1, rank: int = 0,
                 last_batch: LastBatch = "drop", num_threads: int = 2, device_id: int | None = None,
                 image_size: int = 112, flip: bool = False, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 4096, prefetch: int = 2) -> None:  # fmt: skip
        self.plan = ShardPlan(len(reader.labels), batch_size, world_size, rank, last_batch)
        self.reader = reader
        self.device_id = device_id
        self.pipe, self._feed = face_pipeline(
            reader, self.plan, num_threads=num_threads, device_id=device_id, image_size=image_size, flip=flip,
            shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer, prefetch=prefetch,
        )  # fmt: skip
        self.epoch = 0  # epochs started so far
        self._consumed = 0  # batches consumed from the current reader epoch

    @property
    def substituted(self) -> list[tuple[int, str]]:
        """(sample index, reason) of samples an external source replaced (empty for native readers)."""
        return self._feed.substituted if self._feed is not None else []

    def __len__(self) -> int:
        return self.plan.steps

    def _run(self):
        import torch

        images, labels = self.pipe.run()
        self._consumed += 1
        if self.device_id is None:
            x = torch.from_numpy(images.as_array())
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = images.as_tensor()
            x = torch.empty(t.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
            feed_ndarray(t, x, cuda_stream=torch.cuda.current_stream(x.device))
        y = torch.from_numpy(np.asarray(labels.as_array()).reshape(len(labels), -1)[:, 0].astype(np.int64))
        return x, y.to(x.device)

    def reset(self) -> None:
        """Finish the current reader epoch if one was started (drains its remaining batches)."""
        if self._consumed:
            while self._consumed < self.plan.reader_batches:
                self.pipe.run()
                self._consumed += 1
            self._consumed = 0

    def __iter__(self) -> Iterator:
        self.reset()
        epoch = self.epoch
        self.epoch += 1
        for step in range(self.plan.steps):
            x, y = self._run()
            k = self.plan.size(epoch, step)
            yield (x[:k], y[:k]) if k < self.plan.batch_size else (x, y)
        self.reset()
