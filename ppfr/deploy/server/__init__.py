"""``ppfr serve``: the recognition server. Clients send protected payloads, never images; the server embeds them with
an exported or eager runner and enrols / verifies / identifies against a persistent gallery.

The rooms, imports pointing down (``launch`` -> ``asgi`` / ``stdlib`` -> ``service`` -> ``worker`` -> ``config``;
``admission`` -> ``config``):

* ``config``     ``ServeConfig`` (the limits and policy), ``RequestError``, ``internal_error``
* ``worker``     ``BatchingWorker``: the one thread that batches queued ``Job``s into ``runner.run`` calls
* ``service``    ``RecognitionService``: auth, body parsing, the payload contract, the endpoints (both stacks)
* ``admission``  connection slots and eviction, written once for both stacks
* ``stdlib``     ``RecognitionServer``: ``http.server.ThreadingHTTPServer``, dependency-free, one process
                 (``ppfr serve --http stdlib``)
* ``asgi``       FastAPI + uvicorn (the default stack; ``--workers``; ``AsgiServer`` in-process)
* ``launch``     ``ppfr serve``: the command line, starting either stack

Endpoints (answers are JSON; request bodies are the binary wire format of ``ppfr.deploy.wire``,
``application/x-ppfr``, whose header carries the fields below next to the payload, or the older JSON of
``ppfr.deploy.protocol``)::

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

from ppfr.deploy.server.config import DEFAULT_THRESHOLD, RequestError, ServeConfig
from ppfr.deploy.server.service import RecognitionService, open_server_gallery
from ppfr.deploy.server.stdlib import RecognitionServer
from ppfr.deploy.server.worker import BatchingWorker, Job

__all__ = ["DEFAULT_THRESHOLD", "BatchingWorker", "Job", "RecognitionServer", "RecognitionService", "RequestError",
           "ServeConfig", "open_server_gallery"]  # fmt: skip
