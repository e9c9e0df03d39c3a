"""The ONNX recogniser as a differentiable module (ppfr.models.onnx_module) and ``transfer.source: <model.onnx>``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ppfr.deploy.export import export_onnx
from ppfr.methods import build_method, load_method
from ppfr.models.onnx_module import OnnxError, load_onnx_recognizer
from ppfr.models.transfer import TransferError, TransferredServer
from ppfr.train.config import TransferConfig
from ppfr.train.transfer import Distiller, apply_transfer

TINY = {"depth": 18, "width": 8, "embedding_size": 32}


def _ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def arcface_onnx(tmp_path_factory):
    """ppfr's own export of an (untrained, fixed) ArcFace IR-18 server: (N, 3, 112, 112) in [-1, 1] -> (N, 32)."""
    m = build_method("arcface", **TINY).eval()
    path = export_onnx(m, tmp_path_factory.mktemp("onnx") / "arcface.onnx")
    return m, path


def test_exported_server_matches_torch_and_onnxruntime_with_gradients(arcface_onnx):
    m, path = arcface_onnx
    net = load_onnx_recognizer(path)
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got, want = net(x), m.server(x)
    rel = lambda a, b: ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()  # noqa: E731
    assert rel(got, want) < 1e-5
    assert rel(got, torch.from_numpy(_ort(path, x.numpy()))) < 1e-5
    # every float weight is a parameter and gets a gradient; BatchNormalization statistics are buffers
    net(x).square().sum().backward()
    params = list(net.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(1 for _ in net.buffers()) > 0
    with pytest.raises(ValueError, match=r"expects \(N, 3, 112, 112\)"):
        net(torch.zeros(1, 3, 64, 64))


def _graph_model(path, *, extra_node=None):
    """A hand-made graph (opset 13) over the operators ppfr's exports do not use: asymmetric pads, strides,
    pooling with pads and ceil rules, BatchNormalization, PRelu, Pad, a dynamic Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape, MatMul, Gemm with alpha/beta/transB, element-wise ops, Clip, Transpose, ReduceMean,
    Squeeze / Unsqueeze, Cast, Dropout and Identity. (N, 3, 9, 9) -> (N, 6)."""
    r = np.random.default_rng(0)
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {
        "W1": f(4, 3, 3, 3), "B1": f(4), "bn_s": f(4), "bn_b": f(4), "bn_m": f(4) * 0.1,
        "bn_v": (r.random(4) + 0.5).astype(np.float32), "slope": f(4, 1, 1) * 0.3, "pads": np.array(
            [0, 0, 1, 0, 0, 0, 0, 2], np.int64), "padv": np.array(0.5, np.float32), "idx0": np.array(0, np.int64),
        "ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64), "m1": np.array([-1], np.int64),
        "W2": f(112, 6), "W3": f(6, 4), "C3": f(6), "k": f(6), "three": np.array(3.0, np.float32),
        "lo": np.array(-1.5, np.float32), "hi": np.array(2.0, np.float32),
    }  # fmt: skip
    N = helper.make_node
    nodes = [
        N("Conv", ["X", "W1", "B1"], ["c"], pads=[1, 0, 1, 2], strides=[2, 1]),
        N("Relu", ["c"], ["r"]),
        N("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
        N("AveragePool", ["mp"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        N("BatchNormalization", ["ap", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=1e-3),
        N("PRelu", ["bn", "slope"], ["pr"]),
        N("Pad", ["pr", "pads", "padv"], ["pd"]),
        N("Sigmoid", ["pd"], ["sg"]),
        N("GlobalAveragePool", ["sg"], ["gp"]),
        N("Flatten", ["gp"], ["fl"]),
        N("Shape", ["pd"], ["shp"]),
        N("Gather", ["shp", "idx0"], ["n"]),
        N("Unsqueeze", ["n", "ax0"], ["nu"]),
        N("Concat", ["nu", "m1"], ["shape"], axis=0),
        N("Reshape", ["pd", "shape"], ["rs"]),
        N("MatMul", ["rs", "W2"], ["mm"]),
        N("Gemm", ["fl", "W3", "C3"], ["gm"], transB=1, alpha=0.5, beta=2.0),
        N("Add", ["mm", "gm"], ["ad"]),
        N("Sub", ["ad", "k"], ["sb"]),
        N("Tanh", ["gm"], ["th"]),
        N("Mul", ["sb", "th"], ["mu"]),
        N("Div", ["mu", "three"], ["dv"]),
        N("LeakyRelu", ["dv"], ["lr"], alpha=0.2),
        N("Clip", ["lr", "lo", "hi"], ["cl"]),
        N("Transpose", ["cl"], ["t1"], perm=[1, 0]),
        N("Transpose", ["t1"], ["t2"], perm=[1, 0]),
        N("ReduceMean", ["t2"], ["rm"], axes=[1], keepdims=1),
        N("Cast", ["rm"], ["rmc"], to=TensorProto.FLOAT),
        N("Sub", ["t2", "rmc"], ["ce"]),
        N("Unsqueeze", ["ce", "ax1"], ["ue"]),
        N("Squeeze", ["ue", "ax1"], ["se"]),
        N("Dropout", ["se"], ["dr"]),
        N("Identity", ["dr"], ["Y"]),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_every_interpreted_operator_matches_onnxruntime(tmp_path):
    path = _graph_model(tmp_path / "g.onnx")
    net = load_onnx_recognizer(path)
    x = np.random.default_rng(1).standard_normal((5, 3, 9, 9)).astype(np.float32)
    got = net(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), _ort(path, x), rtol=1e-5, atol=1e-5)
    got.sum().backward()  # differentiable end to end, BatchNormalization statistics excluded
    names = {t["name"]: t["trainable"] for t in net.spec["tensors"]}
    assert names["W1"] and names["bn_s"] and not names["bn_m"] and not names["bn_v"] and not names["pads"]
    assert all(p.grad is not None for p in net.parameters())


def test_unsupported_graphs_are_refused_naming_what(tmp_path):
    erf = helper.make_node("Erf", ["Y"], ["Z"])
    with pytest.raises(OnnxError, match="operator Erf .* not supported"):
        load_onnx_recognizer(_graph_model(tmp_path / "erf.onnx", extra_node=erf))
    with pytest.raises(OnnxError, match="not a readable ONNX model"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
        load_onnx_recognizer(tmp_path / "junk.onnx")
    # external data is never followed
    path = _graph_model(tmp_path / "ext.onnx")
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
                    size_threshold=0)  # fmt: skip
    with pytest.raises(OnnxError, match="external data"):
        load_onnx_recognizer(path)


def test_onnx_transfer_fine_tunes_and_model_pt_rebuilds_without_the_file(arcface_onnx, tmp_path):
    _, path = arcface_onnx
    src = tmp_path / "server.onnx"
    src.write_bytes(path.read_bytes())
    m = build_method("partialface", **TINY)  # 27 DCT channels -> adapter -> the ONNX recogniser -> 32
    plan = apply_transfer(m, TransferConfig(source=str(src)))
    assert isinstance(m.server, TransferredServer) and plan.record["server"]["recognizer"]["kind"] == "onnx"
    assert plan.pretrained and all(p.requires_grad for p in plan.pretrained)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    m.train()
    m.embed(x, generator=g()).sum().backward()
    assert all(p.grad is not None for p in plan.pretrained)  # the ONNX weights fine-tune
    saved = tmp_path / "model.pt"
    torch.save({"model": m.state_dict(), "method": "partialface", "method_options": dict(TINY),
                "transfer": plan.record}, saved)  # fmt: skip
    src.unlink()  # the record holds the graph; the state dict holds the weights
    loaded = load_method(saved).eval()
    with torch.no_grad():
        assert torch.allclose(loaded.embed(x, generator=g()), m.eval().embed(x, generator=g()), atol=1e-5)


def test_onnx_refusals_for_injecting_methods_and_teachers(arcface_onnx, tmp_path):
    _, path = arcface_onnx
    with pytest.raises(TransferError, match="no stage outputs"):
        apply_transfer(build_method("duetface", **TINY), TransferConfig(source=str(path)))
    with pytest.raises(TransferError, match="needs transfer.adapter=conv"):
        apply_transfer(build_method("arcface", **TINY), TransferConfig(source=str(path), adapter="none"))
    teacher = Distiller(str(path), weight=1.0)  # an ONNX teacher of clean RGB faces
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert teacher.teacher_embeddings(x).shape == (2, 32)
    with pytest.raises(TransferError, match="reads the clean 112 x 112 RGB faces"):
        Distiller(str(_graph_model(tmp_path / "g.onnx")), weight=1.0)
