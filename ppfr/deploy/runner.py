"""One runner API over eager PyTorch, ONNX Runtime and TensorRT: payload arrays in, unit-norm embeddings out.

```python
from ppfr.deploy.runner import load_runner
r = load_runner("runs/duetface_tiny/model.pt")            # backend="auto"
r.backend, r.method, r.input_spec, r.embedding_size       # "onnxruntime", "duetface", {name: TensorSpec}, 512
emb = r.run({"dct": ..., "feat0": ..., ..., "roi": ...})  # numpy (B, *spec.shape) -> (B, D) float32, unit norm
```

``path`` is one of

* a ``model.pt`` written by ``ppfr train`` (read safely with ``load_method``),
* ``method:NAME`` or ``method:NAME:key=value,key=value`` -- untrained defaults (weights from a fixed seed), for tests
  and demos,
* an ``.onnx`` file written by ``ppfr export`` (the method and input spec come from its metadata),
* a ``.engine`` / ``.plan`` TensorRT engine with its ``<engine>.json`` sidecar.

Backend selection (``backend="auto"``), in order:

1. **tensorrt** if TensorRT is importable with a CUDA device, and an engine is at hand: the path itself, the
   sibling ``<stem>.engine`` / ``<stem>.plan`` of an ``.onnx``, or ``export/server.engine`` next to a
   ``model.pt`` -- an engine next to a checkpoint is used only if its sidecar's ``ppfr_source_sha256`` is the
   checkpoint's digest (a stale export of an older checkpoint is ignored).
2. **onnxruntime** if onnxruntime is importable and the path is an ``.onnx`` (or an engine with a sibling
   ``.onnx``), or a checkpoint that exports: ``export/server.onnx`` next to the checkpoint when its digest
   matches, else an export made once into the cache (``$PPFR_CACHE_DIR`` or ``~/.cache/ppfr/deploy``, keyed by the
   digest).
3. **eager** otherwise (a checkpoint or ``method:`` source only; also the fallback, with a warning, when an
   automatic export fails).

An explicit ``backend=`` never falls back: it runs that backend or raises (``BackendUnavailableError`` when the
backend cannot run here, ``ValueError`` when the path cannot be run by it, e.g. ``eager`` on an ``.onnx``).

Every runner validates its inputs against ``input_spec`` (names, per-sample shape, dtype, batch agreement, value
range where the spec has one) and raises ValueError naming the tensor and the problem. ``run`` is thread-safe.
Client networks (``ppfr export --part client``) run through :func:`load_client_runner` (outputs are feature
maps, not embeddings).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from ppfr._backend import BackendUnavailableError
from ppfr.deploy import meta
from ppfr.methods.base import TensorSpec

RUNNER_BACKENDS = ("auto", "eager", "onnxruntime", "tensorrt", "triton")
ENGINE_SUFFIXES = (".engine", ".plan")


# --------------------------------------------------------------------------------------------------- validation
def validate_inputs(spec: dict[str, TensorSpec], inputs: dict[str, Any], where: str = "runner",
                    max_batch: int | None = None) -> int:  # fmt: skip
    """Check ``inputs`` against ``spec``; return the batch size B. Raises ValueError naming the problem.

    Each input must be a numpy array (B, *spec.shape) of spec's dtype, all with the same B >= 1 (and <= max_batch),
    values within [low, high] where the spec sets them (NaN is out of range).
    """
    if not isinstance(inputs, dict):
        raise ValueError(f"{where}: inputs must be a dict name -> numpy array, got {type(inputs).__name__}")
    missing, extra = [k for k in spec if k not in inputs], [k for k in inputs if k not in spec]
    if missing or extra:
        raise ValueError(f"{where}: inputs must be exactly {list(spec)}; missing {missing}, unexpected {extra}")
    batch = None
    for name, s in spec.items():
        a = inputs[name]
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{where}: input {name!r} must be a numpy array, got {type(a).__name__}")
        want = meta.numpy_dtype(s)
        if a.dtype != want:
            raise ValueError(f"{where}: input {name!r} must be {want}, got {a.dtype}")
        if a.ndim != len(s.shape) + 1 or tuple(a.shape[1:]) != tuple(s.shape):
            raise ValueError(f"{where}: input {name!r} must be (B, {', '.join(map(str, s.shape))}), got {a.shape}")
        if batch is not None and a.shape[0] != batch:
            raise ValueError(f"{where}: inputs disagree on the batch size ({name!r} has {a.shape[0]}, others {batch})")
        batch = a.shape[0]
        if batch == 0:
            raise ValueError(f"{where}: input {name!r} has an empty batch")
        if max_batch is not None and batch > max_batch:
            raise ValueError(f"{where}: batch {batch} exceeds this engine's maximum {max_batch}; split the batch")
        if s.low is not None or s.high is not None:
            lo, hi = (float(a.min()), float(a.max())) if a.dtype.kind == "f" else (a.min(), a.max())
            if np.isnan(lo) or np.isnan(hi):
                raise ValueError(f"{where}: input {name!r} contains NaN")
            if s.low is not None and lo < s.low - 1e-6:
                raise ValueError(f"{where}: input {name!r} has values below {s.low} (min {lo})")
            if s.high is not None and hi > s.high + 1e-6:
                raise ValueError(f"{where}: input {name!r} has values above {s.high} (max {hi})")
    assert batch is not None  # spec is never empty
    return batch


l2_normalize = meta.l2_normalize  # re-exported: ppfr.deploy.runner.l2_normalize is public


# --------------------------------------------------------------------------------------------------- runners
class Runner(ABC):
    """The server side of a method on some backend: ``run(payload arrays) -> (B, D) unit-norm embeddings``.

    Attributes:
        backend: "eager" | "onnxruntime" | "tensorrt".
        method: the method name (``duetface``, ...): the payload must be this method's.
        input_spec: name -> TensorSpec (per-sample shape, dtype, range) of the payload, in input order.
        embedding_size: D.
        max_batch_size: largest batch accepted in one call (TensorRT: the engine profile's maximum), else None.
        source: what was loaded (a path or ``method:NAME``).
    """

    backend: str
    method: str
    input_spec: dict[str, TensorSpec]
    embedding_size: int
    max_batch_size: int | None = None
    source: str = ""

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Payload arrays (B, *input_spec[name].shape) -> (B, embedding_size) float32, L2-normalised."""
        validate_inputs(self.input_spec, inputs, f"{self.method} {self.backend} runner", self.max_batch_size)
        out = self._run({k: np.ascontiguousarray(inputs[k]) for k in self.input_spec})
        return l2_normalize(out)

    @abstractmethod
    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Validated, contiguous inputs -> raw (B, D) embeddings."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, method={self.method!r}, "
                f"embedding_size={self.embedding_size}, source={self.source!r})")  # fmt: skip


