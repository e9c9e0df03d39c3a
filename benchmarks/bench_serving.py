"""Serving throughput and latency of ``ppfr serve`` on loopback: ONNX Runtime vs eager PyTorch runner on the CPU.

The model is ``configs/partialface_tiny.yaml``'s method (untrained weights: speed does not depend on them). One
round = ``LOADS[load]`` concurrent keep-alive clients each sending ``REQUESTS`` identify requests (one protected
face each, 1.8 MB of base64) to a real server with the default batching (``max_batch`` 32, ``max_delay_ms`` 5) and
a gallery of 100 identities. Recorded per case: requests/s (the ``img/s`` column of the summary: one image per
request) and p50 / p99 request latency over every request of the timed rounds (printed in their own section and
stored in ``extra_info``). ``single`` is one client (latency without batching); ``concurrent`` is 4 clients.
Clients send a pre-encoded request: they share the process, so their JSON encoding would otherwise compete with
the server for the GIL.

Both runners get the same intra-op thread count (torch's) so the comparison is of the runtimes, not of threads.
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
from ppfr.deploy.serve import RecognitionServer, ServeConfig
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
                          f"p99 {v['p99_ms']:7.1f} ms   {v['samples_per_batch']:.1f} samples/batch")  # fmt: skip

    request.config.add_cleanup(show)
    yield


@pytest.mark.parametrize("load", list(LOADS))
@pytest.mark.parametrize("provider", ["eager", "onnxruntime"])
def test_serving_throughput(benchmark, model, provider, load, tmp_path):
    from ppfr.deploy.runner import load_runner

    method, pt, onnx_path = model
    threads = torch.get_num_threads()
    runner = (load_runner(pt, backend="eager") if provider == "eager"
              else load_runner(onnx_path, backend="onnxruntime", threads=threads))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    faces = torch.rand(100, 3, 112, 112, generator=gen) * 2 - 1
    emb = runner.run({"dct": protect_images(method, faces, seed=0).tensors["dct"].numpy()})
    # the request is encoded once: the figures are the server's, not the (in-process, GIL-sharing) clients' JSON
    body = json.dumps({"payload": encode_payload(protect_images(method, faces[:1], seed=1)), "top_k": 5}).encode()
    n_clients = LOADS[load]
    with RecognitionServer(runner, tmp_path / "g", TOKEN, config=ServeConfig()) as srv:
        srv.service.gallery.enrol_many([(f"id{i:03d}", emb[i:i + 1]) for i in range(len(emb))])
        clients = [Client(srv.url, TOKEN) for _ in range(n_clients)]
        latencies: list[float] = []

        def one_client(c: Client) -> list[float]:
            out = []
            for _ in range(REQUESTS):
                t0 = time.perf_counter()
                assert c.request("POST", "/v1/identify", body)["candidates"], "empty answer"
                out.append(time.perf_counter() - t0)
            return out

        pool = ThreadPoolExecutor(n_clients)

        def round_():
            for lat in pool.map(one_client, clients):
                latencies.extend(lat)

        worker = srv.service.worker
        total, rounds = n_clients * REQUESTS, 3
        info = measure(benchmark, round_, case=f"serve_{load}", provider=provider, images=total, bytes_written=0,
                       bytes_read=total * len(body), dev=torch.device("cpu"), rounds=rounds)  # fmt: skip
        pool.shutdown()
        for c in clients:
            c.close()
    if "seconds" in info:
        lat = np.asarray(latencies[-rounds * total:]) * 1e3  # the timed rounds (measure's warm-up round excluded)
        extra = {"requests_per_s": info["images_per_s"], "p50_ms": float(np.percentile(lat, 50)),
                 "p99_ms": float(np.percentile(lat, 99)),
                 "samples_per_batch": worker.samples / max(worker.batches, 1)}  # fmt: skip
        info.update(extra)
        benchmark.extra_info.update(extra)
        LATENCY[(load, provider)] = extra
