"""Serving throughput and latency of ``ppfr serve`` on loopback: runners (ONNX Runtime vs eager PyTorch on the CPU),
HTTP stacks (FastAPI + uvicorn vs the stdlib server) and wire formats (JSON + base64 vs binary raw / float16 / int8).

The model is ``configs/partialface_tiny.yaml``'s method (untrained weights: speed does not depend on them). One
round = ``LOADS[load]`` concurrent keep-alive clients each sending ``REQUESTS`` identify requests (one protected
face each) to a real server with the default batching (``max_batch`` 32, ``max_delay_ms`` 5) and a gallery of 100
identities. Recorded per case: requests/s (the ``img/s`` column of the summary: one image per request) and p50 /
p99 request latency over every request of the timed rounds (printed in their own section and stored in
``extra_info``), and the request's bytes on the wire.

* ``test_serving_throughput``: runner x load on the default stack and wire (asgi, binary raw). ``single`` is one
  client (latency without batching); ``concurrent`` is 4 clients.
* ``test_serving_wire``: eager runner, one client, stack x wire format.

Clients send a pre-encoded request: they share the process, so their encoding would otherwise compete with the
server for the GIL. Both runners get the same intra-op thread count (torch's) so the comparison is of the
runtimes, not of threads.

``python -m benchmarks.bench_serving PAIRS_FILE MODEL.pt ...`` prints the accuracy table of the payload encodings
(``encoding_accuracy``) that docs/deploy.md quotes.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.conftest import measure, require_ratio
from ppfr.deploy.client import Client, encode_payload, protect_images
from ppfr.deploy.gallery import open_gallery
from ppfr.deploy.server import RecognitionServer, ServeConfig
from ppfr.methods import build_method
from ppfr.train.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "partialface_tiny.yaml"
TOKEN = "bench-token"
REQUESTS = 16  # per client per round
LOADS = {"single": 1, "concurrent": 4}
LATENCY: dict[tuple[str, str], dict] = {}

# A loose bound: serving figures are noisy on a shared 2-core machine (measured ratios 0.7-1.4x over four runs),
# but an exported graph serving at half the eager rate means it runs unoptimised or on a slow fallback path.
require_ratio("serving, one client: onnxruntime vs eager", "serve_single", "onnxruntime", "serve_single", "eager", 0.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(method, model.pt path, onnx path): the tiny config's method saved as ``ppfr train`` does, and exported."""
    from ppfr.deploy.export import export_onnx

    cfg = load_config(CONFIG, [])
    torch.manual_seed(0)
    method = build_method(cfg.method, **cfg.method_options).eval()
    d = tmp_path_factory.mktemp("serving")
    pt = d / "model.pt"
    torch.save({"model": method.state_dict(), "method": cfg.method, "method_options": dict(cfg.method_options)}, pt)
    return method, pt, export_onnx(method, d / "server.onnx")


@pytest.fixture(scope="module", autouse=True)
def latency_table(request):
    """Print p50/p99 after the run (the shared summary prints throughput only). Registered as a config cleanup:
    it runs after output capture has ended, so the lines reach the terminal."""

    def show():
        if not LATENCY:
            return
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        tr.section("ppfr serving latency (loopback, identify, every request of the timed rounds)")
        for (load, provider), v in sorted(LATENCY.items()):
            tr.write_line(f"{load:<11} {provider:<12} {v['requests_per_s']:8.1f} req/s   p50 {v['p50_ms']:7.1f} ms   "
                          f"p99 {v['p99_ms']:7.1f} ms   {v['samples_per_batch']:.1f} samples/batch   "
                          f"{v['request_bytes']} B/request")  # fmt: skip

    request.config.add_cleanup(show)
    yield


