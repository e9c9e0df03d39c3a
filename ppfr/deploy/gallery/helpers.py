"""What every gallery store checks the same way: identity names, embeddings (the one L2 rule of
``ppfr.deploy.protocol``: finite rows of non-zero norm, refused otherwise) and probes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ppfr.deploy.protocol import l2_normalize

MAX_NAME_LEN = 256


def check_name(name: Any) -> str:
    """An identity name: a non-empty string of at most 256 printable characters (no control characters)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
        raise ValueError(f"an identity name must be a non-empty string of at most {MAX_NAME_LEN} characters")
    if not name.isprintable():
        raise ValueError("an identity name must not contain control characters")
    return name


def normalize(x: np.ndarray) -> np.ndarray:
    """(N, D) embeddings -> float32 unit rows; ValueError (``DegenerateEmbeddingError``) for a row that is not finite
    or of (near) zero norm (``ppfr.deploy.protocol.l2_normalize``, strict)."""
    return l2_normalize(x)


def check_probes(probes: np.ndarray, embedding_size: int, top_k: int | None = None) -> np.ndarray:
    """(M, D) probes L2-normalised to float32, refused unless D == ``embedding_size`` (and ``top_k`` >= 1 if given):
    the argument checks every gallery backend's ``scores`` / ``search`` share."""
    probes = normalize(probes)
    if probes.shape[1] != embedding_size:
        raise ValueError(f"expected {embedding_size}-d probes, got {probes.shape[1]}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return probes
