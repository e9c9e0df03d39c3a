"""Running a model: runners over eager PyTorch, ONNX Runtime, TensorRT and a Triton Inference Server
(``runners``, ``triton_server``), and choosing and loading one (``load``: ``load_runner``, ``load_client_runner``).
Runners load artefacts; the one export they make (a ``model.pt`` served on ONNX Runtime) is explicit, parity-checked
and logged (see ``load``).
"""

from __future__ import annotations

from ppfr.deploy.runtime.load import ENGINE_SUFFIXES, RUNNER_BACKENDS, load_client_runner, load_runner
from ppfr.deploy.runtime.runners import (
    ClientRunner, EagerRunner, OnnxRuntimeRunner, Runner, TensorRTRunner, validate_inputs,
)  # fmt: skip
from ppfr.deploy.runtime.triton_server import TritonRunner

__all__ = ["ENGINE_SUFFIXES", "RUNNER_BACKENDS", "ClientRunner", "EagerRunner", "OnnxRuntimeRunner", "Runner",
           "TensorRTRunner", "TritonRunner", "load_client_runner", "load_runner", "validate_inputs"]  # fmt: skip
