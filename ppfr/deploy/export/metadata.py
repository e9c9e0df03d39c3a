"""Metadata shared by exported graphs, engines and runners: the input spec as JSON, the metadata keys, digests,
reading an ONNX file's metadata and opening it in ONNX Runtime.

The bottom of the export / runtime imports, which go one way: ``runtime`` -> ``export.onnx`` ->
``export.tensorrt`` -> ``export.metadata`` (and ``export.model_repository`` -> ``export.tensorrt``, ``metadata``).
What two of them share lives here, never in the higher one.

Every exported artefact says what it is without the Python model: an ONNX file carries ``metadata_props``, a
TensorRT engine a sidecar ``<engine>.json``, both with the same keys (:data:`KEYS`):

``ppfr_version``      ppfr version that exported it
``ppfr_method``       method name (``duetface``, ...)
``ppfr_part``         ``server`` (payload -> embedding) or ``client`` (client network: input -> feature maps)
``ppfr_input_spec``   JSON list of ``{"name", "shape" (per sample), "dtype", "low", "high"}`` in input order
``ppfr_output``       JSON list of ``{"name", "shape" (per sample), "dtype"}`` in output order
``ppfr_opset``        ONNX opset of the graph
``ppfr_source``       what was exported: a checkpoint file name or ``method:NAME``
``ppfr_source_sha256`` digest of the checkpoint bytes (or of ``method:NAME`` + options), so a runner can tell
                      whether an export next to a checkpoint is still the export *of* that checkpoint
``ppfr_method_options`` JSON of the method options (informational)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppfr._backend import BackendUnavailableError
from ppfr.methods.base import EMBEDDING_OUTPUT, TensorSpec

KEYS = ("ppfr_version", "ppfr_method", "ppfr_part", "ppfr_input_spec", "ppfr_output", "ppfr_opset", "ppfr_source",
        "ppfr_source_sha256", "ppfr_method_options")  # fmt: skip
PARTS = ("server", "client")
EMBEDDING = EMBEDDING_OUTPUT  # the server graph's output (named by the method protocol)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
           "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}  # fmt: skip


def dtype_name(dt: torch.dtype) -> str:
    """torch.float32 -> "float32" (also the numpy name)."""
    name = str(dt).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dt} is not supported in an exported graph; use one of {sorted(_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} in an input spec; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


def numpy_dtype(spec: TensorSpec) -> np.dtype:
    return np.dtype(dtype_name(spec.dtype))


def spec_to_json(spec: dict[str, TensorSpec]) -> str:
    """Ordered input spec -> JSON (a list, so the input order survives every JSON reader)."""
    return json.dumps([{"name": k, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "low": s.low,
                        "high": s.high} for k, s in spec.items()])  # fmt: skip


def spec_from_json(text: str) -> dict[str, TensorSpec]:
    """Inverse of :func:`spec_to_json`; raises ValueError on a malformed spec."""
    try:
        items = json.loads(text)
        return {str(d["name"]): TensorSpec(tuple(int(v) for v in d["shape"]), torch_dtype(d["dtype"]),
                                           d.get("low"), d.get("high")) for d in items}  # fmt: skip
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed ppfr_input_spec metadata ({type(exc).__name__}: {exc})") from None


def outputs_to_json(outputs: dict[str, tuple[int, ...]]) -> str:
    return json.dumps([{"name": k, "shape": list(v), "dtype": "float32"} for k, v in outputs.items()])


def outputs_from_json(text: str) -> dict[str, tuple[int, ...]]:
    try:
        return {str(d["name"]): tuple(int(v) for v in d["shape"]) for d in json.loads(text)}
    except (TypeError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed ppfr_output metadata ({type(exc).__name__}: {exc})") from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def options_sha256(method: str, options: dict[str, Any]) -> str:
    """Digest of an untrained ``method:NAME`` source: its name and options (the weights are the seeded init)."""
    return hashlib.sha256(json.dumps([method, options], sort_keys=True, default=str).encode()).hexdigest()


def cache_dir() -> Path:
    """Where runners put exports they make on the fly: ``$PPFR_CACHE_DIR`` or ``~/.cache/ppfr/deploy``."""
    root = os.environ.get("PPFR_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "ppfr" / "deploy"


def check_metadata(meta: dict[str, str], where: str) -> None:
    """Raise ValueError if ``meta`` lacks the keys a runner needs (not a ppfr export)."""
    missing = [k for k in ("ppfr_method", "ppfr_part", "ppfr_input_spec", "ppfr_output") if k not in meta]
    if missing:
        raise ValueError(f"{where} has no ppfr metadata {missing}: export it with `ppfr export` "
                         "(or ppfr.deploy.export.export_onnx)")  # fmt: skip
    if meta["ppfr_part"] not in PARTS:
        raise ValueError(f"{where}: ppfr_part must be one of {PARTS}, got {meta['ppfr_part']!r}")


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"cannot read {path} as ONNX: {type(exc).__name__}: {exc}") from None
    return {p.key: p.value for p in model.metadata_props}


class OrtSession:
    """An ONNX Runtime session over a ppfr export, with its metadata (shared by the runners and export's parity
    check)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"onnxruntime is not installed ({exc}); `pip install onnxruntime==1.31.1`") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        avail = ort.get_available_providers()
        if providers is None:  # GPU first when this onnxruntime build has it; never the Azure (remote) provider
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # a corrupt or non-ONNX file: ORT raises its own Fail/InvalidProtobuf types
            raise ValueError(f"cannot load {path} with onnxruntime: {type(exc).__name__}: {exc}") from None
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        check_metadata(self.meta, str(path))
        self.input_spec = spec_from_json(self.meta["ppfr_input_spec"])
        self.outputs = outputs_from_json(self.meta["ppfr_output"])
        names = [i.name for i in self.session.get_inputs()]
        if names != list(self.input_spec):
            raise ValueError(f"{path}: graph inputs {names} do not match its ppfr_input_spec {list(self.input_spec)}")
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, inputs)))  # ORT run is thread-safe