def _bench(benchmark, method, runner, tmp_path, *, case: str, provider: str, n_clients: int, stack: str,
           fmt: str, key: tuple[str, str]) -> None:  # fmt: skip
    from ppfr.deploy import wire
    from ppfr.deploy.server.asgi import AsgiServer

    gen = torch.Generator().manual_seed(0)
    faces = torch.rand(100, 3, 112, 112, generator=gen) * 2 - 1
    emb = runner.run({"dct": protect_images(method, faces, seed=0).tensors["dct"].numpy()})
    probe = protect_images(method, faces[:1], seed=1)
    # the request is encoded once: the figures are the server's, not the (in-process, GIL-sharing) clients'
    if fmt == "json":
        body, ctype = json.dumps({"payload": encode_payload(probe), "top_k": 5}).encode(), "application/json"
    else:
        body, ctype = wire.encode_payload_message(probe, {"top_k": 5}, fmt, spec=method.payload_spec), wire.CONTENT_TYPE
    cls = AsgiServer if stack == "asgi" else RecognitionServer
    # the store a server runs on (sqlite + flat faiss index), fresh per case
    gallery = open_gallery(tmp_path / f"gallery_{case}_{provider}", runner.method, runner.embedding_size)
    with cls(runner, gallery, TOKEN, config=ServeConfig()) as srv:
        srv.service.gallery.enrol_many([(f"id{i:03d}", emb[i:i + 1]) for i in range(len(emb))])
        clients = [Client(srv.url, TOKEN) for _ in range(n_clients)]
        latencies: list[float] = []

        def one_client(c: Client) -> list[float]:
            out = []
            for _ in range(REQUESTS):
                t0 = time.perf_counter()
                assert c.request("POST", "/v1/identify", body, content_type=ctype)["candidates"], "empty answer"
                out.append(time.perf_counter() - t0)
            return out

        pool = ThreadPoolExecutor(n_clients)

        def round_():
            for lat in pool.map(one_client, clients):
                latencies.extend(lat)

        worker = srv.service.worker
        total, rounds = n_clients * REQUESTS, 3
        info = measure(benchmark, round_, case=case, provider=provider, images=total, bytes_written=0,
                       bytes_read=total * len(body), dev=torch.device("cpu"), rounds=rounds)  # fmt: skip
        pool.shutdown()
        for c in clients:
            c.close()
    if "seconds" in info:
        lat = np.asarray(latencies[-rounds * total:]) * 1e3  # the timed rounds (measure's warm-up round excluded)
        extra = {"requests_per_s": info["images_per_s"], "p50_ms": float(np.percentile(lat, 50)),
                 "p99_ms": float(np.percentile(lat, 99)), "request_bytes": len(body),
                 "samples_per_batch": worker.samples / max(worker.batches, 1)}  # fmt: skip
        info.update(extra)
        benchmark.extra_info.update(extra)
        LATENCY[key] = extra


@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("provider", ["eager", "onnxruntime"])
def test_serving_throughput(benchmark, model, provider, load, tmp_path):
    from ppfr.deploy.runtime import load_runner

    method, pt, onnx_path = model
    threads = torch.get_num_threads()
    runner = (load_runner(pt, backend="eager") if provider == "eager"
              else load_runner(onnx_path, backend="onnxruntime", threads=threads))  # fmt: skip
    _bench(benchmark, method, runner, tmp_path, case=f"serve_{load}", provider=provider, n_clients=LOADS[load],
           stack="asgi", fmt="raw", key=(load, provider))  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "raw", "float16", "int8"])
@pytest.mark.parametrize("stack", ["asgi", "stdlib"])
def test_serving_wire(benchmark, model, stack, fmt, tmp_path):
    from ppfr.deploy.runtime import load_runner

    method, pt, _ = model
    _bench(benchmark, method, load_runner(pt, backend="eager"), tmp_path, case=f"serve_wire_{stack}", provider=fmt,
           n_clients=1, stack=stack, fmt=fmt, key=(f"wire {stack}", fmt))  # fmt: skip