class EagerRunner(Runner):
    """``method.recognize`` in PyTorch (the ppfr ops run their fastest backend here: C++ on CPUs)."""

    backend = "eager"

    def __init__(self, method, device: str | None = None, source: str = "") -> None:
        import torch

        self.device = torch.device(device) if device else next(method.parameters()).device
        self._method = method.to(self.device).eval()
        self.method = method.name
        self.input_spec = dict(method.payload_spec)
        self.embedding_size = int(method.options.embedding_size)
        self.source = source

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        from ppfr.methods.base import Payload

        with torch.inference_mode():
            tensors = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
            return self._method.recognize(Payload(self.method, tensors)).float().cpu().numpy()


_OrtSession = meta.OrtSession  # the class itself (tests patch its __init__)


class OnnxRuntimeRunner(Runner):
    """An exported server graph on ONNX Runtime (CUDA provider when available, else CPU)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        self._sess = _OrtSession(path, providers, threads)
        m = self._sess.meta
        if m["ppfr_part"] != "server":
            raise ValueError(f"{path} is a {m['ppfr_part']} graph, not a server graph; use load_client_runner")
        self.method = m["ppfr_method"]
        self.input_spec = self._sess.input_spec
        self.embedding_size = int(self._sess.outputs[meta.EMBEDDING][0])
        self.source = str(path)
        self.metadata = m

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._sess.run(inputs)[meta.EMBEDDING]


class TensorRTRunner(Runner):
    """A TensorRT engine (built by ``ppfr export --format tensorrt``) on the first CUDA device."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, device: int = 0) -> None:
        from ppfr.deploy.tensorrt import TensorRTSession, read_sidecar

        side = read_sidecar(path)
        if side["ppfr_part"] != "server":
            raise ValueError(f"{path} is a {side['ppfr_part']} engine, not a server engine; use load_client_runner")
        self._sess = TensorRTSession(path, device)
        self.method = side["ppfr_method"]
        self.input_spec = meta.spec_from_json(side["ppfr_input_spec"])
        self.embedding_size = int(meta.outputs_from_json(side["ppfr_output"])[meta.EMBEDDING][0])
        self.max_batch_size = int(side["max_batch"])
        self.source = str(path)
        self.metadata = side

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._sess.run(inputs)[meta.EMBEDDING]


