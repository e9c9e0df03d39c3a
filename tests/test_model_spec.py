"""One reading of model specs for every verb (``ppfr.methods.spec``), and the face-api.js weights folder default.

Before, ``ppfr attack method:duetface`` built the method from the caller's random state while ``ppfr export`` /
``ppfr serve`` seeded it: the attacker attacked other weights than the server ran. A model.pt of a method that is
not installed was a raw ValueError traceback in ``ppfr attack``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppfr.cli import main as ppfr_main
from ppfr.eval.attacks.common import AttackError, resolve_target
from ppfr.methods import build_method
from ppfr.methods.spec import SpecError, load_model, parse_model_spec
from tests._cli import one_line_error

SMALL = "method:arcface:depth=18,width=4"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit-identical, not close


def _save_model(path: Path, name: str = "arcface", options: dict | None = None) -> Path:
    options = {"depth": 18, "width": 4} if options is None else options
    method = build_method("arcface", **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": method.state_dict(), "method": name, "method_options": options}, path)
    return path


def test_method_duetface_is_the_same_weights_through_attack_export_and_serve():
    from ppfr.deploy.export.onnx import load_source
    from ppfr.deploy.runtime import load_runner

    torch.manual_seed(123)  # a caller's random state must change nothing (the attack path used to draw from it)
    before = torch.get_rng_state()
    attacked = resolve_target("method:duetface").method
    assert torch.equal(torch.get_rng_state(), before)  # ... nor be changed by resolving
    torch.manual_seed(456)
    exported, info = load_source("method:duetface")
    served = load_runner("method:duetface", backend="eager")._method
    _same_weights(attacked, exported)
    _same_weights(attacked, served)
    assert info["label"] == "method:duetface"


def test_run_folder_is_its_model_pt(tmp_path):
    from ppfr.deploy.export.cli import _default_out
    from ppfr.deploy.export.onnx import load_source

    model = _save_model(tmp_path / "runs" / "tiny" / "model.pt")
    by_file, src = load_model(model)
    by_folder, src_folder = load_model(model.parent)
    assert src.kind == src_folder.kind == "checkpoint" and src_folder.path == model and src_folder.trained
    _same_weights(by_file, by_folder)
    target = resolve_target(str(model.parent))
    assert target.label == "tiny" and target.trained and target.spec == str(model)
    _same_weights(target.method, by_file)
    assert load_source(model.parent)[1] == load_source(model)[1]  # same label and digest: the file's
    assert _default_out(str(model.parent), "onnx") == model.parent / "export"
    with pytest.raises(SpecError, match="without model.pt"):
        parse_model_spec(tmp_path / "runs")


@pytest.mark.parametrize("spec, needle", [
    ("method:arcface:depth", "bad option 'depth'"),
    ("method:arcface:depht=18", "depht"),
    ("method:nosuch", "unknown method 'nosuch'"),
    ("method:", "names no method"),
    ("method:arcface:depth=[1", "bad value of option 'depth'"),
    ("nowhere/model.pt", "not found"),
    ("graph.onnx", "exported graph"),
])  # fmt: skip
def test_bad_specs_are_spec_errors_in_every_reader(spec, needle):
    from ppfr.deploy.export.onnx import load_source

    with pytest.raises(SpecError, match=needle):
        load_model(spec)
    with pytest.raises(ValueError, match=needle):  # export / serve print ValueErrors as one line, exit 2
        load_source(spec)
    with pytest.raises(AttackError, match=needle):
        resolve_target(spec)


def test_bad_option_is_one_line_in_attack_and_export(tmp_path, capsys):
    rc = ppfr_main(["attack", "method:duetface:depth", "--data", str(tmp_path), "--val", str(tmp_path)])
    assert one_line_error(capsys, rc, "bad option 'depth'").startswith("ppfr attack: ")
    rc = ppfr_main(["export", "method:duetface:depth", "--format", "onnx", "--out", str(tmp_path / "x")])
    assert one_line_error(capsys, rc, "bad option 'depth'").startswith("ppfr export: ")
    rc = ppfr_main(["export", str(tmp_path / "nowhere"), "--format", "onnx"])  # the default --out reads the spec
    one_line_error(capsys, rc, "not found")


def test_model_of_a_method_that_is_not_installed_is_one_line(tmp_path, capsys):
    model = _save_model(tmp_path / "plugin_run" / "model.pt", name="someplugin")
    rc = ppfr_main(["attack", str(model), "--data", str(tmp_path), "--val", str(tmp_path)])
    err = one_line_error(capsys, rc, "'someplugin'", str(model), "install")
    assert err.startswith("ppfr attack: ")


# ------------------------------------------------------------------------------------------ face-api weights
def test_faceapi_dir_explicit_then_env_then_shared_above_the_working_directory(tmp_path, monkeypatch):
    from ppfr.models import faceapi
    from ppfr.models.checkpoints import CheckpointError

    shared = tmp_path / "shared" / "models" / "faceapi"
    shared.mkdir(parents=True)
    other = tmp_path / "weights"
    other.mkdir()
    deep = tmp_path / "checkout" / "sub"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    monkeypatch.delenv(faceapi.FACEAPI_DIR_ENV, raising=False)
    assert faceapi.faceapi_dir() == shared  # beside a parent of the working directory
    assert faceapi.faceapi_dir(other) == other
    monkeypatch.setenv(faceapi.FACEAPI_DIR_ENV, str(other))
    assert faceapi.faceapi_dir() == other
    assert faceapi.faceapi_dir(shared) == shared  # an explicit folder wins over the variable
    monkeypatch.setenv(faceapi.FACEAPI_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(CheckpointError, match="PPFR_FACEAPI_DIR"):  # a set variable is used as given, or refused
        faceapi.faceapi_dir()
    with pytest.raises(CheckpointError, match="not found"):
        faceapi.faceapi_dir(tmp_path / "gone")


def _no_shared_above(path: Path) -> bool:
    from ppfr.models.faceapi import SHARED_FACEAPI

    return not any((d / SHARED_FACEAPI).is_dir() for d in (path, *path.parents))


def test_faceapi_dir_from_the_package_location(tmp_path, monkeypatch):
    from ppfr.models import faceapi

    checkout = tmp_path / "a"
    (checkout / "shared" / "models" / "faceapi").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    monkeypatch.delenv(faceapi.FACEAPI_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path / "b")
    if not _no_shared_above(tmp_path / "b"):
        pytest.skip("a shared/models/faceapi above the temporary folder")
    monkeypatch.setattr(faceapi, "__file__", str(checkout / "main" / "ppfr" / "models" / "faceapi.py"))
    assert faceapi.faceapi_dir() == checkout / "shared" / "models" / "faceapi"


def test_faceapi_dir_lists_what_it_tried(tmp_path, monkeypatch):
    from ppfr.eval.attacks.judge import make_judge
    from ppfr.models import faceapi
    from ppfr.models.checkpoints import CheckpointError

    monkeypatch.delenv(faceapi.FACEAPI_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(faceapi, "__file__", str(tmp_path / "pkg" / "faceapi.py"))
    if not _no_shared_above(tmp_path):
        pytest.skip("a shared/models/faceapi above the temporary folder")
    with pytest.raises(CheckpointError) as exc:
        faceapi.faceapi_dir()
    msg = str(exc.value)
    assert "PPFR_FACEAPI_DIR" in msg and str(tmp_path) in msg and str(tmp_path / "pkg") in msg and "\n" not in msg
    with pytest.raises(AttackError, match="face-api.js weights not found.*--judge-dir"):
        make_judge("faceapi")
