"""``RecognitionService``: the endpoints of ``ppfr serve``, independent of HTTP (both stacks answer through it):
the token check, body parsing (binary wire format or JSON), the payload contract against the runner's input spec,
and the jobs it hands the batching worker (``ppfr.deploy.server.worker``).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
from pathlib import Path
from typing import Any

# wire imports msgpack lazily; the service reads binary requests, so a missing ppfr[serve] stops it at start (the
# verb's one line), not at its first request
import msgpack  # noqa: F401
import numpy as np

from ppfr.deploy import api, wire
from ppfr.deploy.api import MAX_TOP_K
from ppfr.deploy.gallery import GalleryLike, check_name
from ppfr.deploy.protocol import WireError, check_origin, check_structure, check_values, dtype_name, read_payload
from ppfr.deploy.server.config import RequestError, ServeConfig, log
from ppfr.deploy.server.worker import BatchingWorker, Job

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"BM", b"RIFF")


class RecognitionService:
    """The endpoints, independent of HTTP: checks requests against the runner's spec and talks to the worker."""

    ROUTES: dict[str, api.Endpoint] = api.ROUTES  # path -> its verb, auth, schemas (both stacks route from it)

    def __init__(self, runner: Any, gallery: GalleryLike, token: str, config: ServeConfig | None = None) -> None:
        if not token:
            raise ValueError("an access token is required (the server never runs unauthenticated)")
        self.runner, self.gallery = runner, gallery
        # a copy: the defaults filled in below depend on this runner, and a caller may reuse its config
        self.config = dataclasses.replace(config) if config is not None else ServeConfig()
        self._token = token.encode("utf-8")
        from ppfr.methods.base import SCHEMA_VERSION

        self.schema_version = SCHEMA_VERSION
        self.spec = dict(runner.input_spec)  # {name: TensorSpec}: the payload contract (ppfr.deploy.protocol)
        sample_bytes = sum(math.prod(s.shape) * np.dtype(dtype_name(s.dtype)).itemsize for s in self.spec.values())
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
        size), or RequestError(400) saying what is wrong. The payload contract of ``ppfr.deploy.protocol``, in two
        steps: everything declared (method, names, dtypes, shapes, the batch size) before a tensor is decoded, so a
        payload is allocated only once it is what the method takes; then the values (finite, in range)."""
        method_name = self.runner.method
        if obj is None:
            raise RequestError(400, f"missing 'payload': send a protected {method_name} payload (see ppfr client)")
        where = f"{method_name} payload"
        try:
            method, version, tensors = obj if isinstance(obj, DecodedPayload) else read_payload(obj)
            check_origin(method, version, method_name, self.schema_version)
            b = check_structure(self.spec, tensors, where, max_batch=self.max_samples)
            if single and b != 1:
                raise ValueError(f"send one probe per request (batch size 1), got {b}")
            inputs = {name: tensors[name].decode() for name in self.spec}
            check_values(self.spec, inputs, where)
        except WireError as exc:
            raise RequestError(400, f"malformed payload: {exc}") from None
        except ValueError as exc:
            raise RequestError(400, str(exc)) from None
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
        return self.worker.submit(out) if isinstance(out, Job) else out

    def prepare(self, path: str, body: Any) -> dict | Job:
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
            return Job("enrol", inputs, n, name=name)
        if path == "/v1/verify":
            b = self._fields(body, {"name", "payload"})
            name = self._name(b)
            inputs, n = self.check_payload(b["payload"], single=True)
            if name not in self.gallery:  # before inference: an unknown name costs nothing
                raise RequestError(404, f"identity {name!r} is not enrolled")
            return Job("verify", inputs, n, name=name)
        if path == "/v1/identify":
            b = self._fields(body, {"payload"}, {"top_k"})
            top_k = b.get("top_k", 5)
            if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
                raise RequestError(400, f"top_k must be an integer in 1..{MAX_TOP_K}, got {top_k!r}")
            inputs, n = self.check_payload(b["payload"], single=True)
            return Job("identify", inputs, n, top_k=top_k)
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
            "input_spec": {k: {"shape": list(s.shape), "dtype": dtype_name(s.dtype), "low": s.low, "high": s.high}
                           for k, s in self.spec.items()},  # fmt: skip
            "threshold": self.config.threshold,
            "max_batch": self.config.max_batch,
            "max_request_bytes": self.config.max_request_bytes,
            "gallery": {"identities": len(self.gallery), "embeddings": self.gallery.num_embeddings},
        }


class DecodedPayload(tuple):
    """(method, schema_version, {name: DeclaredTensor}) of a binary wire message, read by
    ``RecognitionService.parse_body`` and decoded by ``check_payload`` once its spec matches (a tuple subclass, so
    that it is told apart from a JSON wire object)."""

    __slots__ = ()

    def __new__(cls, method: str, version: int, tensors: dict[str, wire.DeclaredTensor]) -> DecodedPayload:
        return super().__new__(cls, (method, version, tensors))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def open_server_gallery(uri: str | Path, runner: Any, index: str = "flat") -> Any:
    """The gallery at ``uri`` for ``runner``'s method and embedding size (``ppfr.deploy.gallery.open_gallery``:
    ``sqlite://``, a folder, ``qdrant://``; shareable by several worker processes). ``index``: the SQLite store's
    vector index, ``flat`` (exact) or ``hnsw`` (approximate, see docs/deploy.md for its recall)."""
    from ppfr.deploy.gallery import open_gallery

    return open_gallery(uri, runner.method, runner.embedding_size, index=index)
