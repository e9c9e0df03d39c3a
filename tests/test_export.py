"""Tests of ppfr.deploy: ONNX export + parity, metadata, runners and their selection, Triton repositories, TensorRT.

Small models throughout (IR-18 at base width 16 as in configs/*_tiny.yaml; MinusFace's U-Net at width 8). Each graph
is exported once per module (module-scoped caches) so the file stays well inside its time budget.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

import ppfr
import ppfr.cli
from ppfr._backend import BackendUnavailableError
from ppfr.data.synthetic import synthetic_faces
from ppfr.deploy.export import metadata as meta
from ppfr.deploy.export import (
    ExportError, check_parity, export_mode, export_onnx, graph_io, load_source, random_inputs, read_onnx_metadata,
    sample_inputs,
)  # fmt: skip
from ppfr.deploy.runtime import EagerRunner, OnnxRuntimeRunner, load_client_runner, load_runner, validate_inputs
from ppfr.methods import build_method

TOL = 1e-4  # max abs difference of L2-normalised embeddings, eager vs ONNX Runtime
TINY = {"depth": 18, "width": 16}
OPTS = {
    "arcface": TINY, "arcface_fd": TINY, "partialface": TINY, "duetface": dict(TINY, roi="none"),
    "minusface": dict(TINY, gen_width=8), "profacec": dict(TINY, server_bgr=True),
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for torch and ONNX Runtime: on the shared 2-core machine, spinning thread pools of
    several processes slow every one of them down far more than one thread each does."""
    from ppfr.deploy.runtime import runners as runner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = runner._OrtSession.__init__

    def init(self, path, providers=None, threads=None):
        original(self, path, providers, threads or 1)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner._OrtSession, "__init__", init)
        yield
    torch.set_num_threads(threads)


def _build(name: str):
    torch.manual_seed(0)
    m = build_method(name, **OPTS[name]).eval()
    if name == "duetface":  # w = 0 at init would make the interactive mask a no-op: give it weight
        m.mask_weights.data.copy_(torch.tensor([0.7, -0.5, 0.9, 0.4]))
    if name == "profacec":  # keys start at 1: make them non-trivial so the compensation path is exercised
        for k in m.keys:
            k.data.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, part) -> (method, onnx path), exported on first use."""
    root = tmp_path_factory.mktemp("onnx")
    cache: dict = {}

    def get(name: str, part: str = "server"):
        if (name, "method") not in cache:
            cache[(name, "method")] = _build(name)
        m = cache[(name, "method")]
        if (name, part) not in cache:
            cache[(name, part)] = export_onnx(m, root / f"{name}.{part}.onnx", part=part, source=f"test:{name}",
                                              source_sha256="0" * 64)  # fmt: skip
        return m, cache[(name, part)]

    return get


def _checkpoint(tmp_path, name="partialface", seed=0, sub="run"):
    torch.manual_seed(seed)
    m = build_method(name, **OPTS[name])
    path = tmp_path / sub / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "method": name, "method_options": dataclasses.asdict(m.options),
                "config": {}}, path)  # fmt: skip
    return path


def _np(d):
    return {k: v.detach().cpu().numpy() for k, v in d.items()}


# ------------------------------------------------------------------------------------------------ ONNX parity
@pytest.mark.parametrize("name", sorted(OPTS))
def test_server_onnx_parity(exported, name):
    import onnx

    m, path = exported(name)
    parity = check_parity(m, path, batch_sizes=(1, 8))
    print(f"{name} server parity {parity}")
    assert set(parity) == {1, 8} and max(parity.values()) < TOL, parity
    model = onnx.load(str(path))
    # standard ONNX only: no ppfr:: custom-op nodes survived export mode
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, {n.op_type for n in model.graph.node if n.domain}
    assert [i.name for i in model.graph.input] == list(m.payload_spec)
    assert [o.name for o in model.graph.output] == ["embedding"]
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", f"{vi.name}: batch axis is not dynamic"
        expect = m.payload_spec[vi.name].shape if vi.name in m.payload_spec else (512,)
        assert tuple(d.dim_value for d in dims[1:]) == tuple(expect)


def test_duetface_parity_with_nonuniform_roi(exported):
    """The ROI enters the server's min-max mask: an all-ones ROI (roi='none') would leave that path untested."""
    m, path = exported("duetface")
    ort = OnnxRuntimeRunner(path)
    eager = EagerRunner(m)
    x = _np(random_inputs(m.payload_spec, 8, seed=3))
    assert x["roi"].min() >= 0 and x["roi"].max() <= 1 and x["roi"].std() > 0.1
    assert np.abs(ort.run(x) - eager.run(x)).max() < TOL


