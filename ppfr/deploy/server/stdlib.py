"""The dependency-free HTTP stack of ``ppfr serve --http stdlib``: ``RecognitionServer``, a
``ThreadingHTTPServer`` (one process) around a ``RecognitionService``.

Request path: exactly one Content-Length (400 otherwise) -> token check (``Authorization: Bearer``, constant-time;
401) -> size limit from Content-Length before reading the body (413) -> the service (body parsing, payload checks,
the worker). Each request must arrive whole (head and body) within ``read_timeout`` of its first byte, however its
bytes trickle, and a keep-alive connection waits at most ``idle_timeout`` for its next request. Slots and eviction
follow ``ppfr.deploy.server.admission`` (the ASGI stack's policy too).

Shutdown (``close()``): stop accepting, let in-flight requests finish (the worker drains the queue), close idle
keep-alive connections, then release the port.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ppfr.deploy.gallery import GalleryLike
from ppfr.deploy.server import admission
from ppfr.deploy.server.config import RequestError, ServeConfig, internal_error, log
from ppfr.deploy.server.service import RecognitionService, open_server_gallery


@dataclass(eq=False)
class _Conn:
    """What the server knows of one connection: its deadlines and whether it may be evicted. ``busy`` and
    ``evicted`` change under the server's lock (the accept thread evicts while the handler thread works)."""

    peer: str
    since: float = field(default_factory=time.monotonic)  # when it began waiting for its current request
    deadline: float | None = None  # the current request's whole-request deadline, set by its first byte
    busy: bool = False  # its request is being answered: never evicted
    authed: bool = False  # it has sent a request with the right token: never evicted
    evicted: bool = False
    sock: socket.socket | None = None  # the connection itself (the one to shut down when it is evicted)


