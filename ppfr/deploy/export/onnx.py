"""Export a method's graphs to ONNX with a dynamic batch axis, and check them against eager PyTorch; TensorRT
engines (``export.tensorrt``) and Triton Inference Server repositories (``export.model_repository``) are built from
that ONNX.

The graphs come from the method (``Method.export_graphs``, each an ``ExportGraph``); nothing here asks which
method it exports:

* ``server`` -- inputs named after ``method.payload_spec`` (per-sample shapes as in the spec, leading batch axis
  ``batch``), output ``embedding`` (B, D), the raw embedding of ``method.recognize`` (runners L2-normalise).
* ``client`` -- the client *network* only, i.e. what runs on the client beyond fixed transforms (frequency
  transform, ROI, blur), for the methods that have one (DuetFace: ``dct_client`` -> ``feat0..feat3``; PRO-Face C:
  ``residual`` = X - blur(X) -> ``aux0..aux3``).

**Export mode.** The ppfr ops are ``torch.library`` custom ops whose fast backends (C++, Triton, CUDA) are opaque to
an exporter. :func:`export_mode` makes every op that a traced graph reaches run its pure-PyTorch form instead:
``PPFR_BACKEND=torch`` makes ``backend="auto"`` resolve to the torch backend (the feature-mask fusions then are
their plain formula), and each registered ``ppfr::`` custom op is replaced, for the duration, by its Python body,
which for the torch backend is ordinary PyTorch (the block shuffle a gather, the frequency transform dense
separable matmuls), so it exports as standard ONNX ops. A backend that cannot be expressed that way raises
:class:`ExportError`. Value-range checks of payloads are skipped while tracing (they need concrete data); the
runners check ranges on their inputs instead.

**Exporter.** The default is the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17):
measured here it exports a tiny DuetFace server in 0.8 s against 14 s for the dynamo exporter, with the same
parity (~1e-7), and its output is what TensorRT 10's ONNX parser and Triton's onnxruntime backend take.
``exporter="dynamo"`` (torch.export + onnxscript) is supported as well; torch deprecates the TorchScript exporter,
so switch the default when it goes away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ppfr.deploy.export import metadata as meta
from ppfr.deploy.protocol import l2_normalize
from ppfr.methods.base import ExportGraph, Method, TensorSpec
from ppfr.methods.spec import load_model

DEFAULT_OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
MAX_DYNAMIC_BATCH = 65536  # upper bound given to torch.export for the symbolic batch (dynamo exporter)
_OP_MODULES = ("ppfr.ops.freq", "ppfr.ops.block_shuffle", "ppfr.ops.feature_mask_fuse", "ppfr.ops.blur",
               "ppfr.ops.roi_mask", "ppfr.ops.sample_ranks")  # fmt: skip
PARITY_TOL = 1e-4  # max abs difference, eager vs ONNX Runtime (L2-normalised embeddings; client maps, relative)
MISMATCH_TOL = 1e-3  # pruned / quantized client maps: at most this fraction of boundary elements may differ
_EXPORT_LOCK = threading.RLock()  # export mode mutates process state (env var, module globals)


class ExportError(RuntimeError):
    """A model or option that cannot be exported (the message says why and what to use instead)."""


# ------------------------------------------------------------------------------------------------ sources
def load_source(source: str | Path) -> tuple[Method, dict[str, str]]:
    """A model spec (:func:`ppfr.methods.spec.load_model`: a model.pt, a run folder, or ``method:NAME[:key=value,...]``
    untrained with the one fixed seed) -> (method in eval mode, info).

    info: ``label`` (the file name or the method string) and ``sha256`` (file digest, or digest of name+options).
    """
    method, src = load_model(source)
    if src.kind == "method":
        return method, {"label": src.text, "sha256": meta.options_sha256(src.name, src.options)}
    assert src.path is not None
    return method, {"label": src.path.name, "sha256": meta.file_sha256(src.path)}


# ------------------------------------------------------------------------------------------------ graphs
def export_graph(method: Method, part: str) -> ExportGraph:
    """The method's ``part`` graph (``Method.export_graphs``); ExportError if it has none or cannot export it."""
    if part not in meta.PARTS:
        raise ValueError(f"part must be one of {meta.PARTS}, got {part!r}")
    graph = method.export_graphs().get(part)
    if graph is None:
        raise ExportError(f"{method.name} has no {part} network to export: its client side is the fixed transform "
                          "of protect() (run it with ppfr); export --part server")  # fmt: skip
    return graph


def graph_io(method: Method, part: str) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, ...]]]:
    """(input spec, output name -> per-sample shape) of a method's ``server`` or ``client`` graph."""
    graph = export_graph(method, part)
    return dict(graph.inputs), dict(graph.outputs)


