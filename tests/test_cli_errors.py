"""User errors on the command line are one line on stderr naming the key or file, exit status 2, no traceback.

Each case here was a raw traceback (or, for ``head.s=-1``, silently accepted) before. Driven through
``ppfr.cli.main`` exactly as the ``ppfr`` script runs. Training cases use a one-step tiny synthetic run.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ppfr.cli import main as ppfr_main
from tests._cli import one_line_error

TINY = """\
name: tiny
method: arcface
method_options: {depth: 18, width: 4}
data: {source: synthetic, backend: torch, num_samples: 8, num_classes: 4, batch_size: 4, num_workers: 0}
epochs: 1
max_steps_per_epoch: 1
checkpoint_every: 100
log_every: 100
progress: lines
eval: {before: false, after: false}
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY + f"out_dir: {tmp_path / 'runs'}\n")
    return path


@pytest.mark.parametrize("override, needles", [
    ("max_steps_per_epoch=-5", ["max_steps_per_epoch", "-5"]),
    ("data.source=/nonexistent", ["data.source", "/nonexistent"]),
    ("init_from=/nonexistent", ["init_from", "/nonexistent"]),
    ("optim.lr_steps=[1", ["optim.lr_steps", "not valid YAML"]),
    ("method_options.depht=18", ["method_options", "depht"]),
    ("stages=[{name: bogus}]", ["stages", "bogus"]),
    ("head.s=-1", ["head.s", "-1"]),
    ("head.m=2", ["head.m"]),
    ("data.batch_size=0", ["data.batch_size"]),
    ("eval.batch_size=0", ["eval.batch_size"]),
    ("threads=0", ["threads"]),
])  # fmt: skip
def test_train_user_errors_are_one_line(tiny, capsys, override, needles):
    err = one_line_error(capsys, ppfr_main(["train", str(tiny), override]), *needles)
    assert err.startswith("ppfr train: ")
    if override.startswith("eval.batch_size"):
        assert "DataConfig" not in err
    assert not (tiny.parent / "runs" / "tiny" / "model.pt").exists()


def test_head_config_range_checks():
    from ppfr.train.config import ConfigError, load_config

    for bad, key in (("head.s=0", "head.s"), ("head.m=-0.1", "head.m"), ("eval.max_pairs=0", "eval.max_pairs"),
                     ("max_steps_per_epoch=0", "max_steps_per_epoch"), ("optim.grad_clip=0", "optim.grad_clip"),
                     ("optim.lr_steps=[-1]", "optim.lr_steps")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])
    load_config(None, ["head.type=cosface", "head.m=0.35", "head.s=30"])  # the usual values still load
    load_config(None, ["max_steps_per_epoch=1", "threads=1"])


def test_eval_binary_data_file_is_one_line(tmp_path, tiny, capsys):
    assert ppfr_main(["train", str(tiny)]) == 0
    model = tiny.parent / "runs" / "tiny" / "model.pt"
    pkl = tmp_path / "pairs.pkl"
    pkl.write_bytes(pickle.dumps({"pairs": [(b"\xff\xfe", 1)] * 10}))
    capsys.readouterr()
    rc = ppfr_main(["eval", str(model), "--data", str(pkl), "--out", str(tmp_path / "ev")])
    one_line_error(capsys, rc, str(pkl), "--data")


def test_a_folder_where_a_pair_list_is_expected_is_one_line(tmp_path, tiny, capsys):
    """The common slip: the image folder passed as the pair list, to ``ppfr eval --data`` or ``eval.pairs``."""
    folder = tmp_path / "faces"
    (folder / "id0").mkdir(parents=True)
    one_line_error(capsys, ppfr_main(["train", str(tiny), f"eval.pairs={folder}"]), "eval.pairs", str(folder))
    assert ppfr_main(["train", str(tiny)]) == 0
    model = tiny.parent / "runs" / "tiny" / "model.pt"
    capsys.readouterr()
    rc = ppfr_main(["eval", str(model), "--data", str(folder), "--out", str(tmp_path / "ev")])
    one_line_error(capsys, rc, str(folder))


def test_train_unknown_config_name_lists_the_shipped_configs(capsys):
    one_line_error(capsys, ppfr_main(["train", "partialface_tiyn"]), "partialface_tiyn", "partialface_tiny")


def test_train_finds_a_shipped_config_by_name_anywhere(tmp_path, monkeypatch):
    """``ppfr train partialface_tiny`` (and the README's ``configs/partialface_tiny.yaml``) outside a clone."""
    from ppfr.train.config import find_config, load_config

    monkeypatch.chdir(tmp_path)
    path = find_config("partialface_tiny")
    assert path.name == "partialface_tiny.yaml" and path.is_file()
    assert find_config("partialface_tiny.yaml") == find_config("configs/partialface_tiny.yaml") == path
    cfg = load_config("partialface_tiny", ["data.num_samples=64"])
    assert cfg.name == "partialface_tiny" and cfg.method == "partialface"
    (tmp_path / "mine.yaml").write_text("name: mine\n")  # a file that exists is taken as given
    assert find_config("mine.yaml") == Path("mine.yaml")


