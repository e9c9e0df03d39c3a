"""Deployable graphs of a method: ONNX (``onnx``: export, export mode, parity), TensorRT engines (``tensorrt``),
Triton Inference Server model repositories (``model_repository``), and the metadata every artefact carries
(``metadata``). ``ppfr export`` is ``cli``. The graphs themselves come from the method (``Method.export_graphs``).

Imports go one way: ``cli`` -> ``model_repository`` / ``onnx`` -> ``tensorrt`` -> ``metadata``. Importing this
package imports ``onnx`` (torch; the onnx package itself only when exporting), not TensorRT.
"""

from __future__ import annotations

from ppfr.deploy.export.metadata import read_onnx_metadata
from ppfr.deploy.export.onnx import (
    MISMATCH_TOL, PARITY_TOL, ExportError, GraphModule, check_parity, export_graph, export_mode, export_onnx, graph_io,
    has_discontinuous_client, load_source, random_inputs, sample_inputs, verify_parity,
)  # fmt: skip

__all__ = ["MISMATCH_TOL", "PARITY_TOL", "ExportError", "GraphModule", "check_parity", "export_graph", "export_mode",
           "export_onnx", "graph_io", "has_discontinuous_client", "load_source", "random_inputs",
           "read_onnx_metadata", "sample_inputs", "verify_parity"]  # fmt: skip
