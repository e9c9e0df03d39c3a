"""``ppfr serve`` on FastAPI + uvicorn: the same endpoints as the stdlib stack (``ppfr.deploy.server.stdlib``) over
the same ``RecognitionService`` (auth, payload checks, raw-image refusal, bounded queue, batching worker, request isolation),
with OpenAPI at ``/docs``, several worker processes (``--workers N``) and uvicorn's graceful shutdown.

What this module adds to uvicorn (whose h11 protocol has ``timeout_keep_alive`` and ``limit_concurrency`` but no
deadline for a request to arrive, and whose concurrency limit a slowloris client fills):

* ``GuardedH11Protocol``, uvicorn's h11 protocol with a per-process ``ConnectionGuard``:

  - a whole-request deadline: the request's head and body must arrive within ``read_timeout`` of its first byte,
    however its bytes trickle (the timer is armed on the first byte and never pushed back), else the connection
    is closed; a connection that sends nothing is closed after ``idle_timeout`` (uvicorn's keep-alive timer, armed
    from the connection's start as well, not only between requests);
  - slots: at most ``max_connections`` per process; when all are taken, a new connection evicts the stalest one
    that has not authenticated and is not being answered (one stalled mid-request, or silent for a second), and
    gets 503 only if there is none, so trickling clients cannot lock out ``/health`` or authenticated clients;
    ``max_connections_per_peer`` optionally caps one client address;
  - malformed framing (repeated or conflicting ``Content-Length``, a bad length, an oversized head) is answered by
    h11 before the app: 400 with a JSON error, connection closed.

* The ASGI app (``create_app``), routed from the table of ``ppfr.deploy.api`` as the stdlib stack is, serving its
  typed OpenAPI document (``/openapi.json``, rendered at ``/docs``): ``Content-Length`` required and checked against ``max_request_bytes`` *before*
  the body is read (413), chunked bodies refused (411), the streamed body capped at the declared length; the body
  is parsed and checked on a thread (it is CPU work), queued work is awaited without holding a thread. Every answer
  is JSON: an exception escaping a handler is a 500 with ``Connection: close`` (``config.internal_error``), a verb a
  route does not take a 405 with ``Allow``.

Run it with ``ppfr serve MODEL --gallery URI --workers N`` (``ppfr.deploy.server.launch``), or in-process with
``AsgiServer`` (tests). With several workers every process loads the model and opens the gallery, which must then be one that
several processes can share (``sqlite://``, a folder, or ``qdrant://``; see ``ppfr.deploy.gallery``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from ppfr.deploy import api
from ppfr.deploy.server import admission
from ppfr.deploy.server.config import RequestError, ServeConfig, internal_error
from ppfr.deploy.server.service import RecognitionService, open_server_gallery
from ppfr.deploy.server.worker import Job

log = logging.getLogger("ppfr.serve")

SPEC_ENV = "PPFR_SERVE_SPEC"  # JSON handed to worker processes: model, backend, gallery, config


# -------------------------------------------------------------------------------------------- connections
class ConnectionGuard:
    """Slot accounting of one process's connections. Touched only from the event loop's thread (protocol
    callbacks), so it needs no lock."""

    def __init__(self, config: ServeConfig, authorized: Any) -> None:
        self.config = config
        self.authorized = authorized  # header value -> bool (the service's constant-time token check)
        self.conns: set[GuardedH11Protocol] = set()
        self.evictions = 0

    def live(self) -> list[GuardedH11Protocol]:
        return [c for c in self.conns if not c.evicted]

    def admit(self, conn: GuardedH11Protocol) -> str | None:
        """Register ``conn``; a refusal message if it must be turned away (``ppfr.deploy.server.admission``)."""
        refusal, victim = admission.admit(self.conns, conn.peer, self.config, busy=lambda c: c.answering())
        if refusal is not None:
            return refusal
        if victim is not None:
            victim.evict()
            self.evictions += 1
        self.conns.add(conn)
        return None


class _RecordingConnection:
    """h11.Connection proxy that remembers why h11 refused the client's bytes (uvicorn answers a fixed text)."""

    def __init__(self, conn: h11.Connection, owner: GuardedH11Protocol) -> None:
        self._conn, self._owner = conn, owner

    def next_event(self) -> Any:
        try:
            return self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._owner.protocol_error = str(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a whole-request deadline and evictable slots (see the module docstring).

    The guard is the class attribute ``guard`` (``AsgiServer`` makes a subclass per server) or, in a worker process
    started by ``ppfr serve --workers``, the module's ``_PROCESS_GUARD`` set by the app factory."""

    guard: ConnectionGuard | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP, not on those accepted from a
            # proto-0 listener (uvicorn's and ours): with Nagle on, the body segment of every answer waits for the
            # client's delayed ACK (~40 ms per request on Linux loopback).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = _RecordingConnection(self.conn, self)  # type: ignore[assignment]
        self.protocol_error: str | None = None
        guard = self.guard or _PROCESS_GUARD
        assert guard is not None, "GuardedH11Protocol used without a ConnectionGuard"
        self._guard = guard
        cfg = guard.config
        self.peer = str(self.client[0]) if self.client else "?"
        self.since = time.monotonic()  # when it began waiting for its current request
        self.deadline: float | None = None  # the current request's whole-request deadline (set by its first byte)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.authed = False
        self.evicted = False
        self._checked_cycle: Any = None
        self._head: bytearray | None = bytearray()  # the current request head's bytes, until its blank line
        refusal = guard.admit(self)
        if refusal is not None:
            transport.write(admission.error_response("503 Service Unavailable", refusal, retry=True))
            self.evicted = True  # never counted
            transport.close()
            return
        if cfg.idle_timeout:  # a connection that never sends a byte: uvicorn arms this only after a response
            self.timeout_keep_alive = cfg.idle_timeout
            self.timeout_keep_alive_task = self.loop.call_later(cfg.idle_timeout, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._guard.conns.discard(self)
        super().connection_lost(exc)

    # -- state -----------------------------------------------------------------------------------------------
    def answering(self) -> bool:
        """The request has fully arrived and its answer is being computed: never evicted."""
        cycle = self.cycle
        return (cycle is not None and not cycle.response_complete and not cycle.more_body)

    def evict(self) -> None:
        self.evicted = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _disarm(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _expired(self) -> None:
        self._deadline_timer = None
        if self.transport.is_closing() or not self._receiving():
            return
        log.info("%s: request not received within %g s; closing", self.peer, self._guard.config.read_timeout)
        self.evict()

    def _receiving(self) -> bool:
        """The client is mid-request: bytes of a head or body are still due."""
        return self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and self.deadline is not None

    # -- data --------------------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.evicted:
            return
        if self.deadline is None and data:
            # first byte of a request: its head and body must all arrive within read_timeout from now
            self.deadline = time.monotonic() + self._guard.config.read_timeout
            self._deadline_timer = self.loop.call_later(self._guard.config.read_timeout, self._expired)
        if self._head is not None and self.conn.their_state is h11.IDLE and self._head_is_ambiguous(data):
            self.send_400_response("repeated Content-Length")
            return
        super().data_received(data)
        self._after_events()

    def _head_is_ambiguous(self, data: bytes) -> bool:
        """Collect the request head; True once it is complete and declares its length more than once. h11 refuses
        conflicting lengths but merges repeated equal ones (``Content-Length: 2`` twice, or ``2, 2``): a proxy in
        front may frame such a request differently (request smuggling), so it is refused as the stdlib server
        does. Only heads read while the connection is between requests are scanned: a pipelined head that arrives
        in the same read as the previous request's end is left to h11, which still refuses conflicting values."""
        assert self._head is not None
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > 64 * 1024:  # h11 refuses an oversized head itself
                self._head = None
            return False
        lines = bytes(self._head[:end]).split(b"\r\n")[1:]
        self._head = None
        values = [v for k, _, v in (ln.partition(b":") for ln in lines) if k.strip().lower() == b"content-length"]
        return len(values) > 1 or any(b"," in v for v in values)

    def handle_events(self) -> None:
        super().handle_events()
        self._after_events()

    def _after_events(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._checked_cycle:
            self._checked_cycle = cycle
            if not self.authed:
                auth = next((v for k, v in self.headers if k == b"authorization"), None)
                if auth is not None and self._guard.authorized(auth.decode("latin-1")):
                    self.authed = True  # from now on this connection is never evicted
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the request is complete (DONE / MUST_CLOSE) or the connection is over

    def on_response_complete(self) -> None:
        # the connection now waits for its next request: a new deadline starts with that request's first byte
        self._disarm()
        self.deadline, self.since = None, time.monotonic()
        self._head = bytearray()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        # h11 refused the bytes (repeated / conflicting / bad Content-Length, oversized head, bad syntax): say why,
        # as the other errors do (JSON), and close (the framing of anything after it is unknown).
        why = self.protocol_error or msg
        if "content-length" in why.lower() and ("repeated" in why or "conflicting" in why):
            why = "repeated Content-Length headers: send exactly one"
        elif "content-length" in why.lower():
            why = f"bad Content-Length ({why})"
        self.transport.write(admission.error_response("400 Bad Request", why))
        self.transport.close()


_PROCESS_GUARD: ConnectionGuard | None = None


# ---------------------------------------------------------------------------------------------------- app
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store",
                                                                         **(headers or {})})  # fmt: skip


def create_app(service: RecognitionService, *, own_service: bool = True) -> Any:
    """The FastAPI app over ``service``. own_service: start its worker on startup, and on shutdown drain it and
    close the gallery (False when the caller manages the service)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    @asynccontextmanager
    async def lifespan(app: Any):
        if own_service:
            service.start()
        try:
            yield
        finally:
            service.draining = True
            if own_service:
                await run_in_threadpool(service.worker.stop, 30.0)
                service.gallery.close()

    # FastAPI's own /openapi.json is off: the document is ppfr.deploy.api's, served by the route table below
    # (the stdlib stack serves the same one); /docs renders it.
    app = FastAPI(title="ppfr recognition server", version="1", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="enrol / verify / identify protected payloads (never images)")
    app.state.service = service
    app.openapi = api.openapi  # type: ignore[method-assign]  (app.openapi() is what the tests and /docs read)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:  # 404 / 405 of the router
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            msg = f"no endpoint {request.url.path}; see GET /v1/info"
        elif exc.status_code == 405 and "allow" in {k.lower() for k in headers}:
            allow = next(v for k, v in headers.items() if k.lower() == "allow")
            msg = f"{request.url.path} takes {allow}, not {request.method}"
        else:
            msg = str(exc.detail)
        return _error(exc.status_code, msg, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error(400, str(exc)[:300])

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> Any:  # anything that escaped a handler: a bug
        err = internal_error(exc, request.url.path)
        return _error(err.status, err.message, err.headers)

    def _auth(request: Request) -> None:
        if not service.authorized(request.headers.get("authorization")):
            raise RequestError(401, "missing or wrong access token (Authorization: Bearer TOKEN)",
                               {"WWW-Authenticate": 'Bearer realm="ppfr"'})  # fmt: skip

    async def _answer(request: Request, path: str, needs_body: bool) -> Any:
        try:
            if service.ROUTES[path].auth:
                _auth(request)
            if needs_body:
                data = await _read_body(request, service)
                ctype = request.headers.get("content-type")

                def check() -> dict | Job:  # CPU work (JSON / base64 / array checks): off the event loop
                    return service.prepare(path, service.parse_body(data, ctype))

                out = await run_in_threadpool(check)
            else:
                out = service.prepare(path, None)
            if isinstance(out, Job):
                out = await service.worker.submit_async(out)
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.headers)
        except Exception as exc:  # the same answer as the app-wide handler, without uvicorn's second traceback
            err = internal_error(exc, path)
            return _error(err.status, err.message, err.headers)
        return JSONResponse(out, headers={"Cache-Control": "no-store"})

    # one route per endpoint of the shared table, all answered by _answer (the service's prepare); the POSTs read a
    # body. Their schemas are in the table's OpenAPI document, not in these functions' signatures.
    for e in api.ENDPOINTS:
        app.add_api_route(e.path, _endpoint(_answer, e.path, e.verb == "POST"), methods=[e.verb], name=e.name,
                          summary=e.summary)  # fmt: skip

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="ppfr recognition server")

    return app


async def _read_body(request: Request, service: RecognitionService) -> bytes:
    """The body, after its framing and size were checked from the headers alone (nothing read before)."""
    from starlette.requests import ClientDisconnect

    if request.headers.get("transfer-encoding"):
        raise RequestError(411, "send the body with a Content-Length (chunked transfer is not accepted)")
    lengths = request.headers.getlist("content-length")
    if len(lengths) > 1:  # h11 refuses these already; another ASGI server might not
        raise RequestError(400, "repeated Content-Length headers: send exactly one")
    if not lengths:
        raise RequestError(411, "Content-Length required")
    text = lengths[0].strip()
    if not (text.isascii() and text.isdigit()):
        raise RequestError(400, f"bad Content-Length {lengths[0]!r}")
    n, limit = int(text), service.config.max_request_bytes
    assert limit is not None
    if n > limit:
        raise RequestError(413, f"request of {n} bytes exceeds the limit of {limit} bytes "
                                f"({service.sample_wire_bytes} bytes per payload sample)")  # fmt: skip
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > n:  # never more than declared, whatever the server below does
                raise RequestError(400, f"request body longer than its Content-Length {n}")
    except ClientDisconnect:  # went away, or was evicted / cut by the deadline: nobody reads the answer
        raise RequestError(408, "the request body did not arrive") from None
    if len(buf) != n:
        raise RequestError(400, f"request body ended after {len(buf)} of {n} bytes")
    return bytes(buf)


def _endpoint(answer: Any, path: str, has_body: bool) -> Any:
    """The route function for ``path``: FastAPI reads its signature, so it takes the Request and nothing else."""

    async def endpoint(request: Request) -> Any:
        return await answer(request, path, has_body)

    return endpoint


# -------------------------------------------------------------------------------------------- processes
def uvicorn_config(app: Any, config: ServeConfig, protocol: Any, workers: int = 1, log_level: str = "warning",
                   factory: bool = False) -> Any:  # fmt: skip
    return uvicorn.Config(
        app, http=protocol, ws="none", lifespan="on", workers=workers, factory=factory, log_level=log_level.lower(),
        access_log=False, server_header=False, date_header=True, proxy_headers=False,
        timeout_keep_alive=int(max(1, config.idle_timeout or 3600)),  # replaced per connection by idle_timeout
        limit_concurrency=None,  # the guard's evictable slots instead: uvicorn's limit is filled by slowloris
        timeout_graceful_shutdown=int(config.request_timeout) + 5, backlog=2048,
        h11_max_incomplete_event_size=64 * 1024,  # the request head (the token is the largest header)
        timeout_worker_healthcheck=30,  # a worker importing torch and loading its model on a busy host is slow
    )  # fmt: skip


def app_from_env() -> Any:
    """The uvicorn factory of a worker process (``ppfr serve --workers N``): builds the runner, the gallery and
    the service from ``$PPFR_SERVE_SPEC`` (JSON) and the token from ``$PPFR_TOKEN``."""
    global _PROCESS_GUARD
    from ppfr.deploy.runtime import load_runner

    spec = json.loads(os.environ[SPEC_ENV])
    token = os.environ.get("PPFR_TOKEN", "")
    config = ServeConfig(**spec["config"])
    runner = load_runner(spec["model"], backend=spec["backend"])
    gallery = open_server_gallery(spec["gallery"], runner, spec.get("gallery_index", "flat"))
    service = RecognitionService(runner, gallery, token, config)
    _PROCESS_GUARD = ConnectionGuard(service.config, service.authorized)
    log.info("worker %d ready: %s on %s", os.getpid(), runner.method, runner.backend)
    return create_app(service)


class UvicornServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM / SIGINT it shut down gracefully for ends the process with status 0
    (uvicorn re-raises the signal once stopped, so the process would die of it: status -15)."""

    @contextmanager
    def capture_signals(self) -> Any:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


class AsgiServer:
    """The ASGI stack in-process, in a background thread: the interface of ``stdlib.RecognitionServer``
    (``start``, ``close``, ``url``, ``address``, ``service``, context manager)."""

    def __init__(self, runner: Any, gallery: Any, token: str, host: str = "127.0.0.1", port: int = 0,
                 config: ServeConfig | None = None) -> None:  # fmt: skip
        if isinstance(gallery, (str, Path)):
            gallery = open_server_gallery(gallery, runner)
        try:
            self.service = RecognitionService(runner, gallery, token, config)
            self.guard = ConnectionGuard(self.service.config, self.service.authorized)
            protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self.guard})
            self._uv_config = uvicorn_config(create_app(self.service), self.service.config, protocol)
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(2048)
        except BaseException:
            gallery.close()
            raise
        self._server = UvicornServer(self._uv_config)
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def connection_count(self) -> int:
        return len(self.guard.live())

    def start(self) -> AsgiServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="ppfr-serve-asgi", daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ASGI server did not start")
            time.sleep(0.01)
        return self

    def close(self, timeout: float = 30.0) -> None:
        """uvicorn's graceful shutdown: stop accepting, close idle connections, finish in-flight requests, then
        the lifespan shutdown drains the worker and closes the gallery."""
        if self._closed:
            return
        self._closed = True
        self.service.draining = True
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        else:  # never started: nothing but the socket and the gallery to release
            self.service.gallery.close()
        self._sock.close()

    def __enter__(self) -> AsgiServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
