"""``ppfr serve``: the recognition server. Clients send protected payloads, never images; the server embeds them with
an exported or eager runner and enrols / verifies / identifies against a persistent gallery.

This module holds what both HTTP stacks share, ``RecognitionService`` (auth, body parsing, payload checks, the
batching worker), the stdlib stack (``RecognitionServer``: ``http.server.ThreadingHTTPServer``, dependency-free,
one process; ``ppfr serve --http stdlib``) and the CLI. The default stack, FastAPI + uvicorn with ``--workers``,
is ``ppfr.deploy.app`` over the same service.

Endpoints (answers are JSON; request bodies are the binary wire format of ``ppfr.deploy.wire``,
``application/x-ppfr``, whose header carries the fields below next to the payload, or the older JSON of
``ppfr.deploy.client``)::

    GET  /health                                    no auth; {"status": "ok"} (503 "draining" while stopping)
    GET  /v1/info                                   method, payload spec, backend, embedding size, limits, gallery size
    GET  /v1/identities                             {"identities": {name: number of embeddings}}
    POST /v1/enrol     {"name", "payload"}          every sample becomes an embedding of name
    POST /v1/verify    {"name", "payload"}          one probe: {"score", "match", "threshold"}
    POST /v1/identify  {"payload", "top_k"}         one probe: ranked {"candidates": [{"name", "score"}], "match"}
    POST /v1/remove    {"name"}                     delete an identity

Request path: exactly one Content-Length (400 otherwise) -> token check (``Authorization: Bearer``, constant-time;
401) -> size limit from Content-Length before reading the body (413) -> JSON and payload checks against the runner's
input spec: method, schema version, tensor names, per-sample shape, dtype, finite values inside the spec's range
(400, with a message) -> a bounded work queue (503 when full) -> one batching worker thread that collects up to
``max_batch`` samples or waits ``max_delay_ms`` after the oldest, makes one ``runner.run`` call and answers every
request of the batch. Errors change nothing: all checks happen before the queue, and enrolments are applied (and
saved) only after inference succeeded.

Requests are isolated from their batch-mates: each request's embeddings are checked on their own (finite, non-zero
norm; 422 naming the sample otherwise: a well-formed payload such as all zeros or 1e30 that the network cannot
embed), a runner call that fails as a whole is retried request by request, and a failing gallery step fails only
the request that causes it. One client's bad payloads never fail another client's requests.

Connections: each request must arrive whole (head and body) within ``read_timeout`` of its first byte, however its
bytes trickle, and a keep-alive connection waits at most ``idle_timeout`` for its next request. When all
``max_connections`` slots are taken, a new connection evicts the stalest connection that has not authenticated and
is not being answered (503 only if there is none), so clients that never finish a request (slowloris) cannot lock
out ``/health`` or authenticated clients; ``max_connections_per_peer`` optionally caps one client address.

Shutdown (SIGTERM / SIGINT / ``close()``): stop accepting, let in-flight requests finish (the worker drains the
queue), close idle keep-alive connections, then exit. The gallery is saved on every change, so nothing is lost.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import json
import logging
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ppfr.deploy import api, wire
from ppfr.deploy.api import MAX_TOP_K
from ppfr.deploy.client import WireError, read_payload, read_token
from ppfr.deploy.gallery import Gallery, GalleryError, check_name

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


def _numpy_dtype(torch_dtype: Any) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    try:
        return np.dtype(name)
    except TypeError:
        raise ValueError(f"payload dtype {torch_dtype} has no numpy/wire equivalent") from None


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass
class _Job:
    """One validated request waiting for the worker. The state machine pending -> claimed | cancelled is guarded
    by ``lock`` so a request that timed out in the queue is never applied after its client was told it failed."""

    kind: str  # enrol | verify | identify
    inputs: dict[str, np.ndarray]
    n: int
    name: str = ""
    top_k: int = 1
    enqueued: float = field(default_factory=time.monotonic)
    state: str = "pending"
    result: dict | None = None
    error: RequestError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_done: Any = None  # called (from the worker thread) once the job is answered: wakes an asyncio waiter

    def _leave_pending(self, state: str) -> bool:
        """Atomically move a pending job to ``state``; False if the worker or the requester got there first."""
        with self.lock:
            if self.state != "pending":
                return False
            self.state = state
            return True

    def claim(self) -> bool:
        return self._leave_pending("claimed")

    def cancel(self) -> bool:
        return self._leave_pending("cancelled")

    def finish(self, result: dict | None = None, error: RequestError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()

    def answer(self) -> dict:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BatchingWorker:
    """One thread that turns queued requests into batched ``runner.run`` calls and answers them."""

    def __init__(self, runner: Any, gallery: Gallery, config: ServeConfig) -> None:
        self.runner, self.gallery, self.config = runner, gallery, config
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=config.queue_size)
        self._carry: _Job | None = None  # a job that did not fit the previous batch: first of the next one
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ppfr-serve-worker", daemon=True)
        self.batches = 0
        self.samples = 0

    def start(self) -> None:
        self._thread.start()

    def _enqueue(self, job: _Job) -> None:
        if self._closing.is_set():
            raise RequestError(503, "server is shutting down", {"Retry-After": "1"})
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.config.queue_size} requests queued; retry later",
                               {"Retry-After": "1"}) from None  # fmt: skip

    def _timed_out(self) -> RequestError:
        return RequestError(503, f"request waited {self.config.request_timeout:.0f} s in the queue; retry later",
                            {"Retry-After": "1"})  # fmt: skip

    def submit(self, job: _Job) -> dict:
        """Queue ``job`` and wait for its answer; RequestError on overload, timeout or failure."""
        self._enqueue(job)
        if not job.done.wait(self.config.request_timeout):
            if job.cancel():  # still queued: it will be skipped, nothing happens
                raise self._timed_out()
            job.done.wait()  # already being processed: the answer is moments away
        return job.answer()

    async def submit_async(self, job: _Job) -> dict:
        """``submit`` for an asyncio caller: waits on a future instead of holding a thread per queued request."""
        import asyncio

        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # the loop is gone (server stopped): nobody is waiting any more
                pass

        job.on_done = wake
        self._enqueue(job)
        try:
            await asyncio.wait_for(woken.wait(), self.config.request_timeout)
        except asyncio.TimeoutError:
            if job.cancel():
                raise self._timed_out() from None
            await woken.wait()
        return job.answer()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, answer every queued one, then end the thread."""
        self._closing.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ the thread
    def _next(self, timeout: float) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(0.05)
            if first is None:
                if self._closing.is_set() and self.queue.empty():
                    return
                continue
            batch, n = [first], first.n
            # The delay counts from when the oldest request arrived, so requests that queued while the worker was
            # busy are not made to wait again.
            deadline = first.enqueued + self.config.max_delay_ms / 1e3
            while n < self.config.max_batch:
                job = self._next(deadline - time.monotonic())
                if job is None:
                    break
                if n + job.n > self.config.max_batch:
                    self._carry = job
                    break
                batch.append(job)
                n += job.n
            try:
                self._process(batch)
            except Exception as exc:  # never let the worker die: every request of the batch gets the error
                log.exception("batch failed")
                for job in batch:
                    if not job.done.is_set():
                        job.finish(error=RequestError(500, f"internal error: {type(exc).__name__}: {exc}"))

    def _embed(self, jobs: list[_Job]) -> list[np.ndarray | None]:
        """One ``runner.run`` over the jobs' samples -> each job's (n, D) slice, or None for a job whose inference
        failed (it is answered here). Only the shape is checked here: whether a row is usable is a per-sample
        question (``_normalized``), so that one degenerate sample cannot fail the requests batched with it."""
        keys = list(jobs[0].inputs)
        inputs = jobs[0].inputs if len(jobs) == 1 else {k: np.concatenate([j.inputs[k] for j in jobs]) for k in keys}
        total = sum(j.n for j in jobs)
        try:
            emb = np.asarray(self.runner.run(inputs), dtype=np.float32)
            if emb.shape != (total, self.runner.embedding_size):
                raise RuntimeError(f"runner returned {emb.shape}, expected ({total}, {self.runner.embedding_size})")
        except Exception as exc:
            if len(jobs) > 1:
                # The batched call failed as a whole: run every request alone, so only the one(s) that make the
                # runner fail get the error (rare, so the cost of unbatching does not matter).
                log.warning("batch of %d requests failed (%s: %s); retrying them one by one", len(jobs),
                            type(exc).__name__, exc)  # fmt: skip
                return [self._embed([j])[0] for j in jobs]
            log.exception("inference failed")
            jobs[0].finish(error=RequestError(500, f"inference failed: {type(exc).__name__}: {exc}"))
            return [None]
        self.batches += 1
        self.samples += total
        offsets = np.cumsum([0] + [j.n for j in jobs])
        return [emb[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    @staticmethod
    def _normalized(emb: np.ndarray) -> np.ndarray:
        """A request's (n, D) embeddings as unit rows, or RequestError(422) if any row cannot be compared by
        cosine: not finite, or of (near) zero norm. Such a payload passed the input checks (well-formed, finite, in
        range) but the network maps it to nothing usable: all zeros embed to a zero vector, huge values such as
        1e30 or 3e38 overflow (a zero or NaN row). The norm is taken in float64, so a large but finite embedding
        from a runner that does not normalise is rescaled instead of overflowing to a zero row."""
        wide = emb.astype(np.float64)
        norms = np.linalg.norm(wide, axis=1)
        bad = np.flatnonzero(~np.isfinite(wide).all(axis=1) | ~(norms > 1e-6) | ~np.isfinite(norms))
        if bad.size:
            i = int(bad[0])
            what = "not finite" if not np.isfinite(wide[i]).all() else f"of norm {norms[i]:.3g}"
            raise RequestError(422, f"payload sample {i} has no usable embedding (it is {what}; {bad.size} of "
                                    f"{len(emb)} samples): the payload is well-formed but degenerate (e.g. all "
                                    f"zeros, or values far outside what the method's protect produces)")  # fmt: skip
        return (wide / norms[:, None]).astype(np.float32)

    def _process(self, batch: list[_Job]) -> None:
        jobs = [j for j in batch if j.claim()]  # cancelled (timed-out) requests are dropped here
        if not jobs:
            return
        parts = self._embed(jobs)
        # Every request is judged on its own samples: a degenerate one is answered 422 and leaves the batch, the
        # others go on exactly as if it had never been sent (the runner embeds samples independently).
        ok: list[tuple[_Job, np.ndarray]] = []
        for j, e in zip(jobs, parts):
            if e is None:  # answered by _embed
                continue
            try:
                ok.append((j, self._normalized(e)))
            except RequestError as exc:
                j.finish(error=exc)
        # Requests of one batch are concurrent (none has been answered), so applying every enrolment first and
        # then answering the searches is a valid serial order, and costs one gallery save per batch.
        enrols = [(j, e) for j, e in ok if j.kind == "enrol"]
        if enrols:
            self._enrol(enrols)
        searches = [(j, e) for j, e in ok if j.kind == "identify"]
        if searches:
            self._grouped(searches, self._identify, "identify")
        for j, e in ok:
            if j.kind == "verify":
                self._grouped([(j, e)], self._verify, "verify")

    def _grouped(self, items: list[tuple[_Job, np.ndarray]], fn: Any, what: str) -> None:
        """``fn(items)`` answers the items together; if it raises, answer them one by one so that only the item
        that makes it fail gets the (500) error, never its batch-mates."""
        try:
            fn(items)
            return
        except Exception as exc:
            if len(items) == 1:
                log.exception("%s failed", what)
                items[0][0].finish(error=RequestError(500, f"{what} failed: {type(exc).__name__}: {exc}"))
                return
        for item in items:
            if not item[0].done.is_set():
                self._grouped([item], fn, what)

    def _identify(self, searches: list[tuple[_Job, np.ndarray]]) -> None:
        thr = self.config.threshold
        ranked = self.gallery.search(np.concatenate([e for _, e in searches]), max(j.top_k for j, _ in searches))
        for (j, _), cands in zip(searches, ranked):
            cands = cands[: j.top_k]
            best = cands[0] if cands and cands[0].score >= thr else None
            j.finish({"candidates": [{"name": c.name, "score": c.score} for c in cands],
                      "match": best.name if best else None, "threshold": thr})  # fmt: skip

    def _verify(self, items: list[tuple[_Job, np.ndarray]]) -> None:
        thr = self.config.threshold
        for j, e in items:
            try:
                score = float(self.gallery.verify(j.name, e)[0])
            except KeyError:  # removed while the request was queued
                j.finish(error=RequestError(404, f"identity {j.name!r} is not enrolled"))
                continue
            j.finish({"name": j.name, "score": score, "match": score >= thr, "threshold": thr})

    def _enrol(self, enrols: list[tuple[_Job, np.ndarray]]) -> None:
        try:
            counts = self.gallery.enrol_many([(j.name, e) for j, e in enrols])
        except ValueError as exc:
            # A bad item (enrol_many is all or nothing): apply the others one by one so it fails alone. Cannot
            # happen after _normalized, but a gallery rule added later must not turn into batch-wide failures.
            if len(enrols) > 1:
                for item in enrols:
                    self._enrol([item])
                return
            enrols[0][0].finish(error=RequestError(422, f"enrolment refused: {exc}"))
            return
        except Exception as exc:  # e.g. the disk is full: the gallery (memory and file) is unchanged
            # Not the fault of any one request, and retrying each would only fail again: all get the error.
            log.exception("enrolment failed")
            for j, _ in enrols:
                j.finish(error=RequestError(500, f"enrolment not saved: {type(exc).__name__}: {exc}"))
            return
        for (j, e), c in zip(enrols, counts):
            j.finish({"name": j.name, "added": int(e.shape[0]), "embeddings": c})


# ------------------------------------------------------------------------------------------------- service
class RecognitionService:
    """The endpoints, independent of HTTP: checks requests against the runner's spec and talks to the worker."""

    ROUTES: dict[str, api.Endpoint] = api.ROUTES  # path -> its verb, auth, schemas (both stacks route from it)

    def __init__(self, runner: Any, gallery: Gallery, token: str, config: ServeConfig | None = None) -> None:
        if not token:
            raise ValueError("an access token is required (the server never runs unauthenticated)")
        self.runner, self.gallery = runner, gallery
        # a copy: the defaults filled in below depend on this runner, and a caller may reuse its config
        self.config = dataclasses.replace(config) if config is not None else ServeConfig()
        self._token = token.encode("utf-8")
        from ppfr.methods.base import SCHEMA_VERSION

        self.schema_version = SCHEMA_VERSION
        self.spec = {k: (tuple(s.shape), _numpy_dtype(s.dtype), s.low, s.high) for k, s in runner.input_spec.items()}
        sample_bytes = sum(int(np.prod(shape)) * dt.itemsize for shape, dt, _, _ in self.spec.values())
        self.sample_wire_bytes = 4 * ((sample_bytes + 2) // 3)
        if self.config.max_request_bytes is None:
            self.config.max_request_bytes = 16 * self.sample_wire_bytes + 64 * 1024
        # A TensorRT engine has a largest batch (its optimisation profile): batches and requests must fit in it.
        self.max_samples = getattr(runner, "max_batch_size", None)
        if self.max_samples is not None and self.config.max_batch > self.max_samples:
            log.warning("max_batch %d > the runner's maximum batch %d: using %d", self.config.max_batch,
                        self.max_samples, self.max_samples)  # fmt: skip
            self.config.max_batch = self.max_samples
        self.worker = BatchingWorker(runner, gallery, self.config)
        self.draining = False

    def start(self) -> None:
        self.worker.start()

    def authorized(self, header: str | None) -> bool:
        """Constant-time comparison of a ``Bearer`` token (no early exit revealing a matching prefix)."""
        scheme, _, value = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":  # the auth scheme is case-insensitive (RFC 9110)
            return False
        return hmac.compare_digest(value.strip().encode("utf-8"), self._token)

    # ---------------------------------------------------------------------------------------------- checks
    def parse_body(self, data: bytes, content_type: str | None) -> Any:
        """A request body -> the endpoint's fields as a dict (``payload``: a JSON wire object or a DecodedPayload),
        or RequestError: 400 for an image or a malformed body, 415 for another content type."""
        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or data.startswith(_IMAGE_MAGIC):
            raise RequestError(400, f"an image was sent where a protected {self.runner.method} payload is expected: "
                                    "the server never accepts images; protect on the client (ppfr client, or "
                                    "method.protect + ppfr.deploy.client.Client)")  # fmt: skip
        if ctype == wire.CONTENT_TYPE or (not ctype and wire.is_message(data)):
            try:
                method, version, tensors, fields = wire.read_message(data)  # decoded by check_payload
            except WireError as exc:
                raise RequestError(400, f"malformed payload: {exc}") from None
            if "payload" in fields:
                raise RequestError(400, "fields must not hold 'payload' (the tensors are the payload)")
            return {**fields, "payload": DecodedPayload(method, version, tensors)}
        if ctype and ctype != "application/json":
            raise RequestError(415, f"Content-Type must be application/json or {wire.CONTENT_TYPE}, got {ctype}")
        try:
            return json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN/Infinity, deep nesting
            raise RequestError(400, f"malformed JSON: {str(exc)[:200]}") from None

    def check_payload(self, obj: Any, single: bool) -> tuple[dict[str, np.ndarray], int]:
        """A payload (a JSON wire object or a DecodedPayload of the binary format) -> (inputs for runner.run, batch
        size), or RequestError(400) saying what is wrong. Everything declared (method, names, dtypes, shapes, the
        batch size) is checked before a tensor is decoded: a payload is allocated only once it is what the method
        takes, so no encoding or dtype can make the server hold more than that."""
        method_name = self.runner.method
        if obj is None:
            raise RequestError(400, f"missing 'payload': send a protected {method_name} payload (see ppfr client)")
        try:
            method, version, tensors = obj if isinstance(obj, DecodedPayload) else read_payload(obj)
        except WireError as exc:
            raise RequestError(400, f"malformed payload: {exc}") from None
        if method != method_name:
            raise RequestError(400, f"payload is for method {method!r}, this server runs {method_name!r}")
        if version != self.schema_version:
            raise RequestError(400, f"payload schema version {version} != {self.schema_version}")
        if set(tensors) != set(self.spec):
            hint = ""
            if any(a.ndim == 4 and a.shape[1] == 3 for a in tensors.values()):
                hint = " (this looks like an RGB image: protect it on the client with the method's protect)"
            raise RequestError(400, f"{method_name} payload must hold tensors {sorted(self.spec)}, "
                                    f"got {sorted(tensors)}{hint}")  # fmt: skip
        b = None
        for name, (shape, dtype, _, _) in self.spec.items():
            t = tensors[name]  # declared only: nothing decoded yet
            if t.dtype != dtype or tuple(t.shape[1:]) != shape:
                hint = " (an RGB image is not a payload)" if t.ndim == 4 and t.shape[1] == 3 and shape[0] != 3 else ""
                raise RequestError(400, f"{method_name} payload {name!r} must be (B, {', '.join(map(str, shape))}) "
                                        f"{dtype}, got {tuple(t.shape)} {t.dtype}{hint}")  # fmt: skip
            if b is not None and t.shape[0] != b:
                raise RequestError(400, f"{method_name} payload tensors disagree on the batch size")
            b = t.shape[0]
        assert b is not None
        if b < 1:
            raise RequestError(400, "payload has no samples (batch size 0)")
        if single and b != 1:
            raise RequestError(400, f"send one probe per request (batch size 1), got {b}")
        if self.max_samples is not None and b > self.max_samples:
            raise RequestError(400, f"at most {self.max_samples} samples per request on this runner, got {b}")
        inputs = {}
        for name, (_, _, low, high) in self.spec.items():
            try:
                a = inputs[name] = tensors[name].decode()
            except WireError as exc:
                raise RequestError(400, f"malformed payload: {exc}") from None
            if a.dtype.kind == "f":
                if not np.isfinite(a).all():
                    raise RequestError(400, f"{method_name} payload {name!r} has NaN or infinite values")
            # the same tolerance as Payload.validate, so the server accepts exactly what recognize accepts
            if low is not None and a.size and float(a.min()) < low - 1e-6:
                raise RequestError(400, f"{method_name} payload {name!r} has values below {low}")
            if high is not None and a.size and float(a.max()) > high + 1e-6:
                raise RequestError(400, f"{method_name} payload {name!r} has values above {high}")
        return inputs, b

    @staticmethod
    def _fields(body: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        missing, unknown = required - set(body), set(body) - required - optional
        if missing or unknown:
            raise RequestError(400, f"expected fields {sorted(required)}"
                                    + (f" (optional {sorted(optional)})" if optional else "")
                                    + f"; missing {sorted(missing)}, unknown {sorted(unknown)}")  # fmt: skip
        return body

    @staticmethod
    def _name(body: dict) -> str:
        try:
            return check_name(body["name"])
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None

    # -------------------------------------------------------------------------------------------- endpoints
    def handle(self, path: str, body: Any) -> dict:
        """Answer an authorised, parsed request to ``path`` (RequestError otherwise); blocks for queued work."""
        out = self.prepare(path, body)
        return self.worker.submit(out) if isinstance(out, _Job) else out

    def prepare(self, path: str, body: Any) -> dict | _Job:
        """Check an authorised, parsed request to ``path``: the answer of an endpoint that needs no inference, or
        the validated job to submit to the worker (RequestError if the request is refused)."""
        if path == "/health":
            if self.draining:
                raise RequestError(503, "draining")
            return {"status": "ok"}
        if path == "/openapi.json":
            return api.openapi()
        if path == "/v1/info":
            return self.info()
        if path == "/v1/identities":
            return {"identities": self.gallery.identities()}
        if path == "/v1/enrol":
            b = self._fields(body, {"name", "payload"})
            name = self._name(b)
            inputs, n = self.check_payload(b["payload"], single=False)
            return _Job("enrol", inputs, n, name=name)
        if path == "/v1/verify":
            b = self._fields(body, {"name", "payload"})
            name = self._name(b)
            inputs, n = self.check_payload(b["payload"], single=True)
            if name not in self.gallery:  # before inference: an unknown name costs nothing
                raise RequestError(404, f"identity {name!r} is not enrolled")
            return _Job("verify", inputs, n, name=name)
        if path == "/v1/identify":
            b = self._fields(body, {"payload"}, {"top_k"})
            top_k = b.get("top_k", 5)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
                raise RequestError(400, f"top_k must be an integer in 1..{MAX_TOP_K}, got {top_k!r}")
            inputs, n = self.check_payload(b["payload"], single=True)
            return _Job("identify", inputs, n, top_k=top_k)
        if path == "/v1/remove":
            name = self._name(self._fields(body, {"name"}))
            try:
                removed = self.gallery.remove(name)
            except KeyError:
                raise RequestError(404, f"identity {name!r} is not enrolled") from None
            return {"name": name, "removed": removed}
        raise RequestError(404, f"no endpoint {path}")

    def info(self) -> dict:
        return {
            "method": self.runner.method,
            "schema_version": self.schema_version,
            "backend": self.runner.backend,
            "embedding_size": self.runner.embedding_size,
            "input_spec": {k: {"shape": list(shape), "dtype": dt.name, "low": low, "high": high}
                           for k, (shape, dt, low, high) in self.spec.items()},  # fmt: skip
            "threshold": self.config.threshold,
            "max_batch": self.config.max_batch,
            "max_request_bytes": self.config.max_request_bytes,
            "gallery": {"identities": len(self.gallery), "embeddings": self.gallery.num_embeddings},
        }


# ---------------------------------------------------------------------------------------------------- HTTP
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"RIFF")

# When every slot is taken, a new connection evicts the stalest one that has not authenticated and is not being
# answered. One that has sent nothing of its request yet is spared for this many seconds: a client that has just
# connected is about to send; a slowloris client has started its request and never finishes it.
_EVICT_IDLE_AFTER = 1.0


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


class DecodedPayload(tuple):
    """(method, schema_version, {name: DeclaredTensor}) of a binary wire message, read by
    ``RecognitionService.parse_body`` and decoded by ``check_payload`` once its spec matches (a tuple subclass, so
    that it is told apart from a JSON wire object)."""

    __slots__ = ()

    def __new__(cls, method: str, version: int, tensors: dict[str, wire.DeclaredTensor]) -> DecodedPayload:
        return super().__new__(cls, (method, version, tensors))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


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

    # -- admission ----------------------------------------------------------------------------------------------
    def _victim(self, now: float) -> socket.socket | None:
        """The stalest evictable connection: not authenticated, not being answered, and mid-request or idle for
        at least _EVICT_IDLE_AFTER. Caller holds the lock."""
        best, best_since = None, None
        for conn, st in self._conns.items():
            if st.evicted or st.busy or st.authed:
                continue
            if st.deadline is None and now - st.since < _EVICT_IDLE_AFTER:
                continue
            if best_since is None or st.since < best_since:
                best, best_since = conn, st.since
        return best

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        cfg = self.service.config
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        refusal = None
        with self._conns_lock:
            live = [st for st in self._conns.values() if not st.evicted]  # an evicted one is leaving
            cap = cfg.max_connections_per_peer
            if cap is not None and sum(st.peer == peer for st in live) >= cap:
                refusal = f"too many connections from {peer} (at most {cap}); retry later"
            elif len(live) >= cfg.max_connections:
                victim = self._victim(time.monotonic())
                if victim is None:
                    refusal = "too many connections; retry later"
                else:
                    self._conns[victim].evicted = True
                    log.info("all %d connection slots taken: evicting a stalled unauthenticated connection from %s",
                             cfg.max_connections, self._conns[victim].peer)  # fmt: skip
                    try:
                        victim.shutdown(socket.SHUT_RDWR)  # wakes its handler, blocked in recv
                    except OSError:
                        pass
            if refusal is None:
                self._conns[request] = _Conn(peer)  # counted from accept, before the thread starts
        if refusal is not None:  # answer from the accept thread without spawning one: bounded threads and memory
            body = json.dumps({"error": refusal}).encode()
            try:
                request.settimeout(1.0)  # a few hundred bytes into an empty socket buffer: never blocks for long
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
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


def open_server_gallery(uri: str | Path, runner: Any, index: str = "flat") -> Any:
    """The gallery at ``uri`` for ``runner``'s method and embedding size (``ppfr.deploy.gallery.open_gallery``:
    ``sqlite://``, a folder, ``qdrant://``; shareable by several worker processes). ``index``: the SQLite store's
    vector index, ``flat`` (exact) or ``hnsw`` (approximate, see docs/deploy.md for its recall)."""
    from ppfr.deploy.gallery import open_gallery

    return open_gallery(uri, runner.method, runner.embedding_size, index=index)


class RecognitionServer:
    """The HTTP server around a RecognitionService. ``start()`` serves from a background thread (tests, embedding);
    ``serve_forever()`` from the calling one (the CLI); ``close()`` is the graceful shutdown."""

    def __init__(self, runner: Any, gallery: Gallery | str | Path, token: str, host: str = "127.0.0.1",
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


# ----------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ppfr serve", description="serve a trained or exported method over HTTP")
    ap.add_argument("model", nargs="?", default=None,
                    help="model.pt, method:NAME, or an exported .onnx / .engine (ppfr export); --backend auto runs "
                         "the fastest available (docs/deploy.md)")
    ap.add_argument("--runner", default=None, metavar="triton://HOST:PORT[/MODEL]",
                    help="instead of MODEL: delegate inference to a Triton Inference Server (gRPC) serving a "
                         "`ppfr export --format triton` repository")
    ap.add_argument("--gallery", required=True,
                    help="the enrolled-identity gallery, created if absent: a folder or sqlite:///path/gallery.db "
                         "(several workers / servers of one host share it), or qdrant://host:port/collection")
    ap.add_argument("--gallery-index", choices=("flat", "hnsw", "ivf"), default="flat",
                    help="the SQLite gallery's vector index: flat (exact, default), ivf (approximate, trained at "
                         "start; ~25x faster identify at 1M identities) or hnsw (approximate)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default loopback; there is no TLS: put a TLS proxy in front otherwise)")
    ap.add_argument("--port", type=int, default=8080, help="0 = any free port (printed at start)")
    ap.add_argument("--token", default=None, help="access token (visible in the process list; prefer --token-file)")
    ap.add_argument("--token-file", default=None, help="file whose first line is the access token")
    ap.add_argument("--backend", default="auto", choices=["auto", "eager", "onnxruntime", "tensorrt", "triton"])
    ap.add_argument("--http", default="asgi", choices=["asgi", "stdlib"],
                    help="asgi: FastAPI + uvicorn (OpenAPI at /docs, --workers); stdlib: the dependency-free "
                         "ThreadingHTTPServer (one process)")
    ap.add_argument("--workers", type=int, default=1,
                    help="asgi: worker processes, each with its own model copy and batching worker, sharing the "
                         "port and the gallery (which must then be sqlite / a folder, or qdrant)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                    help="cosine similarity for a match (calibrate on your validation pairs)")
    ap.add_argument("--max-batch", type=int, default=32, help="samples per inference call")
    ap.add_argument("--max-delay-ms", type=float, default=5.0, help="how long a request may wait for a batch")
    ap.add_argument("--queue-size", type=int, default=256, help="queued requests before answering 503")
    ap.add_argument("--max-request-bytes", type=int, default=None,
                    help="largest request body (default: 16 payload samples + 64 KiB)")
    ap.add_argument("--max-connections", type=int, default=128, help="connection slots (per worker process)")
    ap.add_argument("--max-connections-per-peer", type=int, default=None,
                    help="connections from one client address (default: no cap; leave it off behind a proxy)")
    ap.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds a request's head and body may take to arrive, from its first byte")
    ap.add_argument("--idle-timeout", type=float, default=15.0,
                    help="seconds a keep-alive connection may wait for its next request (0: no limit)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    if (args.model is None) == (args.runner is None):
        ap.error("give MODEL or --runner triton://HOST:PORT[/MODEL] (exactly one)")
    if args.runner is not None:
        args.model = args.runner
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every SIMD variant it tries at INFO
    token = read_token(args.token, args.token_file)
    if args.token:
        log.warning("--token is visible to other users in the process list; prefer --token-file")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: traffic (payloads and the token) is plain HTTP; terminate TLS in front", args.host)
    if args.workers < 1 or (args.workers > 1 and args.http != "asgi"):
        print("ppfr serve: --workers must be >= 1, and > 1 needs --http asgi", file=sys.stderr)
        return 2

    from ppfr.deploy.runner import load_runner

    try:
        config = ServeConfig(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, queue_size=args.queue_size,
                             max_request_bytes=args.max_request_bytes, threshold=args.threshold,
                             max_connections=args.max_connections,
                             max_connections_per_peer=args.max_connections_per_peer,
                             read_timeout=args.read_timeout, idle_timeout=args.idle_timeout)  # fmt: skip
        runner = load_runner(args.model, backend=args.backend)  # in this process too: errors before binding
        if args.http == "stdlib":
            return _serve_stdlib(args, runner, token, config)
        return _serve_asgi(args, runner, token, config)
    except (ValueError, GalleryError, OSError, RuntimeError) as exc:
        print(f"ppfr serve: {exc}", file=sys.stderr)
        return 2


def _serve_stdlib(args: Any, runner: Any, token: str, config: ServeConfig) -> int:
    server = RecognitionServer(runner, open_server_gallery(args.gallery, runner, args.gallery_index), token,
                               args.host, args.port, config)  # fmt: skip
    g = server.service.gallery
    print(f"ppfr serve: {runner.method} on {runner.backend}, gallery {args.gallery} ({len(g)} identities, "
          f"{g.num_embeddings} embeddings), listening on {server.url}", flush=True)  # fmt: skip

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        server.request_shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.serve_forever()
    finally:
        server.close()
    print("ppfr serve: stopped", flush=True)
    return 0


def _serve_asgi(args: Any, runner: Any, token: str, config: ServeConfig) -> int:
    """uvicorn: in this process (--workers 1), or N spawned worker processes sharing one listening socket. uvicorn
    handles SIGTERM / SIGINT: stop accepting, finish in-flight requests, then each process drains its worker."""
    import os

    from ppfr.deploy import app as app_module

    gallery = open_server_gallery(args.gallery, runner, args.gallery_index)
    try:
        desc = f"{len(gallery)} identities, {gallery.num_embeddings} embeddings"
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)
        sock.set_inheritable(True)  # the spawned workers accept on it
    except BaseException:
        gallery.close()
        raise
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    what = f"{runner.method} on {runner.backend}"
    if args.workers == 1:
        service = RecognitionService(runner, gallery, token, config)
        guard = app_module.ConnectionGuard(service.config, service.authorized)
        protocol = type("GuardedH11Protocol", (app_module.GuardedH11Protocol,), {"guard": guard})
        uv = app_module.uvicorn_config(app_module.create_app(service), service.config, protocol,
                                       log_level=args.log_level)  # fmt: skip
        print(f"ppfr serve: {what}, gallery {args.gallery} ({desc}), asgi, listening "
              f"on {url}", flush=True)  # fmt: skip
        app_module.UvicornServer(uv).run(sockets=[sock])
    else:
        gallery.close()  # each worker opens its own
        del runner
        os.environ[app_module.SPEC_ENV] = json.dumps({"model": args.model, "backend": args.backend,
                                                      "gallery": str(args.gallery),
                                                      "gallery_index": args.gallery_index,
                                                      "config": dataclasses.asdict(config)})  # fmt: skip
        os.environ["PPFR_TOKEN"] = token  # inherited by the workers only (not in their command line)
        from uvicorn.supervisors import Multiprocess

        uv = app_module.uvicorn_config("ppfr.deploy.app:app_from_env", config,
                                       "ppfr.deploy.app:GuardedH11Protocol", workers=args.workers,
                                       log_level=args.log_level, factory=True)  # fmt: skip
        print(f"ppfr serve: {what}, gallery {args.gallery} ({desc}), asgi, "
              f"{args.workers} workers, listening on {url}", flush=True)  # fmt: skip
        Multiprocess(uv, sockets=[sock]).run()
    sock.close()
    print("ppfr serve: stopped", flush=True)
    return 0
