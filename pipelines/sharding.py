"""Sharding and epoch semantics shared by every loader backend (pure Python; no DALI, no torch).

One definition, so the DALI and PyTorch paths cut the same epochs:

* **Shards.** The N samples (in the epoch's order) are cut into ``world_size`` contiguous shards,
  ``shard s = [N s // W, N (s + 1) // W)`` (sizes differ by at most one) -- DALI's readers do exactly this.
* **Rotation.** In epoch ``e`` rank ``r`` reads shard ``(r + e) % W`` (DALI's readers with
  ``stick_to_shard=False``), so over W epochs every rank sees all the data even without shuffling.
* **Reader epoch.** A reader with ``pad_last_batch`` produces ``reader_batches = ceil(max shard / B)`` batches per
  epoch on *every* shard, padding a shard's tail by repeating its last sample (DALI pads whole batches of repeats
  when shards differ; verified on DALI 2.4). Every policy below is cut from this stream, so the next epoch always
  starts at a reader-epoch boundary.
* **Last-batch policy** (identical on every rank, hence PartialFC's ``all_gather`` never sees unequal tensors):

  ============  =======================  =====================================================================
  policy        batches per epoch         what the tail looks like
  ============  =======================  =====================================================================
  ``drop``      ``floor(min shard / B)``  only full batches of real samples; the rest of the epoch is dropped
  ``pad``       ``ceil(max shard / B)``   full batches; the tail repeats the shard's last sample
  ``partial``   ``ceil(max shard / B)``   the last batch holds only the real samples (needs equal shards: one
                                          rank, or N divisible by the world size)
  ============  =======================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

LastBatch = Literal["drop", "pad", "partial"]
LAST_BATCH_POLICIES = ("drop", "pad", "partial")


def shard_bounds(n: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard_id`` of ``n`` samples (DALI's formula)."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


@dataclass(frozen=True)
class ShardPlan:
    """The epoch structure for one rank. All sizes are per rank and identical on every rank.

    Raises (at construction):
        ValueError: empty data, a rank outside [0, world_size), an unknown policy, ``drop`` leaving no batch, or
            ``partial`` with unequal shards. Messages name the offending setting.
    """

    num_samples: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    last_batch: LastBatch = "drop"

    def __post_init__(self) -> None:
        n, b, w = self.num_samples, self.batch_size, self.world_size
        if n < 1:
            raise ValueError("no samples to load")
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {b}")
        if w < 1 or not 0 <= self.rank < w:
            raise ValueError(f"rank must lie in [0, world_size={w}), got rank={self.rank}")
        if self.last_batch not in LAST_BATCH_POLICIES:
            raise ValueError(f"last_batch must be one of {LAST_BATCH_POLICIES}, got {self.last_batch!r}")
        if n < w:
            raise ValueError(f"{n} samples cannot be sharded over world_size={w} ranks")
        if self.last_batch == "drop" and self.min_shard < b:
            raise ValueError(
                f"last_batch='drop' with batch_size={b} leaves no batch: the smallest shard has {self.min_shard} "
                f"samples ({n} over {w} ranks); lower batch_size or use last_batch='pad'"
            )
        if self.last_batch == "partial" and self.min_shard != self.max_shard:
            raise ValueError(
                f"last_batch='partial' would give ranks last batches of different sizes ({n} samples do not divide "
                f"over world_size={w}); use 'pad' or 'drop'"
            )

    @property
    def min_shard(self) -> int:
        return self.num_samples // self.world_size

    @property
    def max_shard(self) -> int:
        return -(-self.num_samples // self.world_size)

    @property
    def reader_batches(self) -> int:
        """Batches a padding reader produces per epoch on every shard: ceil(max shard / B)."""
        return -(-self.max_shard // self.batch_size)

    @property
    def steps(self) -> int:
        """Batches yielded per epoch (the loader's ``len``)."""
        if self.last_batch == "drop":
            return self.min_shard // self.batch_size
        return self.reader_batches

    def shard(self, epoch: int) -> int:
        """The shard this rank reads in ``epoch`` (rotation)."""
        return (self.rank + epoch) % self.world_size

    def shard_size(self, epoch: int) -> int:
        lo, hi = shard_bounds(self.num_samples, self.world_size, self.shard(epoch))
        return hi - lo

    def real(self, epoch: int, step: int) -> int:
        """Real (non-padding) samples in batch ``step`` of ``epoch`` on this rank."""
        return int(np.clip(self.shard_size(epoch) - step * self.batch_size, 0, self.batch_size))

    def size(self, epoch: int, step: int) -> int:
        """How many samples batch ``step`` holds: ``real`` for ``partial``, else the full batch size."""
        return self.real(epoch, step) if self.last_batch == "partial" else self.batch_size

    def positions(self, epoch: int, step: int, full: bool = False) -> np.ndarray:
        """Positions (into the epoch's order of all N samples) of batch ``step``; (size,) int64.

        Padding repeats the shard's last sample. ``full=True`` gives the padded reader batch of ``batch_size``
        whatever the policy (what a padding reader produces before ``partial`` trims it).
        """
        lo, hi = shard_bounds(self.num_samples, self.world_size, self.shard(epoch))
        pos = lo + step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        pos = np.minimum(pos, hi - 1)
        return pos if full else pos[: self.size(epoch, step)]

    def order(self, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
        """The epoch's order of all N samples: identity, or one permutation shared by every rank (seed + epoch)."""
        if not shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([seed, epoch]).permutation(self.num_samples).astype(np.int64)
