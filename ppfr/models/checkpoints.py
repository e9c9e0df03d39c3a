"""Loaders for the public checkpoint formats the methods depend on. Every file is loaded with
``torch.load(weights_only=True)``: untrusted checkpoints are never unpickled with arbitrary code execution.

* AdaFace ``.ckpt`` (PyTorch Lightning): ``{"state_dict": {"model.<name>": tensor, ...}, ...}``; the IR net inside
  expects BGR input in [-1, 1] (see ProFaceC's ``server_bgr``).
* PFLD checkpoints: ``{"pfld_backbone": state_dict, ...}`` (``auxiliarynet`` is ignored).
* TFace backbone state dicts: ``Backbone_Epoch_<e>_checkpoint.pth`` = the backbone's state dict (no ``module.``
  prefix; one is stripped if present, as DataParallel/DDP saves add it).

ppfr's own training checkpoints are written by :func:`save_checkpoint`: atomically (temporary file, fsync, rename)
and with a content digest, ``<file>.sha256``, a ``sha256sum``-format line holding the SHA-256 of the file's bytes
(``sha256sum -c step_00000004.pt.sha256`` checks it by hand). A torch file can lose or change bytes and still load
(a flipped bit in tensor data loads as a wrong weight, silently: ``torch.load`` does not check the zip's CRCs), so
:func:`safe_load` -- the one place ppfr calls ``torch.load`` -- first checks

1. the digest, when the sidecar exists (refusing a file that does not match it), and
2. the CRC-32 that ``torch.save`` records for every member of its zip (:func:`verify_zip`), for every file: this
   is what covers ``model.pt`` (no sidecar by design: it is copied and replaced by hand), ``init_from`` and
   transfer sources, and checkpoints written before digests. It streams the file once: 0.21 s for 160 MiB on one
   busy CPU core (~0.8 GB/s of ``zlib.crc32``), against 0.35 s for ``torch.load`` of the same file.

A file in torch's pre-1.6 format (a bare pickle, no zip, no CRCs) cannot be verified: :func:`safe_load` refuses it
unless the caller reads a public format that may predate torch 1.6 (``legacy_ok``: the TFace / PFLD / AdaFace
loaders below). ppfr itself has always written zips.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from ppfr.runtime import fsync_dir

DIGEST_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model (the message says which keys)."""


# ---------------------------------------------------------------------------------------------- digests
def digest_path(path: str | Path) -> Path:
    """The sidecar that holds ``path``'s SHA-256: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_digest(path: str | Path) -> bool:
    """Check ``path`` against its sidecar digest: True if it matches, False if there is no sidecar (the file
    cannot be verified), CheckpointError if the file or the sidecar is unreadable or they disagree."""
    path = Path(path)
    side = digest_path(path)
    try:
        line = side.read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the digest {side}: {type(exc).__name__}: {exc}") from None
    want = line.split(maxsplit=1)[0].lower() if line.strip() else ""
    if len(want) != 64 or any(c not in "0123456789abcdef" for c in want):
        raise CheckpointError(f"digest file {side} is malformed (expected '<sha256 hex>  {path.name}')")
    try:
        got = file_sha256(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if got != want:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 ({got[:12]}...) is not the one recorded "
                              f"in {side.name} ({want[:12]}...); it changed after it was written (truncated, a "
                              f"flipped bit)")  # fmt: skip
    return True


def _write_atomic(path: Path, write: Callable[[BinaryIO], object],
                  before_rename: Callable[[Path], object] | None = None) -> None:  # fmt: skip
    """``write(file)`` to a temporary file in ``path``'s folder, fsync, ``before_rename(temporary path)``, then
    rename over ``path``: readers see the old file or the whole new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_checkpoint(obj: dict, path: str | Path, digest: bool = True) -> str | None:
    """``torch.save(obj)`` to ``path`` atomically: a crash never leaves a half-written file under the final name.
    With ``digest``, also write the ``<path>.sha256`` sidecar and return the digest (without: remove a stale one).

    Order: the checkpoint goes to a temporary file (fsync) and is hashed as stored, the sidecar is put in place,
    then the checkpoint is renamed over the final name. A crash between the two renames leaves the new sidecar next
    to the old file of that name (or to none): a mismatch, so that file is refused, never a wrong one trusted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha: list[str] = []

    def before_rename(tmp: Path) -> None:
        if not digest:  # a sidecar left from an earlier file of this name would make the new one look corrupt
            digest_path(path).unlink(missing_ok=True)
            return
        # hashed from the stored file, not from the bytes torch handed over: what is checked later is what was stored
        sha.append(file_sha256(tmp))
        line = f"{sha[0]}  {path.name}\n".encode("ascii")
        _write_atomic(digest_path(path), lambda f: f.write(line))

    _write_atomic(path, lambda f: torch.save(obj, f), before_rename)
    return sha[0] if sha else None


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and its digest sidecar (missing ones are fine)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load itself looks at to tell a zip from its legacy format


def verify_zip(path: str | Path) -> bool:
    """Check the CRC-32 of every member of the torch zip file at ``path``, streaming (1 MiB at a time).

    Returns True when every member matches, False when the file is not a zip (torch's pre-1.6 format: nothing to
    check). Raises CheckpointError naming the file (and the member) when it is unreadable, a broken zip, or a
    member's bytes do not match their recorded CRC (a flipped bit, a truncation).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != _ZIP_MAGIC:
                return False
            with zipfile.ZipFile(f) as zf:
                for info in zf.infolist():
                    with zf.open(info) as member:
                        while member.read(1 << 20):  # zipfile compares the CRC when the member's last byte is read
                            pass
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # BadZipFile (bad CRC, bad headers), OSError, EOFError, zlib.error, ...
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(exc).__name__}: {exc}") from None
    return True