@pytest.mark.parametrize("name", ["duetface", "profacec"])
def test_client_onnx_parity(exported, name):
    m, path = exported(name, "client")
    parity = check_parity(m, path, batch_sizes=(1, 8), part="client")
    print(f"{name} client parity {parity}")
    assert max(parity.values()) < TOL, parity
    spec, outputs = graph_io(m, "client")
    meta_ = read_onnx_metadata(path)
    assert meta_["ppfr_part"] == "client" and meta.spec_from_json(meta_["ppfr_input_spec"]) == spec
    # the client maps are exactly the payload's maps (same names and shapes as the server's inputs)
    assert {k: tuple(v.shape) for k, v in m.payload_spec.items() if k in outputs} == outputs
    # the ONNX client runner on the client input reproduces the maps of the protect() pipeline it was split from
    runner = load_client_runner(path)
    x = sample_inputs(m, "client", 2, seed=5)
    got = runner.run(_np(x))
    images = synthetic_faces(2, seed=5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        payload = m.protect(images, generator=g).tensors
    for k in outputs:
        ref = payload[k].numpy()
        assert np.abs(got[k] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), k


def test_profacec_client_with_pruning_and_int8(tmp_path):
    """Pruning (a TopK threshold) and 8-bit fake quantization stay in the exported client graph. Both are
    discontinuous: a 1e-7 difference upstream may flip an element across the threshold or a rounding boundary, so
    the graphs must agree everywhere but at a tiny fraction of elements."""
    torch.manual_seed(0)
    m = build_method("profacec", **dict(TINY, keep_ratio=0.3, bits=8)).eval()
    path = export_onnx(m, tmp_path / "client.onnx", part="client")
    mismatch = check_parity(m, path, batch_sizes=(8,), part="client", metric="mismatch")
    assert max(mismatch.values()) < 1e-3, mismatch
    out = load_client_runner(path).run(_np(sample_inputs(m, "client", 2)))
    kept = (out["aux1"].reshape(2, -1) != 0).mean(axis=1)
    assert np.all(kept <= 0.31) and np.all(kept > 0.2)  # keep_ratio 0.3 (minus values quantized to 0)
    with pytest.raises(ExportError, match="bits=4"):
        export_onnx(build_method("profacec", **dict(TINY, bits=4)), tmp_path / "c4.onnx", part="client")


def test_client_part_refused_without_client_network(exported):
    m, _ = exported("arcface")
    with pytest.raises(ExportError, match="no client network"):
        export_onnx(m, "unused.onnx", part="client")
    with pytest.raises(ValueError, match="part must be"):
        graph_io(m, "middle")


def test_random_per_forward_interface_is_refused(tmp_path):
    m = build_method("duetface", **dict(OPTS["duetface"], interface="random_per_forward")).eval()
    with pytest.raises(ExportError, match="random_per_forward"):
        export_onnx(m, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_mode_swaps_ops_and_restores(monkeypatch):
    from ppfr.ops import block_shuffle, freq

    monkeypatch.setenv("PPFR_BACKEND", "cpp")
    original = freq._freq_encode_op
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with export_mode():
        assert freq._freq_encode_op is not original and not hasattr(block_shuffle._block_shuffle_op, "_init_fn")
        plain = ppfr.freq_encode(x)  # auto -> the torch body, no custom op in a trace
        with pytest.raises(ExportError, match="native kernel"):
            ppfr.freq_encode(x, backend="cpp")
    assert freq._freq_encode_op is original and hasattr(block_shuffle._block_shuffle_op, "_init_fn")
    import os

    assert os.environ["PPFR_BACKEND"] == "cpp"
    torch.testing.assert_close(plain, ppfr.freq_encode(x, backend="ref"), atol=2e-3, rtol=1e-5)


def test_metadata_round_trip(exported):
    m, path = exported("profacec")
    props = read_onnx_metadata(path)
    assert props["ppfr_version"] == ppfr.__version__
    assert props["ppfr_method"] == "profacec" and props["ppfr_part"] == "server"
    assert props["ppfr_opset"] == "17" and props["ppfr_source"] == "test:profacec"
    assert meta.spec_from_json(props["ppfr_input_spec"]) == m.payload_spec  # shapes, dtypes and ranges
    assert meta.outputs_from_json(props["ppfr_output"]) == {"embedding": (512,)}
    assert json.loads(props["ppfr_method_options"])["server_bgr"] is True
    r = load_runner(path)
    assert (r.backend, r.method, r.embedding_size) == ("onnxruntime", "profacec", 512)
    assert r.input_spec == m.payload_spec and list(r.input_spec) == list(m.payload_spec)
    with pytest.raises(ValueError, match="malformed"):
        meta.spec_from_json('[{"name": "x"}]')


# ------------------------------------------------------------------------------------------------ runners
def test_runner_selection_and_parity(tmp_path, monkeypatch):
    monkeypatch.setenv("PPFR_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = _checkpoint(tmp_path)
    auto = load_runner(ckpt)
    # no TensorRT engine here: auto exports once into the cache and runs it with onnxruntime
    assert auto.backend == "onnxruntime" and str(tmp_path / "cache") in auto.source
    eager = load_runner(ckpt, "eager")
    assert isinstance(eager, EagerRunner) and eager.method == "partialface"
    m, _ = load_source(ckpt)
    x = _np(sample_inputs(m, "server", 4, seed=1))
    a, e = auto.run(x), eager.run(x)
    assert a.shape == (4, 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - e).max() < TOL
    again = load_runner(ckpt, "onnxruntime")
    assert again.source == auto.source  # the cached export is reused, not redone

    # an export next to the checkpoint (ppfr export's default --out) is preferred while it matches the checkpoint
    assert ppfr.cli.main(["export", str(ckpt), "--format", "onnx", "--no-verify"]) == 0
    sibling = ckpt.parent / "export" / "server.onnx"
    assert load_runner(ckpt).source == str(sibling)
    # ... and ignored once the checkpoint changed (a stale export of older weights)
    _checkpoint(tmp_path, seed=1)
    fresh = load_runner(ckpt)
    assert fresh.source != str(sibling) and np.abs(fresh.run(x) - load_runner(ckpt, "eager").run(x)).max() < TOL
    assert np.abs(fresh.run(x) - a).max() > 1e-2  # new weights, new embeddings

    # an .onnx path runs on onnxruntime; eager cannot run a graph file
    assert load_runner(sibling).backend == "onnxruntime"
    with pytest.raises(ValueError, match="eager backend needs"):
        load_runner(sibling, "eager")
    with pytest.raises(ValueError, match="unknown runner backend"):
        load_runner(ckpt, "tflite")
    with pytest.raises(FileNotFoundError):
        load_runner(tmp_path / "missing.pt")


def test_method_source_runner_and_errors():
    r = load_runner("method:arcface:depth=18,width=16", "eager")
    assert r.method == "arcface" and r.input_spec["image"].shape == (3, 112, 112)
    m1, i1 = load_source("method:arcface:depth=18,width=16")
    m2, i2 = load_source("method:arcface:depth=18,width=16")
    assert i1["sha256"] == i2["sha256"]  # same source, same (seeded) weights
    torch.testing.assert_close(m1.state_dict(), m2.state_dict())
    with pytest.raises(ValueError, match="bad option"):
        load_source("method:arcface:depth")
    with pytest.raises(ValueError, match="unknown method"):
        load_source("method:nosuch")


def test_runner_rejects_client_graphs_and_foreign_files(exported, tmp_path):
    import onnx

    _, client = exported("duetface", "client")
    with pytest.raises(ValueError, match="client graph"):
        load_runner(client)
    _, server = exported("arcface")
    with pytest.raises(ValueError, match="not a client graph"):
        load_client_runner(server)
    bare = onnx.load(str(server))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no ppfr metadata"):
        load_runner(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="cannot load"):
        load_runner(tmp_path / "junk.onnx")


def test_runner_input_validation(exported):
    m, path = exported("duetface")
    r = load_runner(path)
    good = _np(random_inputs(m.payload_spec, 2))
    assert r.run(good).shape == (2, 512)
    cases = [
        ({k: v for k, v in good.items() if k != "roi"}, "missing \\['roi'\\]"),
        ({**good, "extra": good["roi"]}, "unexpected \\['extra'\\]"),
        ({**good, "dct": good["dct"].astype(np.float64)}, "'dct' must be \\(B, 162, 112, 112\\) float32, got .* float64"),
        ({**good, "feat1": good["feat1"][:, :64]}, "'feat1' must be \\(B, 128, 14, 14\\)"),
        ({**good, "feat2": good["feat2"][0]}, "'feat2' must be \\(B, 128, 7, 7\\)"),
        ({**good, "feat0": good["feat0"][:1]}, "disagree on the batch size"),
        ({**good, "roi": good["roi"] + 1.5}, "'roi' has values above 1.0"),
        ({**good, "roi": np.full_like(good["roi"], np.nan)}, "'roi' has non-finite values"),
        ({**good, "dct": torch.from_numpy(good["dct"])}, "'dct' must be a numpy array"),
        ({k: v[:0] for k, v in good.items()}, "empty batch"),
        ([good["dct"]], "must be a dict"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            r.run(bad)
    with pytest.raises(ValueError, match="exceeds this engine's maximum 1"):
        validate_inputs(m.payload_spec, good, max_batch=1)


# ------------------------------------------------------------------------------------------------ Triton
def test_triton_repository_config_parses(exported, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = tmp_path / "repo"
    rc = ppfr.cli.main(["export", "method:duetface:depth=18,width=16,roi=none", "--format", "triton", "--out",
                        str(repo), "--max-batch", "32", "--opt-batch", "8", "--instances", "2",
                        "--no-verify"])  # fmt: skip  (parity is test_server_onnx_parity's job)
    assert rc == 0, capsys.readouterr().err
    assert "wrote Triton model" in capsys.readouterr().out
    cfg = text_format.Parse((repo / "duetface_server" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "duetface_server" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    m = build_method("duetface", **OPTS["duetface"])
    assert [(i.name, tuple(i.dims)) for i in cfg.input] == [(k, s.shape) for k, s in m.payload_spec.items()]
    assert all(i.data_type == model_config_pb2.TYPE_FP32 for i in cfg.input)
    assert [(o.name, tuple(o.dims)) for o in cfg.output] == [("embedding", (512,))]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    group = cfg.instance_group[0]
    assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    spec = meta.spec_from_json(cfg.parameters["ppfr_input_spec"].string_value)
    assert spec == m.payload_spec
    # the repository's model file is a complete ppfr export: a runner loads it directly
    r = load_runner(repo / "duetface_server" / "1" / "model.onnx")
    assert r.method == "duetface" and r.backend == "onnxruntime"


def test_triton_tensorrt_plan_config(exported, tmp_path):
    """A plan's config (no TensorRT needed to write it): max_batch_size follows the engine profile, GPU instances."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from ppfr.deploy.export.model_repository import write_triton_model

    _, onnx_path = exported("profacec")
    engine = tmp_path / "server.engine"
    engine.write_bytes(b"\x00engine bytes")  # stands in for a serialized engine: only copied
    side = {k: v for k, v in read_onnx_metadata(onnx_path).items() if k in meta.KEYS}
    (tmp_path / "server.engine.json").write_text(json.dumps(dict(side, max_batch=16, min_batch=1, opt_batch=4)))
    with pytest.raises(ValueError, match="exceeds the engine's profile maximum 16"):
        write_triton_model(engine, tmp_path / "repo", max_batch_size=64)
    d = write_triton_model(engine, tmp_path / "repo", "pfc", preferred_batch_sizes=(4, 100))
    cfg = text_format.Parse((d / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]  # 100 > max_batch_size is dropped
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (d / "1" / "model.plan").read_bytes() == engine.read_bytes()
    with pytest.raises(ValueError, match="must match"):
        write_triton_model(onnx_path, tmp_path / "repo", "bad/name")


# ------------------------------------------------------------------------------------------------ TensorRT
def test_build_engine_without_tensorrt_raises(exported, tmp_path, monkeypatch):
    from ppfr.deploy.export.tensorrt import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, also where it is installed
    _, path = exported("arcface")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed.*pypi.nvidia.com"):
        build_engine(path, tmp_path / "a.engine")
    assert not (tmp_path / "a.engine").exists()
    with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
        build_engine(path, tmp_path / "a.engine", min_batch=4, opt_batch=2)
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        load_runner("method:arcface:depth=18,width=16", "tensorrt")
    with pytest.raises(ValueError, match="no TensorRT engine next to"):
        load_runner(path, "tensorrt")
    assert load_runner(path).backend == "onnxruntime"  # auto without TensorRT
    rc = ppfr.cli.main(["export", "method:arcface:depth=18,width=16", "--format", "tensorrt", "--out",
                        str(tmp_path / "trt"), "--no-verify"])  # fmt: skip
    assert rc == 2 and not (tmp_path / "trt" / "server.engine").exists()


@pytest.mark.cuda  # TensorRT engines need a CUDA device
def test_build_engine_tensorrt(exported, tmp_path):
    pytest.importorskip("tensorrt")
    from ppfr.deploy.export.tensorrt import build_engine, read_sidecar

    import shutil

    m, shared = exported("duetface")
    path = tmp_path / "server.onnx"  # a private copy: its sibling engine must not leak into other tests
    shutil.copyfile(shared, path)
    cache = tmp_path / "timing.cache"
    engine = build_engine(path, tmp_path / "server.engine", min_batch=1, opt_batch=4, max_batch=8, timing_cache=cache)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    side = read_sidecar(engine)
    assert side["ppfr_method"] == "duetface" and side["max_batch"] == 8 and side["fp16"] is False
    trt_runner = load_runner(engine)
    assert trt_runner.backend == "tensorrt" and trt_runner.max_batch_size == 8
    x = _np(sample_inputs(m, "server", 8, seed=2))
    assert np.abs(trt_runner.run(x) - OnnxRuntimeRunner(path).run(x)).max() < 1e-3  # TF32 may be on
    assert load_runner(path).backend == "tensorrt"  # auto: the sibling engine wins
