"""The HTTP interface of ``ppfr serve`` as data: one table of endpoints that both stacks route from (the stdlib
``RecognitionServer`` and the FastAPI app of ``ppfr.deploy.server.asgi``), and the OpenAPI document generated from it, which
both serve at ``GET /openapi.json`` (the ASGI stack also renders it at ``/docs``).

The document is typed so that a client generator or a contract test (schemathesis runs against both stacks in the
tests) learns the interface from it: each operation's request body (JSON, and the binary wire format
``application/x-ppfr`` of ``ppfr.deploy.wire`` for the payload endpoints), its answer, every error status it can
answer with the one error schema ``{"error": "..."}``, and the bearer-token security scheme. Dependency-free (no
pydantic): the stdlib stack serves it too.

What JSON Schema cannot say, and the service checks: a payload tensor's base64 ``data`` must be exactly the bytes
its dtype and shape need, and its names, dtypes and per-sample shapes must be those of the served method's spec
(``GET /v1/info``, ``input_spec``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppfr.deploy import wire
from ppfr.deploy.gallery.helpers import MAX_NAME_LEN

MAX_TOP_K = 100
BEARER = "bearerAuth"

# Statuses any operation can answer: framing refused (400: repeated / bad Content-Length), a bug (500, connection
# closed), no connection slot or draining (503). Per endpoint below: what its own checks add.
_ANY = (400, 500, 503)
_AUTH = (401,)
_BODY = (408, 411, 413, 415)  # body late, length missing, too large, neither JSON nor application/x-ppfr
_QUEUED = (422,)  # well-formed payload that embeds to nothing usable; 500 (inference failed) and 503 (queue) are _ANY


@dataclass(frozen=True)
class Endpoint:
    """One operation: ``request`` / ``response`` name schemas of ``SCHEMAS``; ``payload``: the request carries a
    protected payload, so it may come in the binary wire format too."""

    path: str
    verb: str
    auth: bool
    summary: str
    response: str
    request: str | None = None
    payload: bool = False
    errors: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1].replace(".", "_")

    @property
    def statuses(self) -> tuple[int, ...]:
        return tuple(sorted({*_ANY, *(_AUTH if self.auth else ()), *(_BODY if self.request else ()), *self.errors}))


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/health", "GET", False, "liveness: 200 ok, 503 while draining (no token)", "Health"),
    Endpoint("/openapi.json", "GET", False, "this document (no token)", "OpenAPI"),
    Endpoint("/v1/info", "GET", True, "method, payload spec, backend, embedding size, limits, gallery size", "Info"),
    Endpoint("/v1/identities", "GET", True, "enrolled identities and their embedding counts", "Identities"),
    Endpoint("/v1/enrol", "POST", True, "enrol every sample of a payload under a name", "Enrolled",
             "EnrolRequest", True, _QUEUED),
    Endpoint("/v1/verify", "POST", True, "one probe against a named identity", "Verified", "VerifyRequest", True,
             (404, *_QUEUED)),
    Endpoint("/v1/identify", "POST", True, "one probe against the gallery: ranked candidates", "Identified",
             "IdentifyRequest", True, _QUEUED),
    Endpoint("/v1/remove", "POST", True, "delete an identity", "Removed", "RemoveRequest", errors=(404,)),
)  # fmt: skip
ROUTES: dict[str, Endpoint] = {e.path: e for e in ENDPOINTS}

_REASONS = {400: "malformed request, payload or framing", 401: "missing or wrong token", 404: "identity not enrolled",
            408: "the body did not arrive in time", 411: "no Content-Length (chunked bodies are refused)",
            413: "body over the size limit", 415: "unsupported Content-Type",
            422: "a well-formed payload with no usable embedding", 500: "internal error (the connection is closed)",
            503: "overloaded, out of connection slots, or draining (Retry-After)"}  # fmt: skip


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict:
    required = list(props) if required is None else required
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False, **extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


_NAME = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN, "description": "identity name (printable)"}
_INT = {"type": "integer", "minimum": 0}

SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": {"type": "string", "description": "what is wrong, in one line"}}),
    "Health": _obj({"status": {"type": "string", "enum": ["ok"]}}),
    "OpenAPI": {"type": "object", "description": "this OpenAPI document"},
    "Info": _obj({
        "method": {"type": "string"}, "schema_version": {"type": "integer"}, "backend": {"type": "string"},
        "embedding_size": _INT,
        "input_spec": {"type": "object", "description": "payload tensor name -> per-sample shape, dtype, range",
                       "additionalProperties": _obj({"shape": {"type": "array", "items": _INT},
                                                     "dtype": {"type": "string"},
                                                     "low": {"type": ["number", "null"]},
                                                     "high": {"type": ["number", "null"]}})},
        "threshold": {"type": "number"}, "max_batch": _INT, "max_request_bytes": _INT,
        "gallery": _obj({"identities": _INT, "embeddings": _INT})}),
    "Identities": _obj({"identities": {"type": "object", "additionalProperties": _INT}}),
    "Tensor": _obj({
        "dtype": {"type": "string", "enum": sorted(wire.WIRE_DTYPES)},
        "shape": {"type": "array", "minItems": 1, "maxItems": wire.MAX_RANK,
                  "items": {"type": "integer", "minimum": 0, "maximum": wire.MAX_ELEMENTS}},
        "data": {"type": "string", "contentEncoding": "base64",
                 "description": "the C-order little-endian bytes, standard base64; exactly what dtype and shape need"}},
        description="one tensor of a protected payload"),
    "Payload": _obj({
        "method": {"type": "string"}, "schema_version": {"type": "integer"},
        "tensors": {"type": "object", "minProperties": 1, "maxProperties": wire.MAX_TENSORS,
                    "additionalProperties": _ref("Tensor"),
                    "description": "tensor name -> tensor, as GET /v1/info's input_spec with a leading batch axis"}},
        description="a protected payload (ppfr.methods.Payload), never an image"),
    "EnrolRequest": _obj({"name": _NAME, "payload": _ref("Payload")}),
    "VerifyRequest": _obj({"name": _NAME, "payload": _ref("Payload")}),
    "IdentifyRequest": _obj({"payload": _ref("Payload"),
                             "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5}},
                            ["payload"]),
    "RemoveRequest": _obj({"name": _NAME}),
    "Enrolled": _obj({"name": {"type": "string"}, "added": _INT, "embeddings": _INT}),
    "Verified": _obj({"name": {"type": "string"}, "score": {"type": "number"}, "match": {"type": "boolean"},
                      "threshold": {"type": "number"}}),
    "Identified": _obj({"candidates": {"type": "array", "items": _obj({"name": {"type": "string"},
                                                                        "score": {"type": "number"}})},
                        "match": {"type": ["string", "null"]}, "threshold": {"type": "number"}}),
    "Removed": _obj({"name": {"type": "string"}, "removed": _INT}),
}  # fmt: skip

_BINARY = {"schema": {"type": "string", "format": "binary"},
           "description": "the binary wire format (ppfr.deploy.wire): b'PPFR', uint32 header length, a msgpack "
                          "header whose 'fields' carry the endpoint's other fields, then the tensors' bytes"}  # fmt: skip


def _operation(e: Endpoint) -> dict:
    op: dict[str, Any] = {"operationId": e.name, "summary": e.summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": _ref(e.response)}}},
        **{str(s): {"description": _REASONS[s], "content": {"application/json": {"schema": _ref("Error")}}}
           for s in e.statuses}}}  # fmt: skip
    if not e.auth:
        op["security"] = []
    if e.request:
        content = {"application/json": {"schema": _ref(e.request)}}
        if e.payload:
            content[wire.CONTENT_TYPE] = _BINARY
        op["requestBody"] = {"required": True, "content": content}
    return op


def openapi() -> dict:
    """The OpenAPI 3.1 document of the endpoints (a fresh dict: callers may change theirs)."""
    paths: dict[str, dict] = {}
    for e in ENDPOINTS:
        paths.setdefault(e.path, {})[e.verb.lower()] = _operation(e)
    return {
        "openapi": "3.1.0",
        "info": {"title": "ppfr recognition server", "version": "1",
                 "description": "enrol / verify / identify protected payloads (never images)"},
        "paths": paths,
        "components": {"schemas": copy.deepcopy(SCHEMAS),
                       "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer",
                                                    "description": "the server's access token"}}},
        "security": [{BEARER: []}],
    }  # fmt: skip


def read_token(token: str | None, token_file: str | None) -> str:
    """--token, else --token-file (first line), else $PPFR_TOKEN; an error if none is given."""
    if token and token_file:
        raise SystemExit("give --token or --token-file, not both")
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SystemExit(f"cannot read --token-file: {exc}") from None
    token = token or os.environ.get("PPFR_TOKEN", "")
    if not token:
        raise SystemExit("an access token is required: --token-file FILE (preferred), --token or $PPFR_TOKEN")
    return token