def check_finite(state: dict, path: str | Path) -> None:
    """CheckpointError naming ``path`` and the first tensor of ``state`` (nested dicts walked) holding NaN or inf.

    Training never saves one (its NaN guard stops first), so a non-finite weight means the file changed after it
    was written: the check that remains for a checkpoint whose digest sidecar is missing.
    """
    stack = [("", state)]
    while stack:
        prefix, d = stack.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                stack.append((f"{prefix}{k}.", v))
            elif isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"checkpoint {path} is corrupt: {prefix}{k} holds non-finite values")


# ---------------------------------------------------------------------------------------------- loading
def safe_load(path: str | Path, *, legacy_ok: bool = False) -> dict:
    """Load a checkpoint dict with ``weights_only=True`` after checking its bytes: the digest if it has a sidecar,
    then the zip CRCs (:func:`verify_zip`). ``legacy_ok``: also accept torch's pre-1.6 format (unverifiable).

    Raises:
        CheckpointError: missing, corrupt (digest, CRC), unverifiable (legacy format, unless ``legacy_ok``),
            refused by ``weights_only``, or not a dict. The message names the file, on one line.
    """
    verify_digest(path)
    if not verify_zip(path) and not legacy_ok:
        raise CheckpointError(f"checkpoint {path} is not a zip file as torch.save writes (corrupt, or torch's "
                              "pre-1.6 format, which cannot be verified): refusing to load it")  # fmt: skip
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # weights_only refuses code-carrying pickles; truncated files fail here too
        why = " ".join(str(exc).split())[:300]  # torch's weights_only messages span many lines: keep one
        raise CheckpointError(f"cannot read checkpoint {path} safely: {type(exc).__name__}: {why}") from None
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
    obj = safe_load(path, legacy_ok=True)
    state = obj.get("state_dict", obj)
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{path} has no 'model.*' keys: not an AdaFace checkpoint")
    return _load_into(model, state, path)


def load_pfld(model: nn.Module, path: str | Path) -> nn.Module:
    """PFLD checkpoint (key ``pfld_backbone``) -> PFLDInference."""
    obj = safe_load(path, legacy_ok=True)
    if "pfld_backbone" not in obj:
        raise CheckpointError(f"{path} has no 'pfld_backbone' entry: not a PFLD checkpoint")
    return _load_into(model, _strip(obj["pfld_backbone"], "module."), path)


def load_tface_backbone(model: nn.Module, path: str | Path) -> nn.Module:
    """TFace ``Backbone_Epoch_*_checkpoint.pth`` (a bare state dict) -> model."""
    return _load_into(model, _strip(safe_load(path, legacy_ok=True), "module."), path)


def load_backbone(model: nn.Module, path: str | Path) -> nn.Module:
    """Any supported backbone checkpoint: AdaFace, TFace, or a ppfr checkpoint's ``server`` weights."""
    obj = safe_load(path, legacy_ok=True)
    state = obj.get("state_dict", obj)
    if any(k.startswith("model.") for k in state):
        return load_adaface(model, path)
    if "model" in obj and isinstance(obj["model"], dict):  # a ppfr training checkpoint
        inner = {k[len("server."):]: v for k, v in obj["model"].items() if k.startswith("server.")}
        return _load_into(model, inner, path)
    return _load_into(model, _strip(state, "module."), path)