class GraphModule(nn.Module):
    """A method's export graph as a module: ``forward(*inputs in order)`` -> the graph's output(s); the method is a
    submodule, so its weights are the graph's."""

    def __init__(self, method: Method, part: str) -> None:
        super().__init__()
        self.method = method
        self._forward = export_graph(method, part).forward

    def forward(self, *tensors: torch.Tensor) -> Any:  # varargs for every graph: one dynamic_shapes structure
        return self._forward(*tensors)


def _check_exportable(method: Method, part: str) -> None:
    refusal = export_graph(method, part).refusal
    if refusal is not None:
        raise ExportError(refusal)


# ------------------------------------------------------------------------------------------------ export mode
def _pure(op: Any) -> Any:
    """The Python body of a ppfr custom op, callable only with a pure-PyTorch backend (traceable, exportable)."""
    fn = op._init_fn
    sig = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        be = sig.bind(*args, **kwargs).arguments.get("backend", "torch")
        if be not in ("ref", "torch"):
            raise ExportError(f"{op._qualname}: backend {be!r} is a native kernel and cannot be exported; the "
                              "op needs a torch backend for export")  # fmt: skip
        return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """Inside: every ppfr op runs its pure-PyTorch form (see the module docstring). Not for concurrent inference:
    it changes ``PPFR_BACKEND`` and the ops' module globals for the process until it exits."""
    with _EXPORT_LOCK:
        old_env = os.environ.get("PPFR_BACKEND")
        patched: list[tuple[Any, str, Any]] = []
        try:
            os.environ["PPFR_BACKEND"] = "torch"
            for mod_name in _OP_MODULES:
                mod = importlib.import_module(mod_name)
                for attr, obj in list(vars(mod).items()):
                    if hasattr(obj, "_init_fn") and str(getattr(obj, "_qualname", "")).startswith("ppfr::"):
                        patched.append((mod, attr, obj))
                        setattr(mod, attr, _pure(obj))
            yield
        finally:
            for mod, attr, obj in patched:
                setattr(mod, attr, obj)
            if old_env is None:
                os.environ.pop("PPFR_BACKEND", None)
            else:
                os.environ["PPFR_BACKEND"] = old_env


