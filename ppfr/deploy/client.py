"""The recognition client SDK: protect faces locally, send only the payload; ``ppfr client``.

The client loads the method from the trained ``model.pt`` (its client half: the frequency transform, DuetFace's and
PRO-Face C's client networks), reads aligned 112x112 RGB faces, runs ``method.protect`` and sends the resulting
payload to ``ppfr serve``. The image never leaves the machine (except for the unprotected ``arcface`` baseline,
whose payload *is* the image).

Wire formats (no pickle anywhere). The client sends the binary format of ``ppfr.deploy.wire`` by default
(``Content-Type: application/x-ppfr``: a msgpack header, then the tensors' raw little-endian bytes; optionally
float16 or int8 encoded, ``Client(..., encoding=)``). The server also accepts the older JSON format, which
``Client(..., wire="json")`` sends; its codec (``encode_payload`` / ``decode_payload``, re-exported here) is
``ppfr.deploy.protocol``'s. Answers are JSON in both cases.

Randomness: PartialFace draws a random rank per image and MinusFace a random shuffle; that randomness is part of
the protection. ``Client``/``protect_images`` therefore seed ``protect`` from the OS (``secrets``) unless a seed is
given. A fixed seed makes payloads reproducible (tests, benchmarks) and should not be used in deployment.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ppfr.deploy import wire as wirefmt
from ppfr.deploy.api import read_token
from ppfr.deploy.protocol import (  # the JSON codec, re-exported: part of the SDK
    MAX_RANK, WIRE_DTYPES, WireError, decode_payload, decode_tensor, encode_payload, encode_tensor, read_payload,
    read_tensor,
)  # fmt: skip

__all__ = ["Client", "ServerError", "WireError", "decode_payload", "decode_tensor", "encode_payload",
           "encode_tensor", "protect_images", "read_faces", "read_payload", "read_tensor", "read_token", "WIRE_DTYPES",
           "MAX_RANK"]


# ------------------------------------------------------------------------------------------------ images
def read_faces(paths: list[str | Path], size: int = 112) -> Any:
    """Aligned RGB faces -> (N, 3, size, size) float32 torch tensor in [-1, 1].

    Faces must already be aligned crops of ``size`` x ``size`` (the 5-point ArcFace template); they are not resized,
    since a resize of an unaligned photo would silently give meaningless embeddings.
    """
    import torch
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    raise ValueError(f"{p}: expected an aligned {size}x{size} face, got {im.size[0]}x{im.size[1]}")
                arr = np.asarray(im, dtype=np.float32)
        except OSError as exc:
            raise ValueError(f"{p}: cannot read the image ({exc})") from None
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1)
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)


def protect_images(method: Any, images: Any, seed: int | None = None) -> Any:
    """``method.protect`` in inference mode with an explicit generator: seeded from the OS unless ``seed`` is given.

    (torch's default generator starts from the same seed in every process, so relying on it would give every
    client the same PartialFace ranks / MinusFace shuffles.)
    """
    import torch

    g = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
    with torch.inference_mode():
        return method.protect(images, generator=g)


# ------------------------------------------------------------------------------------------------- client
class ServerError(RuntimeError):
    """The server answered with an error status; ``status`` is the HTTP code, the message the server's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # http.client sends a large body after the headers in separate writes: with Nagle on, the body's last
        # segment waits for the server's delayed ACK (~40 ms per request).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Client:
    """HTTP client of ``ppfr serve``. Thread-safe: each thread keeps its own keep-alive connection.

    ``Client(url, token).enrol(name, payload)`` where ``payload`` is a ``Payload`` (from ``method.protect``), sent in
    the binary wire format (``wire="binary"``, the default; ``encoding`` ``raw`` | ``float16`` | ``int8``, see
    ``ppfr.deploy.wire``) or as JSON (``wire="json"``, lossless only); an already encoded JSON wire object (a dict)
    is sent as JSON. ``spec``: the method's ``payload_spec``, so that int8 stays inside its value range. Errors
    raise ServerError with the server's message.
    """

    def __init__(self, url: str, token: str, timeout: float = 60.0, wire: str = "binary", encoding: str = "raw",
                 spec: dict | None = None) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must be http(s)://host:port, got {url!r}")
        if wire not in ("binary", "json"):
            raise ValueError(f"wire must be 'binary' or 'json', got {wire!r}")
        if encoding not in wirefmt.ENCODINGS:
            raise ValueError(f"encoding must be one of {wirefmt.ENCODINGS}, got {encoding!r}")
        if wire == "json" and encoding != "raw":
            raise ValueError("the JSON wire format is lossless only: use wire='binary' for float16 / int8")
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.wire, self.encoding, self.spec = wire, encoding, spec
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = _HTTPSConnection if self.scheme == "https" else _HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.used = False
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, body: dict | bytes | None = None, auth: bool = True,
                content_type: str = "application/json") -> dict:  # fmt: skip
        """One request (``body``: an object sent as JSON, or bytes already encoded as ``content_type``, e.g. to
        send one probe many times); returns the decoded JSON answer or raises ServerError."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            conn = self._conn()
            reused = self._local.used
            try:
                try:
                    conn.request(method, self.prefix + path, body=data, headers=headers)
                except (BrokenPipeError, ConnectionResetError) as send_error:
                    # The server may refuse a request (413) before reading its body and close: its answer can
                    # still be waiting in the socket, and says more than "broken pipe".
                    try:
                        resp = conn.getresponse()
                    except Exception:
                        raise send_error from None
                else:
                    resp = conn.getresponse()
                raw = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                # A kept-alive connection the server already closed (idle timeout): the request was never
                # processed, so sending it once more on a fresh connection is safe. A fresh one failing is real.
                if reused and attempt == 0:
                    continue
                raise
            except Exception:
                self.close()
                raise
            self._local.used = True
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            break
        try:
            answer = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            answer = {"error": raw[:200].decode("utf-8", "replace")}
        if resp.status >= 400:
            raise ServerError(resp.status, answer.get("error", "") if isinstance(answer, dict) else str(answer))
        return answer

    def encode(self, payload: Any, **fields: Any) -> tuple[bytes, str]:
        """(request body, content type) for ``payload`` plus the endpoint's other fields, in this client's wire
        format; a dict payload (an encoded JSON wire object) always goes as JSON."""
        if isinstance(payload, dict) or self.wire == "json":
            obj = {**fields, "payload": payload if isinstance(payload, dict) else encode_payload(payload)}
            return json.dumps(obj, separators=(",", ":")).encode(), "application/json"
        return wirefmt.encode_payload_message(payload, fields, self.encoding, spec=self.spec), wirefmt.CONTENT_TYPE

    def _post_payload(self, path: str, payload: Any, **fields: Any) -> dict:
        data, ctype = self.encode(payload, **fields)
        return self.request("POST", path, data, content_type=ctype)

    def health(self) -> dict:
        return self.request("GET", "/health", auth=False)

    def info(self) -> dict:
        return self.request("GET", "/v1/info")

    def identities(self) -> dict[str, int]:
        return self.request("GET", "/v1/identities")["identities"]

    def enrol(self, name: str, payload: Any) -> dict:
        """Add every sample of ``payload`` as an embedding of ``name``: {"name", "added", "embeddings"}."""
        return self._post_payload("/v1/enrol", payload, name=name)

    def verify(self, name: str, payload: Any) -> dict:
        """One probe against ``name``: {"name", "score", "match", "threshold"}."""
        return self._post_payload("/v1/verify", payload, name=name)

    def identify(self, payload: Any, top_k: int = 5) -> dict:
        """One probe against the gallery: {"candidates": [{"name", "score"}...], "match", "threshold"}."""
        return self._post_payload("/v1/identify", payload, top_k=top_k)

    def remove(self, name: str) -> dict:
        return self.request("POST", "/v1/remove", {"name": name})


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ppfr client",
                                 description="protect local faces and send only the payload to a ppfr server")
    ap.add_argument("model", help="the model the server runs: runs/<name>/model.pt, a run folder, or "
                                  "method:NAME[:key=value,...] (the client half of the method is loaded from it)")
    ap.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--token", default=None, help="access token (visible in the process list; prefer --token-file)")
    ap.add_argument("--token-file", default=None, help="file whose first line is the access token")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed protect's randomness (reproducible payloads; for tests only, weakens protection)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--wire", default="binary", choices=["binary", "json"],
                    help="request format: binary (msgpack header + raw bytes, default) or the older JSON + base64")
    ap.add_argument("--encoding", default="raw", choices=list(wirefmt.ENCODINGS),
                    help="payload encoding of the binary format: raw (lossless), float16 or int8 (smaller; "
                         "see docs/deploy.md for their accuracy cost)")
    cmd = ap.add_subparsers(dest="action", required=True)
    p = cmd.add_parser("enrol", help="enrol aligned 112x112 face image(s) under NAME")
    p.add_argument("name")
    p.add_argument("images", nargs="+")
    p = cmd.add_parser("verify", help="is IMAGE the enrolled identity NAME?")
    p.add_argument("name")
    p.add_argument("image")
    p = cmd.add_parser("identify", help="rank the enrolled identities for IMAGE")
    p.add_argument("image")
    p.add_argument("--top-k", type=int, default=5)
    cmd.add_parser("list", help="list the enrolled identities")
    p = cmd.add_parser("remove", help="delete an enrolled identity")
    p.add_argument("name")
    args = ap.parse_args(argv)

    from ppfr.methods.spec import SpecError, load_model
    from ppfr.models.checkpoints import CheckpointError

    if args.wire == "json" and args.encoding != "raw":
        print("ppfr client: --encoding float16 / int8 needs --wire binary", file=sys.stderr)
        return 2
    client = Client(args.server, read_token(args.token, args.token_file), timeout=args.timeout, wire=args.wire,
                    encoding=args.encoding)  # fmt: skip
    try:
        if args.action in ("list", "remove"):
            out = client.identities() if args.action == "list" else client.remove(args.name)
        else:
            try:
                method, _ = load_model(args.model)
            except (CheckpointError, SpecError) as exc:
                print(f"ppfr client: {exc}", file=sys.stderr)
                return 2
            client.spec = method.payload_spec
            size = getattr(method.options, "image_size", 112)
            paths = args.images if args.action == "enrol" else [args.image]
            try:
                payload = protect_images(method, read_faces(paths, size), args.seed)
            except ValueError as exc:
                print(f"ppfr client: {exc}", file=sys.stderr)
                return 2
            if args.action == "enrol":
                out = client.enrol(args.name, payload)
            elif args.action == "verify":
                out = client.verify(args.name, payload)
            else:
                out = client.identify(payload, args.top_k)
    except ServerError as exc:
        print(f"ppfr client: server refused: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ppfr client: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0
