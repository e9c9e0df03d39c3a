"""Connection admission, written once for both HTTP stacks (the stdlib ``_HTTPServer`` and the ASGI
``ConnectionGuard``): per-peer caps, connection slots, and which connection a newcomer may evict.

At most ``max_connections`` connections hold a slot. When all are taken, a new connection evicts the stalest one
that has not authenticated and is not being answered (one stalled mid-request, or silent for ``EVICT_IDLE_AFTER``),
and is refused (503) only if there is none: clients that never finish a request (slowloris), which never
authenticate, cannot keep out new clients (``/health`` included) nor take slots from authenticated ones.
``max_connections_per_peer`` optionally caps one client address. Each stack keeps its own connection records (any
object with ``peer``, ``since``, ``deadline``, ``authed`` and ``evicted``) and evicts its victim its own way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ppfr.deploy.server.config import ServeConfig, log

# When every slot is taken, a new connection evicts the stalest one that has not authenticated and is not being
# answered. One that has sent nothing of its request yet is spared for this many seconds: a client that has just
# connected is about to send; a slowloris client has started its request and never finishes it.
EVICT_IDLE_AFTER = 1.0

C = TypeVar("C")


def victim(conns: Iterable[C], busy: Callable[[C], bool], now: float) -> C | None:
    """The stalest evictable connection: not evicted, not authenticated, not being answered (``busy``), and
    mid-request (a ``deadline`` is set) or idle for at least EVICT_IDLE_AFTER; None if there is none."""
    best: Any = None
    for c in conns:
        if c.evicted or c.authed or busy(c):  # type: ignore[attr-defined]
            continue
        if c.deadline is None and now - c.since < EVICT_IDLE_AFTER:  # type: ignore[attr-defined]
            continue  # just connected: about to send
        if best is None or c.since < best.since:  # type: ignore[attr-defined]
            best = c
    return best


def admit(conns: Iterable[C], peer: str, config: ServeConfig, busy: Callable[[C], bool]) -> tuple[str | None, C | None]:
    """Whether a new connection from ``peer`` gets a slot among ``conns``: (refusal message, None) if it must be
    turned away, else (None, the connection to evict to make room, or None when a slot is free)."""
    live = [c for c in conns if not c.evicted]  # type: ignore[attr-defined]  (an evicted one is leaving)
    cap = config.max_connections_per_peer
    if cap is not None and sum(c.peer == peer for c in live) >= cap:  # type: ignore[attr-defined]
        return f"too many connections from {peer} (at most {cap}); retry later", None
    if len(live) < config.max_connections:
        return None, None
    out = victim(live, busy, time.monotonic())
    if out is None:
        return "too many connections; retry later", None
    log.info("all %d connection slots taken: evicting a stalled unauthenticated connection from %s",
             config.max_connections, out.peer)  # type: ignore[attr-defined]  # fmt: skip
    return None, out


def error_response(status: str, message: str, *, retry: bool = False) -> bytes:
    """A whole HTTP/1.1 answer with a JSON error body that closes the connection, written by a stack itself
    (outside its request handling): a refused connection (503, ``Retry-After``) or refused framing (400)."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n".encode() + (b"Retry-After: 1\r\n" if retry
            else b"") + b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
