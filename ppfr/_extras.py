"""The optional rooms of ppfr: which extra brings which importable module, and whether it is here.

``pip install ppfr`` installs the core (torch, numpy, pyyaml, pillow): ``import ppfr``, the ops, the methods,
``ppfr info``, ``ppfr demo`` and ``ppfr train`` on synthetic data. Each optional room is an extra of
pyproject.toml's ``[project.optional-dependencies]``; this table names the module each of its distributions
installs, so ``ppfr info`` can say which extras are present and the CLI can turn a missing module into
``pip install 'ppfr[serve]'``. tests/test_imports.py checks it against pyproject.toml.
"""

from __future__ import annotations

import importlib.util

# extra -> {distribution: the module it installs}. Only the rooms a user opts into; `test` and `all` are
# meta-extras and not listed.
EXTRAS: dict[str, dict[str, str]] = {
    "data": {"opencv-python-headless": "cv2", "google-crc32c": "google_crc32c", "nvidia-dali-cuda130": "nvidia.dali"},
    "eval": {"scipy": "scipy", "matplotlib": "matplotlib"},
    "export": {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"},
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "h11": "h11", "httpx": "httpx", "msgpack": "msgpack",
              "faiss-cpu": "faiss", "starlette": "starlette", "pydantic": "pydantic"},
    "fleet": {"qdrant-client": "qdrant_client", "tritonclient": "tritonclient.grpc", "protobuf": "google.protobuf"},
    "train": {"tensorboard": "tensorboard"},
}  # fmt: skip


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is absent or broken
        return False


def status() -> dict[str, list[str]]:
    """{extra: the modules of that extra that are missing here} ([] = the extra is complete). Imports nothing."""
    return {extra: [m for m in mods.values() if not _present(m)] for extra, mods in EXTRAS.items()}


def extra_for(module: str | None) -> str | None:
    """The extra that installs ``module`` (or a submodule of one of its modules), or None if no extra does."""
    if not module:
        return None
    for extra, mods in EXTRAS.items():
        for m in mods.values():
            if module == m or module.startswith(m + ".") or m.startswith(module + "."):
                return extra
    return None
