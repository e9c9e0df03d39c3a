"""Weights are verified before ``torch.load`` (issue 29): the zip CRCs of every ``.pt`` ppfr loads, finite weights
for a checkpoint without its digest sidecar, resume from the newest checkpoint that passes, stray names ignored.

Before: ``torch.load`` does not check the CRCs ``torch.save`` records, so all 78 bit-flipped model.pt files of the
issue loaded (29 with changed embeddings), and 57 of 150 corrupted sidecar-less checkpoints were resumed from.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import ppfr
from ppfr.cli import main as ppfr_main
from ppfr.models.checkpoints import CheckpointError, safe_load, save_checkpoint, verify_zip
from ppfr.train.trainer import list_checkpoints, load_latest
from tests._cli import one_line_error

OPTIONS = {"depth": 18, "width": 4}
TINY = """\
name: tiny
method: arcface
method_options: {depth: 18, width: 4}
data: {source: synthetic, backend: torch, num_samples: 8, num_classes: 4, batch_size: 4, num_workers: 0}
epochs: 1
max_steps_per_epoch: 1
eval: {before: false, after: false}
"""


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (found from the zip directory, not guessed)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # local file header
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _model_pt(path: Path) -> Path:
    """A model.pt as ``ppfr train`` writes it (state dict + method name + options), without training."""
    torch.manual_seed(0)
    torch.save({"model": ppfr.build_method("arcface", **OPTIONS).state_dict(), "method": "arcface",
                "method_options": OPTIONS}, path)  # fmt: skip
    return path


def test_flipped_byte_in_model_pt_is_refused_naming_the_file(tmp_path, capsys):
    path = _model_pt(tmp_path / "model.pt")
    assert verify_zip(path) is True
    ppfr.methods.load_method(path)
    flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # torch alone loads it: one wrong weight
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt: BadZipFile: Bad CRC-32"):
        ppfr.methods.load_method(path)
    (tmp_path / "pairs.txt").write_text("0 1 a.jpg b.jpg\n")
    rc = ppfr_main(["eval", str(path), "--data", str(tmp_path / "pairs.txt"), "--out", str(tmp_path / "ev")])
    one_line_error(capsys, rc, str(path), "CRC")
    # init_from goes through the same loader (a ConfigError naming the key)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY + f"out_dir: {tmp_path / 'runs'}\n")
    one_line_error(capsys, ppfr_main(["train", str(cfg), f"init_from={path}"]), "init_from", str(path), "CRC")


def test_truncated_and_non_zip_files(tmp_path):
    path = _model_pt(tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is corrupt"):
        safe_load(tmp_path / "cut.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt is not a zip file .* cannot be verified"):
        safe_load(tmp_path / "legacy.pt")  # ppfr has always written zips: its own loads refuse the old format
    assert safe_load(tmp_path / "legacy.pt", legacy_ok=True)["w"].sum() == 3  # public formats may predate it


def _checkpoint(run: Path, step: int, digest: bool, **extra) -> Path:
    path = run / "checkpoints" / f"step_{step:08d}.pt"
    model = {"w": torch.full((256,), float(step))}
    save_checkpoint({"model": model, "head": {"weight": torch.zeros(4, 4)}, "global_step": step, **extra}, path,
                    digest=digest)  # fmt: skip
    return path


def test_resume_falls_back_past_unverifiable_checkpoints(tmp_path):
    """Without sidecars: a CRC failure and a non-finite weight are both skipped, naming the file, for the newest
    checkpoint that passes; never resumed from."""
    run = tmp_path / "run"
    _checkpoint(run, 2, digest=False)
    nan = _checkpoint(run, 4, digest=False)
    ck = torch.load(nan, weights_only=True)
    ck["model"]["w"][7] = float("nan")
    save_checkpoint(ck, nan, digest=False)  # intact zip, non-finite weight (a NaN saved where none can be)
    flipped = _checkpoint(run, 6, digest=False)
    flip_tensor_byte(flipped)
    with pytest.warns(UserWarning) as caught:
        ckpt, path = load_latest(run)
    assert path.name == "step_00000002.pt" and ckpt["global_step"] == 2
    messages = " | ".join(str(w.message) for w in caught)
    assert f"{flipped} is corrupt: BadZipFile: Bad CRC-32" in messages, messages
    assert f"{nan} is corrupt: model.w holds non-finite values" in messages, messages
    assert "resuming from" in messages and "cannot be verified beyond its zip CRCs" in messages


def test_resume_with_only_a_corrupt_checkpoint_isone_line_error(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY + f"out_dir: {tmp_path / 'runs'}\n")
    bad = _checkpoint(tmp_path / "runs" / "tiny", 1, digest=False)
    flip_tensor_byte(bad)
    one_line_error(capsys, ppfr_main(["train", str(cfg), "--resume"]), str(bad), "Refusing to resume")


def test_stray_checkpoint_names_are_ignored_with_a_warning(tmp_path):
    run = tmp_path / "run"
    good = _checkpoint(run, 3, digest=True)
    (run / "checkpoints" / "step_final.pt").write_bytes(b"a hand-made file")
    (run / "checkpoints" / "step_\u00b2.pt").write_bytes(b"a non-ASCII digit int() would take")
    with pytest.warns(UserWarning, match=r"ignoring step_final\.pt, step_\u00b2\.pt in .*: not a checkpoint name"):
        assert list_checkpoints(run) == [good]
    with pytest.warns(UserWarning, match="step_final"):
        assert load_latest(run)[1] == good
