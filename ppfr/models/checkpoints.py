"""Loaders for the public checkpoint formats the methods depend on. Every file is loaded with
``torch.load(weights_only=True)``: untrusted checkpoints are never unpickled with arbitrary code execution.

* AdaFace ``.ckpt`` (PyTorch Lightning): ``{"state_dict": {"model.<name>": tensor, ...}, ...}``; the IR net inside
  expects BGR input in [-1, 1] (see ProFaceC's ``server_bgr``).
* PFLD checkpoints: ``{"pfld_backbone": state_dict, ...}`` (``auxiliarynet`` is ignored).
* TFace backbone state dicts: ``Backbone_Epoch_<e>_checkpoint.pth`` = the backbone's state dict (no ``module.``
  prefix; one is stripped if present, as DataParallel/DDP saves add it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model (the message says which keys)."""


def safe_load(path: str | Path) -> dict:
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # weights_only refuses code-carrying pickles; truncated files fail here too
        raise CheckpointError(f"cannot read checkpoint {path} safely: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _load_into(model: nn.Module, state: dict, path: str | Path) -> nn.Module:
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {str(exc).splitlines()[1].strip()}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model


def load_adaface(model: nn.Module, path: str | Path) -> nn.Module:
    """AdaFace Lightning checkpoint -> IRNet (keys ``model.*``; ``head.*`` and optimiser state ignored)."""
    obj = safe_load(path)
    state = obj.get("state_dict", obj)
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path} has no 'model.*' keys: not an AdaFace checkpoint")
    return _load_into(model, state, path)


def load_pfld(model: nn.Module, path: str | Path) -> nn.Module:
    """PFLD checkpoint (key ``pfld_backbone``) -> PFLDInference."""
    obj = safe_load(path)
    if "pfld_backbone" not in obj:
        raise CheckpointError(f"{path} has no 'pfld_backbone' entry: not a PFLD checkpoint")
    return _load_into(model, _strip(obj["pfld_backbone"], "module."), path)


def load_tface_backbone(model: nn.Module, path: str | Path) -> nn.Module:
    """TFace ``Backbone_Epoch_*_checkpoint.pth`` (a bare state dict) -> model."""
    return _load_into(model, _strip(safe_load(path), "module."), path)


def load_backbone(model: nn.Module, path: str | Path) -> nn.Module:
    """Any supported backbone checkpoint: AdaFace, TFace, or a ppfr checkpoint's ``server`` weights."""
    obj = safe_load(path)
    state = obj.get("state_dict", obj)
    if any(k.startswith("model.") for k in state):
        return load_adaface(model, path)
    if "model" in obj and isinstance(obj["model"], dict):  # a ppfr training checkpoint
        inner = {k[len("server."):]: v for k, v in obj["model"].items() if k.startswith("server.")}
        return _load_into(model, inner, path)
    return _load_into(model, _strip(state, "module."), path)
