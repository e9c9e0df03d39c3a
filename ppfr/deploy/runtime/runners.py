"""The runners: one API over eager PyTorch, ONNX Runtime and TensorRT (and a Triton Inference Server,
``triton_server``): payload arrays in, unit-norm embeddings out. They load artefacts; ``load`` decides which.

Every runner validates its inputs with the payload contract of ``ppfr.deploy.protocol`` (names, per-sample shape,
dtype, batch agreement, finite values, the spec's value range) and raises ValueError naming the tensor and the
problem; its output rows are L2-normalised by the protocol's one rule (a row with no direction comes back NaN, for
the server to refuse per request). ``run`` is thread-safe. Client networks (``ppfr export --part client``) run as
``ClientRunner`` (outputs are feature maps, not embeddings).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from ppfr.deploy.export import metadata as meta
from ppfr.deploy.protocol import l2_normalize, validate
from ppfr.methods.base import TensorSpec


def validate_inputs(spec: dict[str, TensorSpec], inputs: dict[str, Any], where: str = "runner",
                    max_batch: int | None = None) -> int:  # fmt: skip
    """A runner's inputs against ``spec`` (``ppfr.deploy.protocol.validate``, numpy arrays only); the batch size."""
    return validate(spec, inputs, f"{where} input", max_batch=max_batch, array_type=np.ndarray)


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
        return l2_normalize(out, strict=False)

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
        from ppfr.deploy.export.tensorrt import TensorRTSession, read_sidecar

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