# ------------------------------------------------------------------------------------------------ client side
class ClientRunner:
    """A client network (DuetFace: 30 DCT channels -> feat0..3; PRO-Face C: residual -> aux0..3) on a backend.

    ``run(inputs) -> {output name: (B, *shape) float32}``; inputs are validated like :class:`Runner`'s.
    """

    def __init__(self, backend: str, method: str, input_spec: dict[str, TensorSpec],
                 outputs: dict[str, tuple[int, ...]], fn, source: str,
                 max_batch_size: int | None = None) -> None:  # fmt: skip
        self.backend, self.method, self.input_spec, self.outputs = backend, method, input_spec, outputs
        self._fn, self.source, self.max_batch_size = fn, source, max_batch_size

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_inputs(self.input_spec, inputs, f"{self.method} client {self.backend} runner", self.max_batch_size)
        out = self._fn({k: np.ascontiguousarray(inputs[k]) for k in self.input_spec})
        return {k: np.asarray(out[k], dtype=np.float32) for k in self.outputs}

    def __repr__(self) -> str:
        return f"ClientRunner(backend={self.backend!r}, method={self.method!r}, source={self.source!r})"


class TritonRunner(Runner):
    """Inference delegated to a Triton Inference Server over gRPC (``tritonclient.grpc``), serving a model repository
    written by ``ppfr export --format triton``: ``TritonRunner("triton://host:8001/partialface_server")``.

    The method, input spec and batch limit are read from the model's config (the ppfr ``parameters`` that
    ``write_triton_model`` stores), so nothing but the URL is needed; without a model name the repository's one ppfr
    server model is used. Triton batches on its side too (``dynamic_batching``); the raw embedding it returns is
    L2-normalised here like every runner's. ``client``: an ``InferenceServerClient`` (tests pass a stand-in).
    """

    backend = "triton"

    def __init__(self, url: str, client: Any = None, timeout: float = 30.0, grpc: Any = None) -> None:
        from ppfr.deploy.triton import config_spec, parse_triton_url

        address, model = parse_triton_url(url)
        if grpc is None:
            try:
                import tritonclient.grpc as grpc
            except ImportError as exc:
                raise BackendUnavailableError(f"tritonclient is not installed ({exc}); "
                                              "`pip install tritonclient[grpc]`") from None  # fmt: skip
        self._grpc, self.timeout, self.source = grpc, timeout, url
        self._client = client if client is not None else grpc.InferenceServerClient(url=address)
        if model is None:
            model = self._only_server_model(url)
        try:
            ready = self._client.is_model_ready(model)
        except Exception as exc:  # InferenceServerException: unreachable server, unknown model
            raise RuntimeError(f"Triton at {address}: {exc}") from None
        if not ready:
            raise RuntimeError(f"Triton at {address}: model {model!r} is not ready (loaded?)")
        info = config_spec(self._client.get_model_config(model).config)
        if info["part"] != "server":
            raise ValueError(f"Triton model {model!r} is a {info['part']} graph, not a server graph")
        if meta.EMBEDDING not in info["outputs"]:
            raise ValueError(f"Triton model {model!r} has no {meta.EMBEDDING!r} output")
        self.model, self.method, self.input_spec = model, info["method"], info["input_spec"]
        self.embedding_size = int(info["outputs"][meta.EMBEDDING][0])
        self.max_batch_size = info["max_batch_size"]

    def _only_server_model(self, url: str) -> str:
        from ppfr.deploy.triton import config_spec

        names = [m.name for m in self._client.get_model_repository_index().models]
        servers = []
        for n in names:
            try:
                if config_spec(self._client.get_model_config(n).config)["part"] == "server":
                    servers.append(n)
            except ValueError:  # not a ppfr model
                continue
        if len(servers) != 1:
            raise ValueError(f"{url}: name the model (triton://host:port/MODEL); ppfr server models in the "
                             f"repository: {servers or 'none'}")  # fmt: skip
        return servers[0]

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from ppfr.deploy.triton import infer_request

        reqs, outs = infer_request(self._grpc, self.input_spec, inputs, [meta.EMBEDDING])
        result = self._client.infer(self.model, reqs, outputs=outs, client_timeout=self.timeout)
        emb = result.as_numpy(meta.EMBEDDING)
        if emb is None:
            raise RuntimeError(f"Triton model {self.model!r} returned no {meta.EMBEDDING!r}")
        return np.asarray(emb, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- loading
def _onnxruntime_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); `pip install onnxruntime==1.31.1`"
    return None