# ------------------------------------------------------------------------------- payload encodings: accuracy
def encoding_accuracy(model_pt: str | Path, pairs_file: str | Path,
                      encodings: tuple[str, ...] = ("raw", "float16", "int8"), batch_size: int = 32, seed: int = 0,
                      per_request: bool = True) -> dict[str, dict]:  # fmt: skip
    """Verification accuracy of a trained model on a pair list when its payloads cross the binary wire with each
    encoding. Every image is protected once (seeded), then encoded / decoded with every encoding and embedded by
    the eager runner, so the encodings see identical payloads and differ only by the wire's rounding.

    per_request: every face is its own message, as the client sends a probe (int8 scales fitted to one face);
    False: one message per batch of ``batch_size`` faces (an enrolment of that many faces in one request: int8's
    per-channel scales then span the whole batch, a coarser grid).

    Returns {encoding: {"accuracy", "std", "auc", "bytes" (per sample), "cos_min", "cos_mean"}}: the cosines are
    between each image's embedding through that encoding and through ``raw`` (1 = unchanged).
    """
    from ppfr.deploy import wire
    from ppfr.deploy.runtime import load_runner
    from ppfr.eval.verification import embed_source, open_pairs, ten_fold
    from ppfr.methods import load_method

    method = load_method(model_pt).eval()
    runner = load_runner(model_pt, backend="eager")
    sizes = dict.fromkeys(encodings, 0)
    calls = [0]

    def embed(images: torch.Tensor) -> torch.Tensor:
        payload = protect_images(method, images, seed=seed + calls[0])
        calls[0] += 1
        outs = []
        n = len(images)
        parts = ([type(payload)(payload.method, {k: v[i:i + 1] for k, v in payload.tensors.items()},
                                payload.schema_version) for i in range(n)] if per_request else [payload])  # fmt: skip
        for enc in encodings:
            decoded: dict[str, list[np.ndarray]] = {}
            for part in parts:
                msg = wire.encode_payload_message(part, None, enc, spec=method.payload_spec)
                sizes[enc] += len(msg)
                for k, v in wire.decode_message(msg)[2].items():
                    decoded.setdefault(k, []).append(v)
            tensors = {k: np.concatenate(v) for k, v in decoded.items()}
            outs.append(torch.from_numpy(runner.run(tensors)))  # (B, D) unit rows
        # one (B, len(encodings) * D) row of unit blocks: embed_source's normalisation scales every block alike
        return torch.cat(outs, dim=1)

    src, pairs = open_pairs(str(pairs_file))
    emb, ok = embed_source(embed, src, batch_size=batch_size)
    assert ok.all(), f"{int((~ok).sum())} unreadable images"
    blocks = torch.nn.functional.normalize(emb.reshape(len(emb), len(encodings), -1), dim=2).double()
    same, folds = pairs[:, 1].astype(bool), pairs[:, 0]
    out = {}
    for i, enc in enumerate(encodings):
        e = blocks[:, i]
        sims = (e[pairs[:, 2]] * e[pairs[:, 3]]).sum(1).numpy()
        r = ten_fold(sims, same, folds)
        cos = (e * blocks[:, 0]).sum(1).numpy()
        out[enc] = {"accuracy": r.accuracy, "std": r.std, "auc": r.auc, "bytes": sizes[enc] / len(src),
                    "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}  # fmt: skip
    return out


if __name__ == "__main__":
    # python -m benchmarks.bench_serving PAIRS_FILE MODEL.pt [MODEL.pt ...]: one line per method/encoding (the docs'
    # table), every face its own request
    import sys

    pairs_path = Path(sys.argv[1])
    print("| method | encoding | bytes / face | accuracy | AUC | cos to raw (min / mean) |")
    print("|---|---|---|---|---|---|")
    for pt in map(Path, sys.argv[2:]):
        for enc, r in encoding_accuracy(pt, pairs_path).items():
            print(f"| {pt.parent.name} | {enc} | {r['bytes']:.0f} | "
                  f"{r['accuracy'] * 100:.2f} ± {r['std'] * 100:.2f} % | {r['auc']:.4f} | "
                  f"{r['cos_min']:.5f} / {r['cos_mean']:.6f} |", flush=True)  # fmt: skip
