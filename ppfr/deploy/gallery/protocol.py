"""The gallery interface: what the server needs of a store of enrolled identities (``GalleryLike``), the ranked
result of a search (``Match``) and the one error every store raises (``GalleryError``). Imports nothing of ppfr: the
stores (``sqlite``, ``qdrant``), the npz importer and the server import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class GalleryError(RuntimeError):
    """A gallery file that cannot be used (corrupt, another format, another model), or a bad gallery operation."""


@dataclass(frozen=True)
class Match:
    """One ranked identity of a search: its name and best cosine similarity to the probe."""

    name: str
    score: float


@runtime_checkable
class GalleryLike(Protocol):
    """What the server needs of a gallery; ``SqliteGallery`` and ``QdrantGallery`` provide it.

    Embeddings are (N, D) float arrays (stored float32, L2-normalised; zero or non-finite rows refused); scores
    are cosines in [-1, 1]; an identity's score is its best cosine over its embeddings.
    """

    method: str
    embedding_size: int

    def enrol(self, name: str, embeddings: np.ndarray) -> int: ...
    def enrol_many(self, items: list[tuple[str, np.ndarray]]) -> list[int]: ...
    def remove(self, name: str) -> int: ...
    def identities(self) -> dict[str, int]: ...
    def embeddings(self, name: str) -> np.ndarray: ...
    def verify(self, name: str, probes: np.ndarray) -> np.ndarray: ...
    def search(self, probes: np.ndarray, top_k: int = 5) -> list[list[Match]]: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: object) -> bool: ...
    @property
    def num_embeddings(self) -> int: ...
