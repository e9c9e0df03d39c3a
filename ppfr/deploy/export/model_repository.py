"""Model repositories of the NVIDIA Triton Inference Server (the inference server, not the Triton kernel language
of ``kernels/``) from ppfr exports; ``ppfr.deploy.runtime.triton_server`` is the runner that calls such a server.

Layout (``write_triton_model``)::

    <repo>/<model_name>/config.pbtxt
    <repo>/<model_name>/<version>/model.onnx     # platform onnxruntime_onnx
    <repo>/<model_name>/<version>/model.plan     # platform tensorrt_plan

``config.pbtxt`` (text protobuf of Triton's ``inference.ModelConfig``): ``max_batch_size`` > 0, so every input and
output lists its *per-sample* dims and Triton adds the batch axis (the exports' dynamic ``batch`` axis, -1);
``dynamic_batching`` with preferred batch sizes and a queue delay; one ``instance_group``; the ppfr metadata (method,
part, input spec JSON, version) as model ``parameters`` so a client can discover the payload schema from
Triton's model-config endpoint. A TensorRT plan's ``max_batch_size`` must not exceed its profile's maximum.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ppfr.deploy.export import metadata as meta

PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".engine": ("tensorrt_plan", "model.plan"),
             ".plan": ("tensorrt_plan", "model.plan")}  # fmt: skip
_TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
                  "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}  # fmt: skip
MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _q(s: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dims(shape: tuple[int, ...] | list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _metadata(model_file: Path) -> dict[str, Any]:
    if model_file.suffix == ".onnx":
        props: dict[str, Any] = meta.read_onnx_metadata(model_file)
        meta.check_metadata(props, str(model_file))
        return props
    from ppfr.deploy.export.tensorrt import read_sidecar

    return read_sidecar(model_file)


def triton_config(name: str, platform: str, props: dict[str, Any], max_batch_size: int,
                  preferred_batch_sizes: tuple[int, ...] = (8, 32), max_queue_delay_us: int = 500,
                  instance_count: int = 1, kind: str = "KIND_AUTO") -> str:  # fmt: skip
    """The config.pbtxt text for a ppfr export with metadata ``props`` (see ppfr.deploy.export.metadata)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if kind not in ("KIND_AUTO", "KIND_GPU", "KIND_CPU"):
        raise ValueError(f"instance kind must be KIND_AUTO, KIND_GPU or KIND_CPU, got {kind!r}")
    if instance_count < 1 or max_queue_delay_us < 0:
        raise ValueError("instance_count must be >= 1 and max_queue_delay_us >= 0")
    spec = meta.spec_from_json(props["ppfr_input_spec"])
    outputs = meta.outputs_from_json(props["ppfr_output"])
    preferred = sorted({b for b in preferred_batch_sizes if 1 <= b <= max_batch_size} | {max_batch_size})
    lines = [f"name: {_q(name)}", f"platform: {_q(platform)}", f"max_batch_size: {max_batch_size}", "input ["]
    for i, (k, s) in enumerate(spec.items()):
        sep = "," if i < len(spec) - 1 else ""
        lines += ["  {", f"    name: {_q(k)}", f"    data_type: {_TRITON_DTYPES[meta.dtype_name(s.dtype)]}",
                  f"    dims: {_dims(s.shape)}", "  }" + sep]  # fmt: skip
    lines += ["]", "output ["]
    for i, (k, shape) in enumerate(outputs.items()):
        sep = "," if i < len(outputs) - 1 else ""
        lines += ["  {", f"    name: {_q(k)}", "    data_type: TYPE_FP32", f"    dims: {_dims(shape)}", "  }" + sep]
    lines += ["]", "dynamic_batching {", f"  preferred_batch_size: {_dims(preferred)}",
              f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}",
              "instance_group [", "  {", f"    count: {instance_count}", f"    kind: {kind}", "  }", "]"]  # fmt: skip
    for key in ("ppfr_version", "ppfr_method", "ppfr_part", "ppfr_input_spec", "ppfr_output", "ppfr_source_sha256"):
        if props.get(key) not in (None, ""):
            lines.append(f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(str(props[key]))} }} }}")
    return "\n".join(lines) + "\n"


def write_triton_model(model_file: str | Path, repo: str | Path, model_name: str | None = None, *,
                       max_batch_size: int | None = None, preferred_batch_sizes: tuple[int, ...] = (8, 32),
                       max_queue_delay_us: int = 500, instance_count: int = 1, kind: str | None = None,
                       version: int = 1) -> Path:  # fmt: skip
    """Copy an .onnx (or .engine/.plan with its sidecar) into a Triton repository with its config.pbtxt.

    Args:
        model_file: a ppfr export.
        repo: the model repository root (created if needed).
        model_name: default ``<method>_<part>`` from the metadata.
        max_batch_size: default 64 for ONNX; a TensorRT plan's profile maximum (larger is refused).
        preferred_batch_sizes, max_queue_delay_us: dynamic batching.
        instance_count, kind: instance group (kind default KIND_GPU for plans, KIND_AUTO for ONNX).
        version: the model version directory.
    Returns:
        the model directory ``<repo>/<model_name>``.
    """
    model_file = Path(model_file)
    if model_file.suffix not in PLATFORMS:
        raise ValueError(f"{model_file}: Triton export takes an .onnx or a TensorRT .engine/.plan")
    platform, target_name = PLATFORMS[model_file.suffix]
    props = _metadata(model_file)
    name = model_name or f"{props['ppfr_method']}_{props['ppfr_part']}"
    if not MODEL_NAME.match(name):
        raise ValueError(f"model name {name!r} must match {MODEL_NAME.pattern} (it is a directory name)")
    if platform == "tensorrt_plan":
        engine_max = int(props["max_batch"])
        if max_batch_size is not None and max_batch_size > engine_max:
            raise ValueError(f"max_batch_size {max_batch_size} exceeds the engine's profile maximum {engine_max}")
        max_batch_size = max_batch_size or engine_max
    max_batch_size = max_batch_size or 64
    kind = kind or ("KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO")
    text = triton_config(name, platform, props, max_batch_size, preferred_batch_sizes, max_queue_delay_us,
                         instance_count, kind)  # fmt: skip
    model_dir = Path(repo) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, model_dir / str(version) / target_name)
    (model_dir / "config.pbtxt").write_text(text)
    (model_dir / "ppfr_metadata.json").write_text(json.dumps({k: props.get(k) for k in meta.KEYS}, indent=1))
    return model_dir