# ------------------------------------------------------------------------------------------------ inputs
def random_inputs(spec: dict[str, TensorSpec], batch: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:  # fmt: skip
    """Random tensors (batch, *shape) that satisfy ``spec`` (uniform in [low, high] where set, else N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in spec.items():
        if s.low is not None and s.high is not None:
            t = s.low + (s.high - s.low) * torch.rand(batch, *s.shape, generator=g)
        else:
            t = torch.randn(batch, *s.shape, generator=g)
        out[k] = t.to(device=device, dtype=s.dtype)
    return out


def sample_inputs(method: Method, part: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Realistic graph inputs: the method's own client pipeline (``ExportGraph.sample``) on synthetic faces
    (payloads for ``server``)."""
    from ppfr.data.synthetic import synthetic_faces

    graph = export_graph(method, part)
    dev = next(method.parameters()).device
    images = synthetic_faces(batch, size=method.options.image_size, seed=seed).to(dev)
    with torch.no_grad():
        return graph.sample(images, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ ONNX
def export_onnx(method: Method, path: str | Path, *, part: str = "server", opset: int = DEFAULT_OPSET,
                exporter: str = "torchscript", source: str = "", source_sha256: str = "") -> Path:  # fmt: skip
    """Export ``method``'s ``part`` graph to ``path`` (ONNX, dynamic batch axis ``batch``) with ppfr metadata.

    Args:
        method: a built or loaded method (put in eval mode for the export, restored after).
        part: "server" (payload -> ``embedding``) or "client" (DuetFace / PRO-Face C client network).
        opset: ONNX opset (17 default; TensorRT 10 and ONNX Runtime 1.31 take 17-21).
        exporter: "torchscript" (default, fast) or "dynamo" (torch.export + onnxscript).
        source, source_sha256: what was exported (written to the metadata; runners use the digest to reuse it).
    Returns:
        ``path``. The file is written atomically and passes ``onnx.checker.check_model``.
    Raises:
        ExportError (the method/options cannot be exported), ValueError (bad part/exporter).
    """
    import onnx

    import ppfr

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    _check_exportable(method, part)
    spec, outputs = graph_io(method, part)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    was_training = method.training
    method.eval()
    graph = GraphModule(method, part).eval()
    dev = next(method.parameters()).device
    example = tuple(random_inputs(spec, 2, device=dev).values())  # B=2: nothing specialises on a batch of 1
    names, out_names = list(spec), list(outputs)
    try:
        with export_mode(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of shape checks, the exporter's deprecation notice
            if exporter == "torchscript":
                torch.onnx.export(graph, example, str(tmp), dynamo=False, opset_version=opset, input_names=names,
                                  output_names=out_names, do_constant_folding=True,
                                  dynamic_axes={n: {0: "batch"} for n in names + out_names})  # fmt: skip
            else:
                batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
                prog = torch.onnx.export(graph, example, dynamo=True, opset_version=opset, input_names=names,
                                         output_names=out_names, dynamic_shapes=(tuple({0: batch} for _ in names),),
                                         optimize=True, verbose=False)  # fmt: skip
                prog.save(str(tmp))
        model = onnx.load(str(tmp))
        props = {
            "ppfr_version": ppfr.__version__, "ppfr_method": method.name, "ppfr_part": part,
            "ppfr_input_spec": meta.spec_to_json(spec), "ppfr_output": meta.outputs_to_json(outputs),
            "ppfr_opset": str(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))),
            "ppfr_source": source or method.name, "ppfr_source_sha256": source_sha256,
            "ppfr_method_options": json.dumps(dataclasses.asdict(method.options), default=str),
            "ppfr_exporter": exporter,
        }  # fmt: skip
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name, model.producer_version = "ppfr", ppfr.__version__
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"exporting the {method.name} {part} graph with the {exporter} exporter failed: "
                          f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
        method.train(was_training)
    return path


def has_discontinuous_client(method: Method) -> bool:
    """True if the client graph prunes or quantizes (``ExportGraph.discontinuous``): a 1e-7 difference upstream can
    flip a value across the prune threshold or a rounding boundary, so such graphs agree everywhere but at a few
    boundary elements."""
    graph = method.export_graphs().get("client")
    return graph is not None and graph.discontinuous


def check_parity(method: Method, onnx_path: str | Path, batch_sizes: tuple[int, ...] = (1, 8), seed: int = 0,
                 part: str = "server", metric: str = "max",
                 threads: int | None = None) -> dict[int, float]:  # fmt: skip
    """Difference between eager PyTorch (the ops' normal, fastest backends) and ONNX Runtime, per batch size.

    server: max abs difference of the L2-normalised embeddings (ppfr's bar: < 1e-4). client: ``metric="max"``, the
    max abs difference of every output map relative to the map's largest magnitude; ``metric="mismatch"``, the
    fraction of elements whose relative difference exceeds 1e-4 (for pruned / quantized client graphs, see
    :func:`has_discontinuous_client`). Inputs are the method's own payloads of synthetic faces
    (:func:`sample_inputs`). ``threads``: ONNX Runtime intra-op threads (default: its own choice).
    """
    if metric not in ("max", "mismatch"):
        raise ValueError(f"metric must be max or mismatch, got {metric!r}")
    sess = meta.OrtSession(onnx_path, providers=["CPUExecutionProvider"], threads=threads)
    method.eval()
    graph = GraphModule(method, part)
    result = {}
    for b in batch_sizes:
        inputs = sample_inputs(method, part, b, seed=seed + b)
        with torch.no_grad():
            ref = graph(*inputs.values())
        got = sess.run({k: v.detach().cpu().numpy() for k, v in inputs.items()})
        if part == "server":
            diff = float(np.abs(l2_normalize(ref.cpu().numpy(), strict=False) - l2_normalize(got[meta.EMBEDDING], strict=False)).max())
        else:
            rel = [np.abs(r.cpu().numpy() - got[k]) / max(float(r.abs().max()), 1e-12)
                   for k, r in zip(sess.outputs, ref)]  # fmt: skip
            if metric == "max":
                diff = max(float(d.max()) for d in rel)
            else:
                diff = float(sum(int((d > 1e-4).sum()) for d in rel) / sum(d.size for d in rel))
        result[b] = diff
    return result


def verify_parity(method: Method, onnx_path: str | Path, part: str = "server",
                  threads: int | None = None) -> tuple[bool, list[str]]:  # fmt: skip
    """The parity check ``ppfr export`` runs and a runner runs before it serves an export it made: (passed, the
    lines that report it). ``check_parity`` at batch 1 and 8 below PARITY_TOL; a discontinuous client graph that
    misses it is judged by its fraction of mismatching elements instead (below MISMATCH_TOL)."""
    parity = check_parity(method, onnx_path, part=part, threads=threads)
    what = "L2-normalised embeddings" if part == "server" else "maps, relative"
    lines = [f"parity vs eager (max abs diff, {what}): " + ", ".join(f"B={b}: {d:.2e}" for b, d in parity.items())]
    if max(parity.values()) < PARITY_TOL:
        return True, lines
    if part == "client" and has_discontinuous_client(method):
        parity = check_parity(method, onnx_path, part="client", metric="mismatch", threads=threads)
        lines.append("pruned/quantized client maps: fraction of elements off by > 1e-4 (boundary flips): "
                     + ", ".join(f"B={b}: {d:.1e}" for b, d in parity.items()))  # fmt: skip
        if max(parity.values()) < MISMATCH_TOL:
            return True, lines
        lines.append(f"parity check FAILED (mismatch >= {MISMATCH_TOL:g})")
        return False, lines
    lines.append(f"parity check FAILED (>= {PARITY_TOL:g})")
    return False, lines