def test_train_help_lists_every_config_key_with_its_default(capsys):
    import dataclasses

    from ppfr.train.config import TrainConfig

    with pytest.raises(SystemExit) as exc:
        ppfr_main(["train", "-h"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "  max_steps_per_epoch = null\n" in out and "  data.batch_size = 64\n" in out
    assert "  head.s = 64.0\n" in out and "  threads = null  *\n" in out  # * = may change on --resume
    for f in dataclasses.fields(TrainConfig):
        assert f"  {f.name}" in out, f.name
    assert "--overwrite" in out and "--resume" in out


# ------------------------------------------------------------------------------------ a run folder owns its config
def _bytes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_existing_run_folder_needs_resume_or_overwrite(tiny, capsys):
    run = tiny.parent / "runs" / "tiny"
    assert ppfr_main(["train", str(tiny)]) == 0
    before = _bytes(run)
    capsys.readouterr()
    # before: a second `ppfr train` appended to metrics.csv and kept the first run's checkpoints
    one_line_error(capsys, ppfr_main(["train", str(tiny), "seed=5"]), str(run), "--resume", "--overwrite")
    assert _bytes(run) == before
    (run / "checkpoints" / "step_00000099.pt").write_bytes(b"a stale checkpoint of the old run")
    assert ppfr_main(["train", str(tiny), "seed=5", "--overwrite"]) == 0
    assert not (run / "checkpoints" / "step_00000099.pt").exists()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,") and len(rows) == 2  # the new run's one step only
    assert "seed: 5" in (run / "config.yaml").read_text()
    capsys.readouterr()
    one_line_error(capsys, ppfr_main(["train", str(tiny), "--resume", "--overwrite"]), "--resume", "--overwrite")


def test_resume_of_a_finished_run_changes_nothing(tiny, capsys):
    run = tiny.parent / "runs" / "tiny"
    assert ppfr_main(["train", str(tiny)]) == 0
    before = _bytes(run)
    capsys.readouterr()
    # before: model.pt was rewritten (a new digest) and the summary crashed formatting a None loss
    assert ppfr_main(["train", str(tiny), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "nothing changed" in out
    assert _bytes(run) == before  # model.pt byte-identical, config.yaml and metrics.csv untouched
    assert ppfr_main(["train", str(run), "--resume"]) == 0  # the run folder itself names the run


def test_resume_uses_the_saved_config_and_refuses_experiment_changes(tiny, capsys, monkeypatch):
    import torch

    from ppfr.train.trainer import Trainer

    run = tiny.parent / "runs" / "tiny"
    real_fit_stage = Trainer._fit_stage

    def die_after_checkpoint(self, *a, **kw):
        real_fit_stage(self, *a, **kw)  # writes the end-of-stage checkpoint
        raise KeyboardInterrupt  # killed before model.pt

    monkeypatch.setattr(Trainer, "_fit_stage", die_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):  # a run started with an override that changes the model's shape
        ppfr_main(["train", str(tiny), "method_options={depth: 18, width: 8}"])
    monkeypatch.setattr(Trainer, "_fit_stage", real_fit_stage)
    assert not (run / "model.pt").exists()
    capsys.readouterr()
    # an experiment key changed on resume: refused, one line naming it, nothing written
    before = _bytes(run)
    one_line_error(capsys, ppfr_main(["train", str(tiny), "optim.lr=0.5", "--resume"]), "optim.lr", "--resume")
    one_line_error(capsys, ppfr_main(["train", str(tiny), "--resume", "seed=4"]), "seed", "--resume")
    assert _bytes(run) == before
    # runtime keys may change (documented allow-list); name/out_dir come from the folder
    from ppfr.train.config import load_run_config

    cfg = load_run_config(run, ["threads=1", "progress=bar", "data.num_workers=0", "eval.batch_size=8"])
    assert cfg.method_options == {"depth": 18, "width": 8} and cfg.threads == 1 and cfg.run_dir == run
    # before: the command line's config (width 4) was rebuilt and loading the width-8 checkpoint crashed with a
    # size-mismatch traceback; now the run's saved config.yaml is used
    assert ppfr_main(["train", str(tiny), "--resume", "progress=lines"]) == 0
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["method_options"] == {"depth": 18, "width": 8}
    assert (run / "metrics.csv").read_text().count("\n") == 2  # header + the one step: resumed, not redone