def _tensorrt_reason() -> str | None:
    from ppfr.deploy.tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason(need_gpu=True)


def _kind(path: str | Path) -> str:
    s = str(path)
    if s.startswith("method:"):
        return "method"
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
            from ppfr.deploy.tensorrt import read_sidecar

            return read_sidecar(path).get("ppfr_source_sha256") == digest
        from ppfr.deploy.meta import read_onnx_metadata

        return read_onnx_metadata(path).get("ppfr_source_sha256") == digest
    except (ValueError, OSError):
        return False


def _cached_onnx(source: str | Path, part: str) -> Path:
    """An ONNX export of a checkpoint / ``method:`` source: next to it if current, else made once in the cache."""
    from ppfr.deploy.export import export_onnx, load_source

    kind = _kind(source)
    if kind == "checkpoint":
        digest = meta.file_sha256(source)
        sibling = Path(source).parent / "export" / f"{part}.onnx"
        if _matching(sibling, digest, engine=False):
            return sibling
    else:
        digest = None
    method, info = load_source(source)
    digest = digest or info["sha256"]
    target = meta.cache_dir() / digest[:20] / f"{part}.onnx"
    if _matching(target, digest, engine=False):
        return target
    return export_onnx(method, target, part=part, source=info["label"], source_sha256=digest)


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
    from ppfr.deploy.tensorrt import build_engine

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
        try:
            return "onnxruntime", _cached_onnx(path, part)
        except Exception as exc:  # auto must still serve: the eager path runs every method
            warnings.warn(f"automatic ONNX export of {path} failed ({type(exc).__name__}: {exc}); running eager",
                          stacklevel=3)  # fmt: skip
    return "eager", path


def load_runner(path: str | Path, backend: str = "auto", *, device: str | None = None,
                providers: list[str] | None = None, threads: int | None = None) -> Runner:  # fmt: skip
    """Load the server side of a model on a backend (see the module docstring for ``path`` and ``auto``).

    Args:
        path: model.pt, ``method:NAME[:k=v,...]``, .onnx, .engine/.plan, or ``triton://host:port[/model]`` (a
            Triton Inference Server serving a ``ppfr export --format triton`` repository).
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
    from ppfr.deploy.export import load_source

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
        from ppfr.deploy.tensorrt import TensorRTSession, read_sidecar

        side = read_sidecar(target)
        if side["ppfr_part"] != "client":
            raise ValueError(f"{target} is a {side['ppfr_part']} engine, not a client engine; use load_runner")
        sess = TensorRTSession(target)
        return ClientRunner(be, side["ppfr_method"], meta.spec_from_json(side["ppfr_input_spec"]),
                            meta.outputs_from_json(side["ppfr_output"]), sess.run, str(target),
                            int(side["max_batch"]))  # fmt: skip
    import torch

    from ppfr.deploy.export import ClientGraph, graph_io, load_source

    method, info = load_source(target)
    dev = torch.device(device) if device else torch.device("cpu")
    graph = ClientGraph(method.to(dev).eval())
    spec, outputs = graph_io(method, "client")

    def fn(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = graph(*(torch.from_numpy(inputs[k]).to(dev) for k in spec))
        return {k: v.float().cpu().numpy() for k, v in zip(outputs, outs)}

    return ClientRunner("eager", method.name, spec, outputs, fn, info["label"])
