"""What every room of the server shares: its limits and policy (``ServeConfig``, the ``ppfr serve`` flags) and the
one error answer (``RequestError``; ``internal_error`` for a bug).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("ppfr.serve")

DEFAULT_THRESHOLD = 0.3


@dataclass
class ServeConfig:
    """Server limits and policy (the ``ppfr serve`` flags)."""

    max_batch: int = 32  # samples per runner.run call
    max_delay_ms: float = 5.0  # how long the oldest queued request may wait for a batch to fill
    queue_size: int = 256  # queued requests beyond which the server answers 503
    max_request_bytes: int | None = None  # None: 16 payload samples (base64) + 64 KiB, from the input spec
    threshold: float = DEFAULT_THRESHOLD  # cosine similarity at or above which verify/identify report a match
    max_connections: int = 128  # concurrent connections; each may hold one request body in memory
    # Connections from one client address; None = no cap. Leave it off behind a proxy (every connection then comes
    # from the proxy's address); set it when clients connect directly, so one host cannot hold most slots.
    max_connections_per_peer: int | None = None
    request_timeout: float = 60.0  # how long a request may wait for the worker before 503
    idle_timeout: float = 15.0  # keep-alive connections waiting longer for their next request are closed
    # A request's head and body must arrive within this many seconds of its first byte, however the bytes trickle
    # (a per-read timeout alone is reset by every byte: a slowloris client sending one a second never times out).
    # It also bounds writing the answer.
    read_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_connections_per_peer is not None and self.max_connections_per_peer < 1:
            raise ValueError(f"max_connections_per_peer must be >= 1 or None, got {self.max_connections_per_peer}")
        for name in ("max_delay_ms", "idle_timeout"):  # idle_timeout 0 = never time out
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")


class RequestError(Exception):
    """An HTTP error answer: status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def internal_error(exc: BaseException, where: str) -> RequestError:
    """The answer, on both stacks, to an exception that escaped a request handler (a bug): logged with its traceback
    here, answered as JSON 500 naming only the exception's type (no message, traceback or path reaches the client),
    and ``Connection: close``, since what the handler left half-done (an unread body) makes the connection's state
    unknown: the client opens a fresh one instead of having its next request reset."""
    log.error("unhandled error on %s", where, exc_info=exc)
    return RequestError(500, f"internal error: {type(exc).__name__}", {"Connection": "close"})


