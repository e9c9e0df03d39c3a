"""The faces an attack works on, and their protection.

* :class:`FaceSet`, :func:`load_faces`, :func:`open_val` -- decoded faces in memory: the attacker's public training
  faces and the held-out faces it is scored on (a pair list becomes a balanced :class:`PairSubset`).
* :func:`identity_overlap`, :func:`identity_index` -- identities shared by two sets; the identity of every face.
* :func:`protect_with` -- a batch protected with fresh per-image secrets or one fixed key, from a reproducible
  generator per (seed, stream, step).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ppfr.data.sources import FolderSource, PairSource, Source, open_source
from ppfr.eval.attacks.common import IMAGE_SIZE, AttackConfig, AttackError
from ppfr.methods.base import Method, Payload


@dataclass
class FaceSet:
    """Decoded faces kept in memory: images (N, 3, S, S) uint8 (exactly the loader's pixels: 4x smaller than
    float), labels (N,) int64 (identity for folders, file index for pair lists), and the source they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: Source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), 3, S, S) float32 in [-1, 1] (the loader's normalisation)."""
        return self.images[idx].float() / 127.5 - 1.0


class PairSubset(PairSource):
    """A pair list restricted to ``max_pairs`` pairs balanced over folds and genuine/impostor, and to the images
    those pairs use (``files``/``labels`` re-indexed; ``pairs`` rows (fold, same, a, b) point into them)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, max_pairs: int | None = None) -> None:
        super().__init__(path, image_root)
        if max_pairs is None or max_pairs >= len(self.pairs):
            return
        folds = np.unique(self.pairs[:, 0])
        if max_pairs < 2 * len(folds):
            raise AttackError(f"max_pairs={max_pairs}: 10-fold verification needs at least one genuine and one "
                              f"impostor pair per fold ({2 * len(folds)} for {len(folds)} folds)")  # fmt: skip
        per_fold = max_pairs // len(folds)
        keep = []
        for f in folds:
            for same, k in ((1, (per_fold + 1) // 2), (0, per_fold // 2)):
                rows = np.flatnonzero((self.pairs[:, 0] == f) & (self.pairs[:, 1] == same))
                keep.extend(rows[:k].tolist())
        sub = self.pairs[np.sort(np.asarray(keep))]
        used = np.unique(sub[:, 2:])
        remap = np.full(len(self.files), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        self.files = [self.files[i] for i in used]
        self.labels = np.arange(len(used), dtype=np.int64)
        sub = sub.copy()
        sub[:, 2], sub[:, 3] = remap[sub[:, 2]], remap[sub[:, 3]]
        self.pairs = sub


def open_val(spec: str, max_pairs: int | None = None) -> Source:
    """The held-out set: a pair list (-> :class:`PairSubset`, enables re-identification) or any other source."""
    from ppfr.data import DataFormatError

    try:
        src = open_source(spec)
    except DataFormatError as exc:
        raise AttackError(f"--val: {exc}") from None
    if isinstance(src, PairSource):
        return PairSubset(spec, None, max_pairs)
    return src


def load_faces(source: Source | str, *, max_images: int | None = None, seed: int = 0, batch_size: int = 64,
               size: int = IMAGE_SIZE) -> FaceSet:  # fmt: skip
    """Decode (a random subset of at most ``max_images`` of) a source into memory through ``make_loader``.

    Pair lists are read whole and in order (their labels are file indices, which the pair rows refer to).
    """
    from ppfr.data import DataFormatError
    from ppfr.data.config import DataConfig
    from ppfr.data.loader import make_loader

    if isinstance(source, str):
        try:
            source = open_source(source)
        except DataFormatError as exc:
            raise AttackError(str(exc)) from None
    subset = max_images is not None and max_images < len(source) and not isinstance(source, PairSource)
    cfg = DataConfig(source=str(source.path), backend="torch", batch_size=batch_size, train=False, shuffle=subset,
                     flip=False, last_batch="partial", world_size=1, rank=0, num_workers=0, seed=seed,
                     image_size=size)  # fmt: skip
    images, labels, n = [], [], 0
    for x, y in make_loader(cfg, source=source):
        # the loader's x = (v - 127.5) / 127.5 for uint8 v: this inverts it exactly
        images.append(((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels.append(y)
        n += x.shape[0]
        if subset and n >= max_images:
            break
    if not images:
        raise AttackError(f"no images could be read from {source.path}")
    imgs, labs = torch.cat(images), torch.cat(labels)
    if subset:
        imgs, labs = imgs[:max_images], labs[:max_images]
    return FaceSet(imgs, labs, source)


def _identity_names(src: Source) -> set[str] | None:
    if isinstance(src, FolderSource):
        return set(src.identities)
    if isinstance(src, PairSource):
        return {p.parent.name for p in src.files}
    return None


def identity_overlap(train: Source, val: Source) -> int | None:
    """Identity folders present in both sets (None when a source has no identity names, e.g. a .rec file)."""
    a, b = _identity_names(train), _identity_names(val)
    return None if a is None or b is None else len(a & b)


def identity_index(faces: FaceSet) -> torch.Tensor:
    """(N,) int64 identity of every face: the folder label, or for a pair list the image's parent folder."""
    src = faces.source
    if isinstance(src, PairSource):
        names = [p.parent.name for p in src.files]
        table = {n: i for i, n in enumerate(sorted(set(names)))}
        per_file = torch.tensor([table[n] for n in names], dtype=torch.int64)
        return per_file[faces.labels]
    return faces.labels.clone()


# ----------------------------------------------------------------------------------------------- protection
def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A fresh, reproducible generator per (seed, stream, step): each protection draws new secrets."""
    return torch.Generator().manual_seed((seed * 4 + stream) * 1_000_003 + step)


TRAIN_STREAM, NORM_STREAM, EVAL_STREAM = 0, 1, 2


FIXED_KEY_SEED = 20_260_101


@torch.no_grad()
def protect_with(method: Method, images: torch.Tensor, cfg: AttackConfig, stream: int, step: int) -> Payload:
    """Protect a batch as ``cfg.secrets`` says: ``fresh`` draws new per-image secrets from a generator per
    (seed, stream, step); ``fixed`` gives every face the same key (each face protected alone with the same seed,
    so it gets the first draw of one generator: the same rank / permutation / layout for all)."""
    if cfg.secrets == "fresh":
        return method.protect(images, generator=_generator(cfg.seed, stream, step))
    parts = [method.protect(images[i : i + 1], generator=torch.Generator().manual_seed(FIXED_KEY_SEED))
             for i in range(images.shape[0])]  # fmt: skip
    return Payload(parts[0].method, {k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


Draw = tuple[torch.Tensor, torch.Tensor]  # (indices (B,) into the FaceSet, flipped (B,) bool) of one batch

