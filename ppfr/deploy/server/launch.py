"""``ppfr serve``: the command line, and starting either stack: the stdlib ``RecognitionServer`` in this process,
or uvicorn over the ASGI app in this process (``--workers 1``) or in N worker processes sharing one listening socket
and the gallery.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import sys
from typing import Any

from ppfr.deploy.api import read_token
from ppfr.deploy.gallery import GalleryError
from ppfr.deploy.server.config import DEFAULT_THRESHOLD, ServeConfig, log
from ppfr.deploy.server.service import RecognitionService, open_server_gallery
from ppfr.deploy.server.stdlib import RecognitionServer


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="ppfr serve", description="serve a trained or exported method over HTTP")
    ap.add_argument("model", nargs="?", default=None,
                    help="model.pt or its run folder, method:NAME[:key=value,...] (untrained, the fixed seed of every "
                         "verb), or an exported .onnx / .engine (ppfr export); --backend auto runs the fastest "
                         "available (docs/deploy.md)")
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

    from ppfr.deploy.runtime import load_runner

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

    from ppfr.deploy.server import asgi as app_module

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

        uv = app_module.uvicorn_config("ppfr.deploy.server.asgi:app_from_env", config,
                                       "ppfr.deploy.server.asgi:GuardedH11Protocol", workers=args.workers,
                                       log_level=args.log_level, factory=True)  # fmt: skip
        print(f"ppfr serve: {what}, gallery {args.gallery} ({desc}), asgi, "
              f"{args.workers} workers, listening on {url}", flush=True)  # fmt: skip
        Multiprocess(uv, sockets=[sock]).run()
    sock.close()
    print("ppfr serve: stopped", flush=True)
    return 0