class _RequestReader(io.RawIOBase):
    """The socket as the handler reads it, with deadlines that trickled bytes cannot push back: a connection waits
    at most ``idle_timeout`` for its next request to start, then at most ``read_timeout`` from the request's first
    byte for all of its head and body (each recv gets only the time left, not a fresh timeout). Expiry, or an
    eviction, raises TimeoutError, on which the handler closes the connection (408 while reading a body)."""

    def __init__(self, sock: socket.socket, state: _Conn, config: ServeConfig) -> None:
        super().__init__()
        self.sock, self.state, self.config = sock, state, config

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        st = self.state
        if st.evicted:
            raise TimeoutError("connection evicted to make room for another")
        if st.deadline is None:  # between requests
            left = st.since + self.config.idle_timeout - time.monotonic() if self.config.idle_timeout else None
        else:
            left = st.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("idle timeout" if st.deadline is None
                               else f"request not received within {self.config.read_timeout:g} s")  # fmt: skip
        self.sock.settimeout(left)
        n = self.sock.recv_into(buf)
        if st.evicted:  # the eviction's shutdown() woke this recv: not the client's end of stream
            raise TimeoutError("connection evicted to make room for another")
        if n and st.deadline is None:
            st.deadline = time.monotonic() + self.config.read_timeout
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client sending many requests reuses its connection
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's delayed ACK (40 ms
    # per request on Linux loopback).
    disable_nagle_algorithm = True
    server_version = "ppfr-serve"
    sys_version = ""
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.state = self.server.state_of(self.connection)
        plain = self.rfile
        self.rfile = io.BufferedReader(_RequestReader(self.connection, self.state, self.server.service.config),
                                       1 << 16)  # fmt: skip
        plain.close()  # the makefile() reader holds a reference that would keep the socket open after close()

    def log_message(self, format: str, *args: Any) -> None:  # never logs headers (the token)
        log.info("%s %s", self.address_string(), format % args)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler answers a verb without a do_<VERB> method with its HTML 501 page: every verb goes
        # to _dispatch instead, which answers the ones a route does not take with JSON 405 (and Allow), as the ASGI
        # stack's router does.
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What BaseHTTPRequestHandler answers itself (a malformed request line, oversized headers, a bad HTTP
        version), as JSON like every other error, and closing: the request's framing is unknown."""
        self.close_connection = True
        phrase = self.responses.get(code, ("error",))[0]
        self._send(code, {"error": f"{phrase}: {message}" if message else phrase}, {})

    def _dispatch(self, verb: str) -> None:
        if not self.server.begin(self.connection):  # evicted just as its request head arrived
            self.close_connection = True
            return
        service = self.server.service
        self._unread = self._declared_length()  # body bytes not yet read; None = unknown (no usable length)
        try:
            if len(self.headers.get_all("Content-Length") or ()) > 1:
                # Two lengths (even equal ones) make the framing ambiguous: a proxy in front may pick the other one
                # and see a different next request (request smuggling). Refuse, and close (_unread is None).
                raise RequestError(400, "repeated Content-Length headers: send exactly one")
            path = urlsplit(self.path).path
            route = service.ROUTES.get(path)
            if route is None:
                raise RequestError(404, f"no endpoint {path}; see GET /v1/info")
            # HEAD is GET without the answer's body (_send), as on the ASGI stack
            if verb not in (route.verb, "HEAD" if route.verb == "GET" else route.verb):
                allow = "GET, HEAD" if route.verb == "GET" else route.verb
                raise RequestError(405, f"{path} takes {route.verb}, not {verb[:32]}", {"Allow": allow})
            if route.auth and not service.authorized(self.headers.get("Authorization")):
                raise RequestError(401, "missing or wrong access token (Authorization: Bearer TOKEN)",
                                   {"WWW-Authenticate": 'Bearer realm="ppfr"'})  # fmt: skip
            if route.auth:
                self.state.authed = True  # from now on this connection is never evicted
            body = self._read_body() if verb == "POST" else None
            status, answer, headers = 200, service.handle(path, body), {}
        except RequestError as exc:
            status, answer, headers = exc.status, {"error": exc.message}, exc.headers
        except Exception as exc:
            err = internal_error(exc, urlsplit(self.path).path)
            status, answer, headers = err.status, {"error": err.message}, err.headers
        if headers.get("Connection") == "close":
            self.close_connection = True
        # Body bytes may still be on their way: a known count (_unread > 0) of a request refused before its body was
        # read, or an unknown one (_unread None: no usable length, or a read that timed out).
        pending = self._unread is None or self._unread > 0
        if pending and not self.state.authed:
            # An unauthenticated client's leftover body is read only while nobody needs its slot: the connection
            # becomes evictable again (a slowloris trickling the body of a refused request must not hold a slot).
            self.server.release(self.connection)
        # Leftover body bytes must not be parsed as the next request. A known body within the limit is read and
        # dropped (the connection stays usable, and a client still sending it gets this answer instead of a broken
        # pipe); a larger or unknown one is never read: answer, then close gracefully.
        linger = self._unread is None
        if self._unread:
            if self._unread <= service.config.max_request_bytes and self._discard(self._unread):
                self._unread = 0
            else:
                linger = True
        if self._unread is None or self._unread or service.draining:
            self.close_connection = True  # while draining too, so keep-alive clients leave
        self._send(status, answer, headers)
        if linger:
            self._lingering_close()
        self.server.end(self.connection)

    def _declared_length(self) -> int | None:
        if self.headers.get("Transfer-Encoding") or len(self.headers.get_all("Content-Length") or ()) > 1:
            return None
        length = self.headers.get("Content-Length", "0").strip()
        # digits only (RFC 9110): int() would also take "+5", "5_0" or "٥"
        return int(length) if length.isascii() and length.isdigit() else None

    def _discard(self, n: int) -> bool:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    return False
                n -= len(chunk)
        except OSError:
            return False
        return True

    def _lingering_close(self, seconds: float = 2.0) -> None:
        """Close after an answer to a request whose body was not read: stop sending, then drop what the client is
        still sending for a moment. Closing with unread data would reset the connection, and a reset can destroy
        the answer in the client's receive buffer before it reads it (the "lingering close" of web servers)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            end = time.monotonic() + seconds
            while time.monotonic() < end and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _read_body(self) -> Any:
        limit = self.server.service.config.max_request_bytes
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length (chunked transfer is not accepted)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length required")
        n = self._declared_length()
        if n is None:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if n > limit:
            raise RequestError(413, f"request of {n} bytes exceeds the limit of {limit} bytes "
                                    f"({self.server.service.sample_wire_bytes} bytes per payload sample)")  # fmt: skip
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            self._unread = None  # part of it may have been read: the connection cannot be reused
            raise RequestError(408, "timed out reading the request body") from None
        self._unread = 0 if len(data) == n else None
        if len(data) != n:
            raise RequestError(400, f"request body ended after {len(data)} of {n} bytes")
        return self.server.service.parse_body(data, self.headers.get("Content-Type"))

    def _send(self, status: int, answer: dict, headers: dict[str, str]) -> None:
        data = json.dumps(answer, ensure_ascii=False).encode("utf-8")
        # the read deadline's remainder may be near zero; a client that does not read its answer gets as long
        self.connection.settimeout(self.server.service.config.read_timeout)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in headers.items():
                if k.lower() != "connection":  # from close_connection below, once
                    self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":  # (command is None when the request line itself was refused)
                self.wfile.write(data)
        except OSError:  # the client went away (or stopped reading, or was evicted): nothing to answer
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that bounds concurrent connections (in all and per client address), keeps the slots from
    being exhausted by clients that never finish a request, and knows which connections are idle (for a prompt
    shutdown).

    Slots: at most ``max_connections``. When all are taken, a new connection evicts the stalest connection that has
    not authenticated and is not being answered (one stalled mid-request, or idle for more than a second); only if
    there is none does it get 503. So slowloris clients, which never authenticate, cannot keep out new clients
    (``/health`` included), nor take slots from authenticated ones, and each of them lasts at most
    ``idle_timeout`` + ``read_timeout`` anyway."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: RecognitionService) -> None:
        self.service = service
        self._conns: dict[socket.socket, _Conn] = {}
        self._conns_lock = threading.Condition()
        super().__init__(address, _Handler)

    # -- connection states (called by the handler threads) --------------------------------------------------
    def state_of(self, conn: socket.socket) -> _Conn:
        with self._conns_lock:
            return self._conns[conn]  # registered by process_request before the handler thread started

    def begin(self, conn: socket.socket) -> bool:
        """A request head has arrived: the connection is being answered and can no longer be evicted. False if it
        was evicted first."""
        with self._conns_lock:
            st = self._conns.get(conn)
            if st is None or st.evicted:
                return False
            st.busy = True
            return True

    def release(self, conn: socket.socket) -> None:
        """Make a connection that is still reading evictable again (see _Handler._dispatch)."""
        with self._conns_lock:
            self._conns[conn].busy = False

    def end(self, conn: socket.socket) -> None:
        """An answer went out: the connection waits for its next request (idle_timeout from now)."""
        with self._conns_lock:
            st = self._conns[conn]
            st.busy, st.deadline, st.since = False, None, time.monotonic()

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.pop(conn, None)
            self._conns_lock.notify_all()

    # -- admission (ppfr.deploy.server.admission) -----------------------------------------------------------------
    def process_request(self, request: socket.socket, client_address: Any) -> None:
        cfg = self.service.config
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        with self._conns_lock:
            refusal, out = admission.admit(self._conns.values(), peer, cfg, busy=lambda st: st.busy)
            if out is not None:
                out.evicted = True
                try:
                    out.sock.shutdown(socket.SHUT_RDWR)  # wakes its handler, blocked in recv
                except OSError:
                    pass
            if refusal is None:
                self._conns[request] = _Conn(peer, sock=request)  # counted from accept, before the thread starts
        if refusal is not None:  # answer from the accept thread without spawning one: bounded threads and memory
            try:
                request.settimeout(1.0)  # a few hundred bytes into an empty socket buffer: never blocks for long
                request.sendall(admission.error_response("503 Service Unavailable", refusal, retry=True))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        # Called once per accepted connection whatever happened in its handler: the one place to stop tracking it.
        self.untrack(request)
        super().shutdown_request(request)

    def close_idle(self) -> None:
        """Wake handlers blocked reading the next keep-alive request so they exit now."""
        with self._conns_lock:
            idle = [c for c, st in self._conns.items() if not st.busy]
        for c in idle:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait_connections(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._conns_lock:
            while self._conns:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._conns_lock.wait(min(left, 0.1))
        return True


class RecognitionServer:
    """The HTTP server around a RecognitionService. ``start()`` serves from a background thread (tests, embedding);
    ``serve_forever()`` from the calling one (the CLI); ``close()`` is the graceful shutdown."""

    def __init__(self, runner: Any, gallery: GalleryLike | str | Path, token: str, host: str = "127.0.0.1",
                 port: int = 0, config: ServeConfig | None = None) -> None:  # fmt: skip
        if isinstance(gallery, (str, Path)):
            gallery = open_server_gallery(gallery, runner)
        try:
            self.service = RecognitionService(runner, gallery, token, config)
            self.httpd = _HTTPServer((host, port), self.service)
        except BaseException:
            gallery.close()  # e.g. the port is taken: do not keep the gallery locked
            raise
        self._thread: threading.Thread | None = None
        self._closed = False
        self._serving = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def connection_count(self) -> int:
        """Connections holding a slot now (the slowloris tests watch it)."""
        with self.httpd._conns_lock:
            return sum(not st.evicted for st in self.httpd._conns.values())

    def start(self) -> RecognitionServer:
        self.service.start()
        self._thread = threading.Thread(target=self._serve, name="ppfr-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.service.start()
        self._serve()

    def _serve(self) -> None:
        self._serving.set()
        self.httpd.serve_forever(poll_interval=0.1)

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish in-flight requests (draining the queue), close idle connections, release the
        port. Safe to call from any thread except the one running serve_forever (use ``request_shutdown``)."""
        if self._closed:
            return
        self._closed = True
        self.service.draining = True
        if self._serving.is_set():
            self.httpd.shutdown()  # returns once the accept loop has stopped
        self.httpd.close_idle()
        if not self.httpd.wait_connections(timeout):
            log.warning("shutdown: connections still open after %.0f s; closing anyway", timeout)
        self.service.worker.stop(timeout)
        self.service.gallery.close()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def request_shutdown(self) -> None:
        """Ask serve_forever to return (e.g. from a signal handler); the caller then calls close()."""
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def __enter__(self) -> RecognitionServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
