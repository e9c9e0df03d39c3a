"""Inference on an NVIDIA Triton Inference Server (the inference server, not the Triton kernel language of
``kernels/``) serving a model repository written by ``ppfr export --format triton``
(``ppfr.deploy.export.model_repository``): the ``triton://host:port[/model]`` URL, what a runner reads from the
model's config, the gRPC request of one batch, and ``TritonRunner``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ppfr._backend import BackendUnavailableError
from ppfr.deploy.export import metadata as meta
from ppfr.deploy.export.model_repository import MODEL_NAME
from ppfr.deploy.runtime.runners import Runner

# numpy / ppfr dtype names -> Triton's wire datatypes (the KServe v2 names the gRPC client takes)
TRITON_DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                    "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}  # fmt: skip
TRITON_SCHEMES = ("triton", "triton+grpc")


def parse_triton_url(url: str) -> tuple[str, str | None]:
    """``triton://host:port[/model]`` -> ("host:port", model or None); ValueError for anything else."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in TRITON_SCHEMES or not parts.hostname:
        raise ValueError(f"expected triton://host:port[/model], got {url!r}")
    model = parts.path.strip("/") or None
    if model is not None and not MODEL_NAME.match(model):
        raise ValueError(f"{url}: model name {model!r} must match {MODEL_NAME.pattern}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 8001}", model  # 8001: Triton's gRPC port


def config_spec(config: Any) -> dict[str, Any]:
    """What a runner needs from a Triton ``ModelConfig`` protobuf that ``write_triton_model`` wrote: its name, the
    ppfr method and part, the input spec (per-sample), the outputs and ``max_batch_size``. ValueError if the model
    carries no ppfr metadata (not exported by ppfr) or does not batch."""
    params = {k: v.string_value for k, v in config.parameters.items()}
    props = {**params, "ppfr_part": params.get("ppfr_part", "")}
    meta.check_metadata(props, f"Triton model {config.name!r}")
    if config.max_batch_size < 1:
        raise ValueError(f"Triton model {config.name!r} has max_batch_size {config.max_batch_size}: ppfr exports "
                         "batch (re-export with ppfr export --format triton)")  # fmt: skip
    spec = meta.spec_from_json(props["ppfr_input_spec"])
    declared = [i.name for i in config.input]
    if declared != list(spec):
        raise ValueError(f"Triton model {config.name!r}: inputs {declared} do not match its ppfr_input_spec "
                         f"{list(spec)}")  # fmt: skip
    return {"name": config.name, "method": props["ppfr_method"], "part": props["ppfr_part"], "input_spec": spec,
            "outputs": meta.outputs_from_json(props["ppfr_output"]), "max_batch_size": int(config.max_batch_size)}


def infer_request(grpc: Any, input_spec: dict[str, Any], inputs: dict[str, Any],
                  outputs: list[str]) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """Validated payload arrays (B, *per-sample shape), in the spec's order -> (``InferInput`` list, ``InferRequested
    Output`` list) of ``grpc`` (the ``tritonclient.grpc`` module, or a stand-in with the same two classes)."""
    reqs = []
    for name, s in input_spec.items():
        a = inputs[name]
        inp = grpc.InferInput(name, [int(d) for d in a.shape], TRITON_DATATYPES[meta.dtype_name(s.dtype)])
        inp.set_data_from_numpy(a)
        reqs.append(inp)
    return reqs, [grpc.InferRequestedOutput(o) for o in outputs]


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
        reqs, outs = infer_request(self._grpc, self.input_spec, inputs, [meta.EMBEDDING])
        result = self._client.infer(self.model, reqs, outputs=outs, client_timeout=self.timeout)
        emb = result.as_numpy(meta.EMBEDDING)
        if emb is None:
            raise RuntimeError(f"Triton model {self.model!r} returned no {meta.EMBEDDING!r}")
        return np.asarray(emb, dtype=np.float32)
