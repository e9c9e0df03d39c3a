"""An ONNX recogniser as a differentiable PyTorch module: the ``transfer.source: <model.onnx>`` path.

onnxruntime runs a graph but gives no gradients, and no ONNX -> torch converter is a dependency, so ppfr interprets
the graph itself: :class:`OnnxRecognizer` walks the nodes in their (topological) file order with PyTorch ops, its
float initializers become ``nn.Parameter`` s (the pretrained weights that fine-tune; BatchNormalization's running mean
and variance and every integer tensor are buffers), and gradients flow through every op to the adapter in front.

* Input: the graph's one non-initializer input, (N, C, H, W) with H == W, in the range its exporter used (ppfr's
  export and InsightFace-style ArcFace models read RGB in [-1, 1], the adapter's nominal output). Output: the
  graph's first output, (N, D) embeddings.
* Supported operators (opset 11-21 forms, 2-D spatial ops only): :data:`SUPPORTED_OPS`. A graph with any other
  operator, an external-data tensor, a sub-graph attribute or more than one input is refused with a TransferError
  naming it, at load, not mid-training.
* :func:`load_onnx_recognizer` returns the module and its *spec*: the graph as plain lists / dicts / strings /
  numbers (node op types, input and output names, attributes) and the shape and dtype of every tensor, which
  model.pt stores in its ``"transfer"`` record, so :func:`build_onnx_recognizer` rebuilds the module (placeholder
  tensors, filled by the state dict) without the ONNX file. Nothing is unpickled: the file is protobuf
  (``onnx.load``, external data off) and the record is read under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ONNX TensorProto data types that can occur in the supported graphs
_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}
_DTYPE_NAMES = {v: str(v).removeprefix("torch.") for v in _DTYPES.values()}
_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


class OnnxError(ValueError):
    """An ONNX graph that cannot be interpreted (the message names the operator or feature)."""


# ------------------------------------------------------------------------------------------------ operators
def _pads_2d(pads: list[int] | None) -> tuple[int, int, int, int]:
    """ONNX pads [top, left, bottom, right] -> F.pad order (left, right, top, bottom)."""
    if not pads:
        return (0, 0, 0, 0)
    if len(pads) != 4:
        raise OnnxError(f"only 2-D spatial ops are supported (pads {pads})")
    t, l, b, r = pads
    return (l, r, t, b)


def _auto_pad(a: dict, x: torch.Tensor, kernel: list[int], strides: list[int], dil: list[int]) -> list[int] | None:
    mode = a.get("auto_pad", "NOTSET")
    if mode in ("NOTSET", ""):
        return a.get("pads")
    if mode == "VALID":
        return [0, 0, 0, 0]
    if mode not in ("SAME_UPPER", "SAME_LOWER"):
        raise OnnxError(f"auto_pad {mode!r} is not supported")
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dil):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        lo = total // 2 if mode == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin + end


def _conv(a, x, w, b=None):
    if x.dim() != 4:
        raise OnnxError(f"Conv: only 2-D convolutions are supported (input rank {x.dim()})")
    strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    pads = _pads_2d(_auto_pad(a, x, list(w.shape[2:]), strides, dil))
    if pads[0] == pads[1] and pads[2] == pads[3]:
        return F.conv2d(x, w, b, strides, (pads[2], pads[0]), dil, a.get("group", 1))
    return F.conv2d(F.pad(x, pads), w, b, strides, 0, dil, a.get("group", 1))


def _pool(kind: str):
    def op(a, x):
        if x.dim() != 4:
            raise OnnxError(f"{kind}: only 2-D pooling is supported (input rank {x.dim()})")
        k = a["kernel_shape"]
        strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        pads = _pads_2d(_auto_pad(a, x, k, strides, dil))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "MaxPool":
            if any(pads):  # padded positions never win a max
                x = F.pad(x, pads, value=float("-inf"))
            return F.max_pool2d(x, k, strides, 0, dil, ceil_mode=ceil)
        if dil != [1, 1]:
            raise OnnxError("AveragePool: dilations are not supported")
        if pads[0] != pads[1] or pads[2] != pads[3]:
            raise OnnxError("AveragePool: asymmetric pads are not supported")
        return F.avg_pool2d(x, k, strides, (pads[2], pads[0]), ceil_mode=ceil,
                            count_include_pad=bool(a.get("count_include_pad", 0)))  # fmt: skip

    return op


def _batchnorm(a, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _gemm(a, a_, b_, c=None):
    if a.get("transA", 0):
        a_ = a_.t()
    if a.get("transB", 0):
        b_ = b_.t()
    y = a.get("alpha", 1.0) * (a_ @ b_)
    return y if c is None else y + a.get("beta", 1.0) * c


def _reshape(a, x, shape):
    dims = [int(v) for v in shape.tolist()]
    if not a.get("allowzero", 0):  # 0 copies the input's dimension
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _flatten(a, x):
    axis = a.get("axis", 1) % max(x.dim(), 1)
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _axes(a: dict, axes: torch.Tensor | None) -> list[int] | None:
    if axes is not None:
        return [int(v) for v in axes.tolist()]
    return a.get("axes")


def _unsqueeze(a, x, axes=None):
    out = x
    rank = x.dim() + len(_axes(a, axes))
    for ax in sorted(v % rank for v in _axes(a, axes)):
        out = out.unsqueeze(ax)
    return out


def _squeeze(a, x, axes=None):
    ax = _axes(a, axes)
    if ax is None:
        return x.squeeze()
    return x.squeeze(tuple(v % x.dim() for v in ax))


def _reduce_mean(a, x, axes=None):
    ax = _axes(a, axes)
    keep = bool(a.get("keepdims", 1))
    if ax is None or not ax:
        return x.mean() if not keep else x.mean(dim=tuple(range(x.dim())), keepdim=True)
    return x.mean(dim=tuple(ax), keepdim=keep)


def _gather(a, data, indices):
    axis = a.get("axis", 0) % data.dim()
    idx = indices.long() % data.shape[axis]
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1 :])


def _pad(a, x, pads=None, value=None, axes=None):
    if a.get("mode", "constant") != "constant" or axes is not None:
        raise OnnxError(f"Pad: only mode=constant without axes is supported (mode {a.get('mode')!r})")
    p = [int(v) for v in (pads.tolist() if pads is not None else a.get("pads", []))]
    n = len(p) // 2
    torch_pads: list[int] = []
    for d in reversed(range(n)):  # F.pad lists the last dimension first
        torch_pads += [p[d], p[n + d]]
    fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else float(a.get("value", 0.0))
    return F.pad(x, torch_pads, value=fill)


def _clip(a, x, lo=None, hi=None):
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _shape(a, x):
    dims = list(x.shape)[a.get("start", 0) : a.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _cast(a, x):
    to = a["to"]
    if to not in _DTYPES:
        raise OnnxError(f"Cast to ONNX type {to} is not supported")
    return x.to(_DTYPES[to])


_OPS: dict[str, Any] = {
    "Identity": lambda a, x: x,
    "Dropout": lambda a, x, *rest: x,  # inference: the identity (its optional mask output is not supported)
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Relu": lambda a, x: F.relu(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "PRelu": lambda a, x, slope: torch.where(x >= 0, x, x * slope),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "Clip": _clip,
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "MatMul": lambda a, x, y: torch.matmul(x, y),
    "Gemm": _gemm,
    "MaxPool": _pool("MaxPool"),
    "AveragePool": _pool("AveragePool"),
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, x: x.permute(a.get("perm", list(reversed(range(x.dim()))))),
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "ReduceMean": _reduce_mean,
    "Shape": _shape,
    "Gather": _gather,
    "Pad": _pad,
    "Cast": _cast,
}
# inputs that are settings, not weights (never trainable): BN statistics, shapes, axes, pads and bounds
_STATIC_INPUTS = {"BatchNormalization": (3, 4), "Pad": (1, 2, 3), "Clip": (1, 2), "Reshape": (1,), "Unsqueeze": (1,),
                  "Squeeze": (1,), "ReduceMean": (1,), "Gather": (1,)}  # fmt: skip
#: The operators :class:`OnnxRecognizer` interprets (``Constant`` nodes become buffers when the graph is read).
SUPPORTED_OPS = tuple(sorted([*_OPS, "Constant"]))


# ------------------------------------------------------------------------------------------------ module
def _key(i: int) -> str:
    return f"t{i}"  # parameter / buffer names: ONNX tensor names may hold dots and slashes


class OnnxRecognizer(nn.Module):
    """(N, C, S, S) -> (N, D): an ONNX graph interpreted with PyTorch ops (see the module docstring).

    Build it with :func:`load_onnx_recognizer` (from a file) or :func:`build_onnx_recognizer` (from a spec, with
    placeholder tensors). ``spec``: {"kind": "onnx", "input", "output", "in_channels", "in_size", "dim", "nodes":
    [{"op", "inputs", "outputs", "attrs"}], "tensors": [{"name", "shape", "dtype", "trainable"}]}.
    """

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.params = nn.ParameterDict()
        self._names: dict[str, str] = {}  # ONNX tensor name -> parameter / buffer key
        for i, t in enumerate(spec["tensors"]):
            dtype = _BY_NAME[t["dtype"]]
            placeholder = torch.zeros(t["shape"], dtype=dtype)
            if t["trainable"]:
                self.params[_key(i)] = nn.Parameter(placeholder)
            else:
                self.register_buffer(_key(i), placeholder)
            self._names[t["name"]] = _key(i)
        for n in spec["nodes"]:
            if n["op"] not in _OPS:
                raise OnnxError(f"operator {n['op']} is not supported (supported: {', '.join(SUPPORTED_OPS)})")

    def _tensor(self, name: str) -> torch.Tensor:
        key = self._names[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, x: torch.Tensor, inject: Any = None) -> torch.Tensor:
        if inject is not None:
            raise OnnxError("an ONNX recogniser has no stage outputs to inject into")
        c, s = self.spec["in_channels"], self.spec["in_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"the ONNX recogniser expects (N, {c}, {s}, {s}), got {tuple(x.shape)}")
        env: dict[str, torch.Tensor] = {self.spec["input"]: x}
        for n in self.spec["nodes"]:
            args = [None if not name else env[name] if name in env else self._tensor(name) for name in n["inputs"]]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            out = _OPS[n["op"]](n["attrs"], *args)
            env[n["outputs"][0]] = out
        return env[self.spec["output"]]


def _attr_value(attr, node_name: str, op: str) -> Any:
    import onnx

    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, bytes) for v in value):
        return [v.decode() for v in value]
    raise OnnxError(f"node {node_name or op}: attribute {attr.name!r} of type {type(value).__name__} is not supported "
                    "(tensor attributes only on Constant; no sub-graphs)")  # fmt: skip


def load_onnx_recognizer(path: str | Path) -> OnnxRecognizer:
    """Read an ONNX file into an :class:`OnnxRecognizer` holding its weights (OnnxError naming what is unsupported)."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors, unreadable files
        raise OnnxError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for t in inits.values():
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise OnnxError(f"{path}: tensor {t.name!r} is stored as external data, which ppfr does not read")
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or not g.output:
        raise OnnxError(f"{path}: expected one image input and an embedding output, got inputs "
                        f"{[i.name for i in inputs]} and outputs {[o.name for o in g.output]}")  # fmt: skip
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] is None or dims[2] is None or dims[2] != dims[3]:
        raise OnnxError(f"{path}: the input must be (N, C, S, S) with fixed C and S, got {dims}")
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in g.output[0].type.tensor_type.shape.dim]
    if len(out_dims) != 2 or not out_dims[1]:
        raise OnnxError(f"{path}: the output must be (N, D) embeddings with a fixed D, got {out_dims}")
    # BatchNormalization's running statistics and the float operands that are settings (pad values, clip bounds)
    # are buffers: a gradient step must not move them
    # (through Identity nodes: exporters share one initializer among equal tensors, e.g. every fresh BN's zeros)
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def origin(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    static = {origin(n.input[k]) for n in g.node for k in _STATIC_INPUTS.get(n.op_type, ()) if len(n.input) > k}
    tensors: list[dict] = []
    values: list[torch.Tensor] = []

    def add(name: str, arr: np.ndarray, trainable: bool) -> None:
        t = torch.from_numpy(np.array(arr, copy=True))
        if t.dtype not in _DTYPE_NAMES:
            raise OnnxError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        tensors.append({"name": name, "shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype],
                        "trainable": bool(trainable and t.is_floating_point())})  # fmt: skip
        values.append(t)

    for name, t in inits.items():
        add(name, numpy_helper.to_array(t), name not in static)
    nodes = []
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            raise OnnxError(f"{path}: node {n.name or n.op_type} is in domain {n.domain!r}; only the default domain")
        if n.op_type == "Constant":
            attr = n.attribute[0]
            if attr.name == "value":
                arr = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                arr = np.array(onnx.helper.get_attribute_value(attr),
                               dtype=np.float32 if "float" in attr.name else np.int64)  # fmt: skip
            else:
                raise OnnxError(f"{path}: Constant {n.name!r} with attribute {attr.name!r} is not supported")
            add(n.output[0], arr, False)  # a constant stays constant
            continue
        if n.op_type not in _OPS:
            raise OnnxError(f"{path}: operator {n.op_type} (node {n.name or '?'}) is not supported; supported: "
                            f"{', '.join(SUPPORTED_OPS)}")  # fmt: skip
        nodes.append({"op": n.op_type, "inputs": list(n.input), "outputs": list(n.output)[:1],
                      "attrs": {a.name: _attr_value(a, n.name, n.op_type) for a in n.attribute}})  # fmt: skip
    spec = {"kind": "onnx", "input": inputs[0].name, "output": g.output[0].name, "in_channels": int(dims[1]),
            "in_size": int(dims[2]), "dim": int(out_dims[1]), "nodes": nodes, "tensors": tensors}  # fmt: skip
    net = OnnxRecognizer(spec)
    with torch.no_grad():
        for i, v in enumerate(values):
            key = _key(i)
            (net.params[key] if key in net.params else getattr(net, key)).copy_(v)
    return net


def build_onnx_recognizer(spec: dict) -> OnnxRecognizer:
    """The module of a recorded ``spec`` with placeholder tensors (a state dict fills them)."""
    return OnnxRecognizer(spec)
