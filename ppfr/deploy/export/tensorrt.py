"""TensorRT engines from ppfr's ONNX exports, and a small runtime for them. ``tensorrt`` is imported lazily.

Written against TensorRT's Python API of 10.x and 11.x (the name-based I/O tensor API of 10.0+):
``Builder`` -> ``create_network(0)`` (explicit batch; the only mode since 10.0) -> ``OnnxParser`` ->
``BuilderConfig`` (``set_memory_pool_limit(WORKSPACE)``, one optimization profile over the batch range, a timing
cache loaded from and saved back to a file) -> ``build_serialized_network``. The engine's metadata lives in a
sidecar ``<engine>.json`` (same keys as the ONNX ``metadata_props``, see ppfr.deploy.export.metadata, plus the TensorRT
version, precision and the batch range).

FP16: TensorRT 10 takes ``BuilderFlag.FP16`` (weak typing). TensorRT 11 removed the weak-typing flags; there the
ONNX graph itself must be mixed precision, which ppfr makes with NVIDIA ModelOpt's AutoCast
(``modelopt.onnx.autocast.convert_to_mixed_precision(..., keep_io_types=True)``) when it is installed; without it
``fp16=True`` on TensorRT 11 raises BackendUnavailableError saying so. Inputs and outputs stay float32 either way.

The runtime (:class:`TensorRTSession`) uses torch CUDA tensors as device buffers and torch's current stream, so
it needs no pycuda / cuda-python.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ppfr._backend import BackendUnavailableError
from ppfr.deploy.export import metadata as meta


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({exc}): the Python package `tensorrt` (10.x or 11.x) and its libraries "
            "(libnvinfer, libnvonnxparser) come from NVIDIA's index, e.g. `pip install --extra-index-url "
            "https://pypi.nvidia.com tensorrt-cu12`, and need a CUDA GPU; export --format onnx runs anywhere"
        ) from None
    except OSError as exc:  # the bindings wheel without the shared libraries
        raise BackendUnavailableError(f"TensorRT's libraries cannot be loaded ({exc})") from None
    return trt


def tensorrt_unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why TensorRT cannot build/run engines here, or None if it can."""
    try:
        _import_tensorrt()
    except BackendUnavailableError as exc:
        return str(exc)
    if need_gpu:
        import torch

        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU and torch.cuda.is_available() is False here"
    return None


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The metadata of an engine (its ``<engine>.json``); ValueError if missing or not a ppfr sidecar."""
    side = sidecar_path(engine_path)
    try:
        data = json.loads(side.read_text())
    except FileNotFoundError:
        raise ValueError(f"{engine_path} has no metadata sidecar {side.name}; build engines with "
                         "`ppfr export --format tensorrt`") from None  # fmt: skip
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{side} must hold a JSON object")
    meta.check_metadata({k: str(v) for k, v in data.items()}, str(side))
    return data


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")


def _fp16_onnx_for_trt11(onnx_path: Path, workdir: Path) -> Path:
    try:
        import modelopt.onnx.autocast as autocast
    except ImportError as exc:
        raise BackendUnavailableError(
            f"fp16 on TensorRT 11 needs a mixed-precision ONNX graph (the FP16 builder flag was removed) and "
            f"NVIDIA ModelOpt is not installed to make one ({exc}); `pip install nvidia-modelopt[onnx]` or build fp32"
        ) from None
    import onnx

    model = autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16",
                                                keep_io_types=True)  # fmt: skip
    out = workdir / f".{onnx_path.stem}.fp16.onnx"
    onnx.save(model, str(out))
    return out


def build_engine(onnx_path: str | Path, out_path: str | Path, fp16: bool = False, min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 64, timing_cache: str | Path | None = None,
                 workspace_gib: float = 2.0) -> Path:  # fmt: skip
    """Build a serialized TensorRT engine from a ppfr ONNX export.

    Args:
        onnx_path: an .onnx written by ``export_onnx`` (its metadata goes to the sidecar).
        out_path: the engine file (``.engine`` or ``.plan``); ``<out_path>.json`` is written next to it.
        fp16: allow FP16 kernels (I/O stays float32); see the module docstring for TensorRT 11.
        min_batch, opt_batch, max_batch: the optimization profile of the batch axis of every input.
        timing_cache: file to load layer timings from (if present) and save them back to (faster rebuilds).
        workspace_gib: builder workspace memory pool limit.
    Returns:
        ``out_path``.
    Raises:
        ValueError (bad batch range, not a ppfr ONNX file), BackendUnavailableError (no TensorRT / GPU here),
        RuntimeError (the parser or builder failed; the parser's errors are in the message).
    """
    _check_batches(min_batch, opt_batch, max_batch)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    props = meta.read_onnx_metadata(onnx_path)
    meta.check_metadata(props, str(onnx_path))
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:  # the bindings return nullptr without a usable CUDA device
        raise BackendUnavailableError("TensorRT could not create a builder (no usable CUDA device?)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = onnx_path
    weak_fp16 = hasattr(trt.BuilderFlag, "FP16")  # TensorRT 10; removed in 11 (strongly typed networks only)
    if fp16 and not weak_fp16:
        src = _fp16_onnx_for_trt11(onnx_path, out_path.parent)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10 and 11
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {src}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 and weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        per_sample = tuple(tensor.shape)[1:]
        if any(d < 0 for d in per_sample):
            raise ValueError(f"input {tensor.name!r} has dynamic non-batch dims {tuple(tensor.shape)}")
        profile.set_shape(tensor.name, (min_batch, *per_sample), (opt_batch, *per_sample), (max_batch, *per_sample))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(memoryview(serialized))
    os.replace(tmp, out_path)
    if cache is not None:
        Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    side = {k: props.get(k, "") for k in meta.KEYS}
    side.update({"tensorrt_version": trt.__version__, "fp16": bool(fp16), "min_batch": min_batch,
                 "opt_batch": opt_batch, "max_batch": max_batch, "onnx_sha256": meta.file_sha256(onnx_path),
                 "engine": out_path.name})  # fmt: skip
    sidecar_path(out_path).write_text(json.dumps(side, indent=1))
    if src != onnx_path:
        src.unlink(missing_ok=True)
    return out_path


class TensorRTSession:
    """A deserialized engine with one execution context; ``run(numpy inputs) -> {output: numpy}`` (thread-safe)."""

    def __init__(self, engine_path: str | Path, device: int = 0) -> None:
        trt = _import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT engines run on CUDA GPUs; torch.cuda.is_available() is False here")
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {engine_path}: built by another TensorRT version or "
                               "for another GPU? Rebuild it here with `ppfr export --format tensorrt`")  # fmt: skip
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._lock = threading.Lock()  # one execution context: calls are serialised

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self._torch, self._trt
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            keep = []
            for name in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.device)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                out = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outs[name] = out
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
            stream.synchronize()
            return {k: v.float().cpu().numpy() for k, v in outs.items()}
