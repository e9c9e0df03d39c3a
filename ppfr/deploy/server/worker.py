"""The batching worker: one thread that turns queued requests (``Job``) into batched ``runner.run`` calls and answers
them, each request judged on its own samples (see ``ppfr.deploy.server``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ppfr.deploy.gallery import GalleryLike
from ppfr.deploy.protocol import DegenerateEmbeddingError, l2_normalize
from ppfr.deploy.server.config import RequestError, ServeConfig

log = logging.getLogger("ppfr.serve")


@dataclass
class Job:
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

    def __init__(self, runner: Any, gallery: GalleryLike, config: ServeConfig) -> None:
        self.runner, self.gallery, self.config = runner, gallery, config
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        self._carry: Job | None = None  # a job that did not fit the previous batch: first of the next one
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ppfr-serve-worker", daemon=True)
        self.batches = 0
        self.samples = 0

    def start(self) -> None:
        self._thread.start()

    def _enqueue(self, job: Job) -> None:
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

    def submit(self, job: Job) -> dict:
        """Queue ``job`` and wait for its answer; RequestError on overload, timeout or failure."""
        self._enqueue(job)
        if not job.done.wait(self.config.request_timeout):
            if job.cancel():  # still queued: it will be skipped, nothing happens
                raise self._timed_out()
            job.done.wait()  # already being processed: the answer is moments away
        return job.answer()

    async def submit_async(self, job: Job) -> dict:
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
    def _next(self, timeout: float) -> Job | None:
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

    def _embed(self, jobs: list[Job]) -> list[np.ndarray | None]:
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
        """A request's (n, D) embeddings as unit rows (``ppfr.deploy.protocol.l2_normalize``), or RequestError(422)
        if any row cannot be compared by cosine: not finite, or of (near) zero norm. Such a payload passed the input
        checks (well-formed, finite, in range) but the network maps it to nothing usable: all zeros embed to a zero
        vector, huge values such as 1e30 or 3e38 overflow (a zero or NaN row)."""
        try:
            return l2_normalize(emb)
        except DegenerateEmbeddingError as exc:
            raise RequestError(422, f"payload sample {exc.row} has no usable embedding (it is {exc.what}; {exc.count} "
                                    f"of {exc.total} samples): the payload is well-formed but degenerate (e.g. all "
                                    f"zeros, or values far outside what the method's protect produces)") from None

    def _process(self, batch: list[Job]) -> None:
        jobs = [j for j in batch if j.claim()]  # cancelled (timed-out) requests are dropped here
        if not jobs:
            return
        parts = self._embed(jobs)
        # Every request is judged on its own samples: a degenerate one is answered 422 and leaves the batch, the
        # others go on exactly as if it had never been sent (the runner embeds samples independently).
        ok: list[tuple[Job, np.ndarray]] = []
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

    def _grouped(self, items: list[tuple[Job, np.ndarray]], fn: Any, what: str) -> None:
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

    def _identify(self, searches: list[tuple[Job, np.ndarray]]) -> None:
        thr = self.config.threshold
        ranked = self.gallery.search(np.concatenate([e for _, e in searches]), max(j.top_k for j, _ in searches))
        for (j, _), cands in zip(searches, ranked):
            cands = cands[: j.top_k]
            best = cands[0] if cands and cands[0].score >= thr else None
            j.finish({"candidates": [{"name": c.name, "score": c.score} for c in cands],
                      "match": best.name if best else None, "threshold": thr})  # fmt: skip

    def _verify(self, items: list[tuple[Job, np.ndarray]]) -> None:
        thr = self.config.threshold
        for j, e in items:
            try:
                score = float(self.gallery.verify(j.name, e)[0])
            except KeyError:  # removed while the request was queued
                j.finish(error=RequestError(404, f"identity {j.name!r} is not enrolled"))
                continue
            j.finish({"name": j.name, "score": score, "match": score >= thr, "threshold": thr})

    def _enrol(self, enrols: list[tuple[Job, np.ndarray]]) -> None:
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


