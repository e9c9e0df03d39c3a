"""Which runner runs a model, and loading it: ``load_runner`` / ``load_client_runner``.

```python
from ppfr.deploy.runtime import load_runner
r = load_runner("runs/duetface_tiny/model.pt")            # backend="auto"
r.backend, r.method, r.input_spec, r.embedding_size       # "onnxruntime", "duetface", {name: TensorSpec}, 512
emb = r.run({"dct": ..., "feat0": ..., ..., "roi": ...})  # numpy (B, *spec.shape) -> (B, D) float32, unit norm
```

``path`` is one of

* a ``model.pt`` written by ``ppfr train`` (read safely with ``load_method``), or a run folder holding one,
* ``method:NAME`` or ``method:NAME:key=value,key=value`` -- untrained defaults (weights from the fixed seed every
  verb uses, :mod:`ppfr.methods.spec`), for tests and demos,
* an ``.onnx`` file written by ``ppfr export`` (the method and input spec come from its metadata),
* a ``.engine`` / ``.plan`` TensorRT engine with its ``<engine>.json`` sidecar,
* ``triton://host:port[/model]``: a Triton Inference Server (``triton_server``).

Backend selection (``backend="auto"``), in order:

1. **tensorrt** if TensorRT is importable with a CUDA device, and an engine is at hand: the path itself, the
   sibling ``<stem>.engine`` / ``<stem>.plan`` of an ``.onnx``, or ``export/server.engine`` next to a
   ``model.pt`` -- an engine next to a checkpoint is used only if its sidecar's ``ppfr_source_sha256`` is the
   checkpoint's digest (a stale export of an older checkpoint is ignored).
2. **onnxruntime** if onnxruntime is importable and the path is an ``.onnx`` (or an engine with a sibling
   ``.onnx``), or a checkpoint / ``method:`` source with an export: ``export/server.onnx`` next to the checkpoint
   when its digest matches (``ppfr export``, which checked its parity), else the one made earlier in the cache
   (``$PPFR_CACHE_DIR`` or ``~/.cache/ppfr/deploy``, keyed by the digest), else one made now, once, explicitly:
   exported, checked for parity against eager PyTorch exactly as ``ppfr export`` checks it, and cached only if it
   passed. Each step is logged (``ppfr.deploy.runtime``).
3. **eager** otherwise (a checkpoint or ``method:`` source only): when onnxruntime is missing, or when the method's
   options cannot be exported or the export failed its parity check (``ExportError``, logged as a warning that says
   why). Any other error is raised: nothing falls back silently.

An explicit ``backend=`` never falls back: it runs that backend or raises (``BackendUnavailableError`` when the
backend cannot run here, ``ValueError`` when the path cannot be run by it, e.g. ``eager`` on an ``.onnx``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ppfr._backend import BackendUnavailableError
from ppfr.deploy.export import metadata as meta
from ppfr.deploy.runtime.runners import (
    ClientRunner, EagerRunner, OnnxRuntimeRunner, Runner, TensorRTRunner, _OrtSession,
)  # fmt: skip
from ppfr.deploy.runtime.triton_server import TritonRunner
from ppfr.methods.spec import is_method_spec, parse_model_spec

RUNNER_BACKENDS = ("auto", "eager", "onnxruntime", "tensorrt", "triton")
ENGINE_SUFFIXES = (".engine", ".plan")

log = logging.getLogger("ppfr.deploy.runtime")


def _onnxruntime_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); `pip install onnxruntime==1.31.1`"
    return None


def _tensorrt_reason() -> str | None:
    from ppfr.deploy.export.tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason(need_gpu=True)


def _kind(path: str | Path) -> str:
    if is_method_spec(path):
        return "method"
    s = str(path)
    suffix = Path(s).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    return "checkpoint"


def _sibling_engine(onnx_path: Path) -> Path | None:
    for suf in ENGINE_SUFFIXES:
        p = onnx_path.with_suffix(suf)
        if p.is_file():
            return p
    return None


def _matching(path: Path, digest: str, engine: bool) -> bool:
    """True if the export at ``path`` was made from the source with this digest."""
    if not path.is_file():
        return False
    try:
        if engine:
            from ppfr.deploy.export.tensorrt import read_sidecar

            return read_sidecar(path).get("ppfr_source_sha256") == digest
        return meta.read_onnx_metadata(path).get("ppfr_source_sha256") == digest
    except (ValueError, OSError):
        return False


def _cached_onnx(source: str | Path, part: str) -> Path:
    """An ONNX export of a checkpoint / ``method:`` source: next to it if current (``ppfr export``'s), else the one
    this function made in the cache earlier, else made now, once: exported, checked for parity as ``ppfr export``
    checks it, and only then put in place (logged at each step)."""
    from ppfr.deploy.export.onnx import load_source

    kind = _kind(source)
    if kind == "checkpoint":
        digest = meta.file_sha256(source)
        sibling = Path(source).parent / "export" / f"{part}.onnx"
        if _matching(sibling, digest, engine=False):
            log.info("%s: running its export %s", source, sibling)
            return sibling
    else:
        digest = None
    method, info = load_source(source)
    digest = digest or info["sha256"]
    target = meta.cache_dir() / digest[:20] / f"{part}.onnx"
    if _matching(target, digest, engine=False):
        log.info("%s: running its parity-checked export %s", source, target)
        return target
    return _export_checked(method, target, part, info["label"], digest)


def _export_checked(method: Any, target: Path, part: str, label: str, digest: str) -> Path:
    """Export ``method``'s ``part`` graph to ``target`` with the parity check of ``ppfr export``; ExportError (and
    nothing at ``target``) if it fails. The export is written beside ``target`` and renamed into place only once it
    passed, so a cached file is always a checked one."""
    from ppfr.deploy.export.onnx import ExportError, export_onnx, verify_parity

    log.info("%s: exporting the %s graph to %s once (ONNX, with the parity check of ppfr export)", label, part,
             target)  # fmt: skip
    tmp = target.with_name(f".{target.name}.{os.getpid()}.checking")
    try:
        export_onnx(method, tmp, part=part, source=label, source_sha256=digest)
        ok, lines = verify_parity(method, tmp, part)
        for line in lines:
            log.info("%s: %s", label, line)
        if not ok:
            raise ExportError(f"the ONNX export of {label} failed its {lines[-1]}; run it with --backend eager, or "
                              f"inspect `ppfr export {label} --format onnx`")  # fmt: skip
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _engine_for_checkpoint(source: str | Path, part: str) -> Path | None:
    if _kind(source) != "checkpoint":
        return None
    digest = meta.file_sha256(source)
    for suf in ENGINE_SUFFIXES:
        p = Path(source).parent / "export" / f"{part}{suf}"
        if _matching(p, digest, engine=True):
            return p
    return None


def _build_cached_engine(source: str | Path, part: str) -> Path:
    from ppfr.deploy.export.tensorrt import build_engine

    onnx_path = _cached_onnx(source, part)
    engine = onnx_path.with_suffix(".engine")
    digest = meta.file_sha256(source) if _kind(source) == "checkpoint" else None
    if engine.is_file() and (digest is None or _matching(engine, digest, engine=True)):
        return engine
    return build_engine(onnx_path, engine, timing_cache=onnx_path.parent / "timing.cache")


def _resolve(path: str | Path, backend: str, part: str) -> tuple[str, Path | str]:
    """(backend, what to load) following the selection rule of the module docstring."""
    if backend not in RUNNER_BACKENDS:
        raise ValueError(f"unknown runner backend {backend!r}; choose one of {RUNNER_BACKENDS}")
    kind = _kind(path)
    if kind != "method" and not Path(path).exists():
        raise FileNotFoundError(f"no model at {path}")
    if kind == "checkpoint":
        path = parse_model_spec(path).path  # a run folder -> its model.pt (the digest is the file's)
    if kind in ("onnx", "engine"):
        p = Path(path)
        if backend == "eager":
            raise ValueError(f"{p} is an exported graph; the eager backend needs a model.pt or method:NAME")
        if kind == "engine":
            if backend in ("auto", "tensorrt"):
                reason = _tensorrt_reason()
                if reason is None or backend == "tensorrt":
                    return "tensorrt", p
                if p.with_suffix(".onnx").is_file():
                    warnings.warn(f"TensorRT cannot run here ({reason}); using the sibling ONNX file", stacklevel=3)
                    return "onnxruntime", p.with_suffix(".onnx")
                raise BackendUnavailableError(f"cannot run {p}: {reason}")
            if p.with_suffix(".onnx").is_file():
                return "onnxruntime", p.with_suffix(".onnx")
            raise ValueError(f"{p} is a TensorRT engine with no sibling .onnx for onnxruntime")
        if backend == "tensorrt":
            eng = _sibling_engine(p)
            if eng is None:
                raise ValueError(f"no TensorRT engine next to {p}; build one with `ppfr export --format tensorrt`")
            return "tensorrt", eng
        if backend == "auto" and (eng := _sibling_engine(p)) is not None and _tensorrt_reason() is None:
            return "tensorrt", eng
        return "onnxruntime", p
    # a checkpoint or method: source
    if backend == "eager":
        return "eager", path
    if backend == "tensorrt":
        reason = _tensorrt_reason()
        if reason is not None:
            raise BackendUnavailableError(f"tensorrt backend unavailable: {reason}")
        return "tensorrt", _engine_for_checkpoint(path, part) or _build_cached_engine(path, part)
    if backend == "auto" and _tensorrt_reason() is None and (eng := _engine_for_checkpoint(path, part)) is not None:
        return "tensorrt", eng
    reason = _onnxruntime_reason()
    if backend == "onnxruntime":
        if reason is not None:
            raise BackendUnavailableError(f"onnxruntime backend unavailable: {reason}")
        return "onnxruntime", _cached_onnx(path, part)
    if reason is None:
        from ppfr.deploy.export.onnx import ExportError

        try:
            return "onnxruntime", _cached_onnx(path, part)
        except ExportError as exc:  # these options cannot be exported, or the export failed its parity check
            log.warning("%s: running eager instead of ONNX Runtime: %s", path, exc)
    else:
        log.info("%s: running eager (%s)", path, reason)
    return "eager", path


def load_runner(path: str | Path, backend: str = "auto", *, device: str | None = None,
                providers: list[str] | None = None, threads: int | None = None) -> Runner:  # fmt: skip
    """Load the server side of a model on a backend (see the module docstring for ``path`` and ``auto``).

    Args:
        path: model.pt (or its run folder), ``method:NAME[:k=v,...]``, .onnx, .engine/.plan, or
            ``triton://host:port[/model]`` (a Triton Inference Server serving a ``ppfr export --format triton``
            repository).
        backend: "auto" | "eager" | "onnxruntime" | "tensorrt" | "triton" (auto picks triton for a triton:// URL).
        device: eager only (default: CPU).
        providers: onnxruntime providers (default: CUDA if available, then CPU).
        threads: onnxruntime intra-op threads (default: ORT's choice).
    Raises:
        FileNotFoundError, ValueError (not runnable by that backend / not a ppfr export / client graph),
        BackendUnavailableError (the backend cannot run here; the message says what is missing),
        ppfr.models.checkpoints.CheckpointError (an unreadable or foreign checkpoint).
    """
    if str(path).startswith(("triton://", "triton+grpc://")) or backend == "triton":
        if backend not in ("auto", "triton") or not str(path).startswith(("triton://", "triton+grpc://")):
            raise ValueError(f"a Triton runner takes triton://host:port[/model] with backend auto or triton, got "
                             f"{path!r} with backend {backend!r}")  # fmt: skip
        return TritonRunner(str(path))
    be, target = _resolve(path, backend, "server")
    if be == "tensorrt":
        return TensorRTRunner(target)
    if be == "onnxruntime":
        return OnnxRuntimeRunner(target, providers, threads)
    from ppfr.deploy.export.onnx import load_source

    method, info = load_source(target)
    return EagerRunner(method, device, info["label"])


def load_client_runner(path: str | Path, backend: str = "auto", *, device: str | None = None,
                       providers: list[str] | None = None, threads: int | None = None) -> ClientRunner:  # fmt: skip
    """Like :func:`load_runner` for the client network of DuetFace / PRO-Face C (``ppfr export --part client``)."""
    be, target = _resolve(path, backend, "client")
    if be == "onnxruntime":
        s = _OrtSession(target, providers, threads)
        if s.meta["ppfr_part"] != "client":
            raise ValueError(f"{target} is a {s.meta['ppfr_part']} graph, not a client graph; use load_runner")
        return ClientRunner(be, s.meta["ppfr_method"], s.input_spec, s.outputs, s.run, str(target))
    if be == "tensorrt":
        from ppfr.deploy.export.tensorrt import TensorRTSession, read_sidecar

        side = read_sidecar(target)
        if side["ppfr_part"] != "client":
            raise ValueError(f"{target} is a {side['ppfr_part']} engine, not a client engine; use load_runner")
        sess = TensorRTSession(target)
        return ClientRunner(be, side["ppfr_method"], meta.spec_from_json(side["ppfr_input_spec"]),
                            meta.outputs_from_json(side["ppfr_output"]), sess.run, str(target),
                            int(side["max_batch"]))  # fmt: skip
    import torch

    from ppfr.deploy.export.onnx import GraphModule, graph_io, load_source

    method, info = load_source(target)
    dev = torch.device(device) if device else torch.device("cpu")
    graph = GraphModule(method.to(dev).eval(), "client")
    spec, outputs = graph_io(method, "client")

    def fn(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = graph(*(torch.from_numpy(inputs[k]).to(dev) for k in spec))
        return {k: v.float().cpu().numpy() for k, v in zip(outputs, outs)}

    return ClientRunner("eager", method.name, spec, outputs, fn, info["label"])
