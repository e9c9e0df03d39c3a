"""Tests of the trainer (ppfr/train): configs, stages, checkpoints, exact resume, the divergence guard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppfr.methods import build_method
from ppfr.train.config import ConfigError, load_config
from ppfr.train.trainer import Trainer, TrainingDiverged, list_checkpoints, load_latest

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, *extra: str, method: str = "arcface"):
    return load_config(None, [
        f"name=t_{method}", f"out_dir={tmp_path}", f"method={method}", "method_options={depth: 18, width: 4}",
        "data.source=synthetic", "data.backend=torch", "data.num_samples=32", "data.num_classes=5",
        "data.batch_size=4", "data.num_workers=0", "epochs=1", "checkpoint_every=2", "log_every=100",
        "optim.lr=0.05", "optim.warmup_steps=3", "seed=3", *extra,
    ])  # fmt: skip


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'optim.lrr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="data.batch_size must be an integer"):
        load_config(None, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="head.type"):
        load_config(None, ["head.type=softmax"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: arcface\nepochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="no stage 'warmup'"):
        Trainer(_cfg(tmp_path, "stages=[{name: warmup, epochs: 1}]")).fit()


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if "base" not in path.name:
            try:
                cfg = load_config(path)
            except ConfigError as exc:  # the paper configs that need a file: DuetFace a PFLD checkpoint
                # (tests/test_configs.py), PRO-Face C its pretrained frozen server
                if path.name.startswith("profacec_ir") and "server_ckpt" in str(exc):
                    cfg = load_config(path, ["method_options.server_ckpt=null"])
                else:
                    assert path.name.startswith("duetface_ir") and "landmark_ckpt" in str(exc), (path.name, exc)
                    cfg = load_config(path, ["method_options.roi=template"])
            assert cfg.name == path.stem and cfg.method in path.stem
            if cfg.stages:  # a listed stage must be one the method, built with the config's options, has
                names = {s.name for s in build_method(cfg.method, **cfg.method_options).stages()}
                assert {s.name for s in cfg.stages} <= names, path.name


def _params(model_path: Path) -> dict:
    return torch.load(model_path, weights_only=True)["model"]


def test_killed_run_resumes_to_identical_parameters(tmp_path, monkeypatch):
    full = _cfg(tmp_path / "a", method="partialface")
    Trainer(full, quiet=True).fit()
    want = _params(full.run_dir / "model.pt")

    killed = _cfg(tmp_path / "b", method="partialface")
    real_checkpoint = Trainer.checkpoint
    calls = {"n": 0}

    def dying_checkpoint(self, *args, **kwargs):
        real_checkpoint(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # killed mid-epoch, right after the step-4 checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "checkpoint", dying_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Trainer(killed, quiet=True).fit()
    monkeypatch.setattr(Trainer, "checkpoint", real_checkpoint)
    assert not (killed.run_dir / "model.pt").exists()
    assert [p.name for p in list_checkpoints(killed.run_dir)] == ["step_00000002.pt", "step_00000004.pt"]
    Trainer(killed, quiet=True).fit(resume=True)
    got = _params(killed.run_dir / "model.pt")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_multi_stage_method_runs_all_stages(tmp_path):
    cfg = _cfg(tmp_path, "stages=[{name: stage1, epochs: 1}, {name: stage2, epochs: 1}]",
               "method_options={depth: 18, width: 4, gen_width: 4}", method="minusface")  # fmt: skip
    summary = Trainer(cfg, quiet=True).fit()
    assert [s["stage"] for s in summary["stages"]] == ["stage1", "stage2"]
    assert all(s["loss_last"] is not None for s in summary["stages"])
    assert (cfg.run_dir / "metrics.csv").read_text().count("stage2") >= 1


def test_corrupt_checkpoint_is_reported_and_previous_used(tmp_path):
    cfg = _cfg(tmp_path)
    Trainer(cfg, quiet=True).fit()
    ckpts = list_checkpoints(cfg.run_dir)
    assert len(ckpts) == cfg.keep_last  # older ones pruned
    ckpts[-1].write_bytes(b"\x00garbage" * 10)
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        ckpt, path = load_latest(cfg.run_dir)
    assert path == ckpts[-2] and "model" in ckpt


def test_divergence_guard(tmp_path, monkeypatch):
    from ppfr.methods.arcface import ArcFace

    def nan_step(self, stage, images, labels, head, generator=None):
        return {"loss": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(ArcFace, "training_step", nan_step)
    with pytest.raises(TrainingDiverged, match="lower optim.lr"):
        Trainer(_cfg(tmp_path), quiet=True).fit()


def test_generator_gets_its_own_lr_group(tmp_path):
    from ppfr.methods import build_method
    from ppfr.models.heads import ArcFaceHead
    from ppfr.train.trainer import build_optimizer

    cfg = _cfg(tmp_path, "optim.generator_lr_mult=0.5")
    m = build_method("minusface", depth=18, width=4, gen_width=4)
    m.set_stage("stage1")
    opt = build_optimizer(m, ArcFaceHead(512, 5), cfg)
    mults = {g["name"]: g["lr_mult"] for g in opt.param_groups}
    assert mults["gen_decay"] == 0.5 and mults["decay"] == 1.0
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if g["name"].endswith("nodecay"))


def test_bf16_autocast_runs_in_reduced_precision(tmp_path):
    fp32 = Trainer(_cfg(tmp_path / "a"), quiet=True).fit()["stages"][0]
    bf16 = Trainer(_cfg(tmp_path / "b", "amp=bf16"), quiet=True).fit()["stages"][0]
    # same model, data and draws: the first losses agree to bf16 precision, but not bit for bit (autocast is on)
    assert bf16["loss_first"] != fp32["loss_first"]
    assert abs(bf16["loss_first"] - fp32["loss_first"]) < 0.02 * abs(fp32["loss_first"])
    assert bf16["loss_last"] == bf16["loss_last"]  # finite, not NaN


def test_stages_as_separate_runs_with_init_from(tmp_path):
    """MinusFace stage 1 as one job, stage 2 as another started from the stage-1 model.pt: stage 2 begins from the
    stage-1 generator (frozen, so it leaves unchanged) and trains only the fresh recogniser f_p."""
    opts = "method_options={depth: 18, width: 4, gen_width: 4}"
    s1 = _cfg(tmp_path / "s1", "stages=[{name: stage1, epochs: 1}]", opts, method="minusface")
    Trainer(s1, quiet=True).fit()
    stage1 = _params(s1.run_dir / "model.pt")
    s2 = _cfg(tmp_path / "s2", "stages=[{name: stage2, epochs: 1}]", opts, f"init_from={s1.run_dir / 'model.pt'}",
              method="minusface")  # fmt: skip
    Trainer(s2, quiet=True).fit()
    stage2 = _params(s2.run_dir / "model.pt")
    gen = [k for k in stage1 if k.startswith("generator.")]
    assert gen and all(torch.equal(stage1[k], stage2[k]) for k in gen)
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("recognizer_p.") and
               stage1[k].is_floating_point())  # fmt: skip
    wrong = _cfg(tmp_path / "w", f"init_from={s1.run_dir / 'model.pt'}")  # an arcface run from a minusface model
    with pytest.raises(Exception, match="holds a 'minusface' model"):
        Trainer(wrong, quiet=True).fit()


def test_progress_lines_and_csv(tmp_path, capsys):
    cfg = _cfg(tmp_path, "log_every=2", "progress=lines")
    Trainer(cfg).fit()
    out = capsys.readouterr().out
    assert "img/s" in out and "eta" in out and "epoch 0 done" in out
    rows = (cfg.run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0] == "stage,epoch,step,global_step,lr,loss,images_per_s" and len(rows) == 1 + 4
    with pytest.raises(ConfigError, match="progress"):
        _cfg(tmp_path, "progress=fancy")


def test_tensorboard_events_or_clear_error(tmp_path):
    cfg = _cfg(tmp_path, "tensorboard=true")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"needs the tensorboard package \(pip install 'ppfr\[train\]'\)"):
            Trainer(cfg, quiet=True).fit()
        return
    Trainer(cfg, quiet=True).fit()
    assert list((cfg.run_dir / "tb").glob("events.out.tfevents.*"))


def test_keep_freed_memory_takes_on_glibc_and_can_be_turned_off():
    import os
    import platform
    import subprocess
    import sys

    from ppfr.runtime import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if platform.libc_ver()[0] == "glibc":  # CI and the dev machines: the setting must take
        assert first
    off = subprocess.run([sys.executable, "-c", "from ppfr.runtime import keep_freed_memory as k; print(k())"],
                         env={**os.environ, "PPFR_KEEP_FREED_MEMORY": "0"}, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert off.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ checkpoint digests
def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of the file: tensor data (most of a checkpoint)
    path.write_bytes(bytes(data))


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_checkpoints_carry_a_digest_checked_on_load(tmp_path):
    from ppfr.models.checkpoints import CheckpointError, digest_path, safe_load, save_checkpoint, verify_digest

    path = tmp_path / "step_00000001.pt"
    sha = save_checkpoint({"model": {"w": torch.arange(1000.0)}, "global_step": 1}, path)
    assert digest_path(path).read_text() == f"{sha}  {path.name}\n"  # sha256sum -c format
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]  # no temporary file
    assert verify_digest(path) is True and safe_load(path)["global_step"] == 1
    _flip_byte(path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # torch alone does not notice
    with pytest.raises(CheckpointError, match="is corrupt: its SHA-256 .* is not the one recorded"):
        safe_load(path)
    digest_path(path).unlink()  # without its digest, the zip CRCs still catch the flipped byte
    assert verify_digest(path) is False
    with pytest.raises(CheckpointError, match=r"is corrupt: BadZipFile: Bad CRC-32"):
        safe_load(path)
    with pytest.warns(UserWarning, match="no digest .* cannot be verified beyond its zip CRCs"):
        load_latest(_legacy_run(tmp_path))  # an intact checkpoint from before digests: loads


def _legacy_run(tmp_path: Path) -> Path:
    run = tmp_path / "legacy"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "global_step": 2}, run / "checkpoints" / "step_00000002.pt")
    return run


def test_flipped_byte_in_newest_checkpoint_falls_back_to_previous(tmp_path):
    """One flipped byte in the newest checkpoint: torch still loads it (one wrong weight), the digest does not
    match, so resume warns naming both files and continues from the previous one, to the exact parameters of the
    uninterrupted run."""
    from ppfr.models.checkpoints import digest_path

    cfg = _cfg(tmp_path)
    Trainer(cfg, quiet=True).fit()
    want = _params(cfg.run_dir / "model.pt")
    ckpts = list_checkpoints(cfg.run_dir)
    newest, previous = ckpts[-1], ckpts[-2]
    assert all(digest_path(p).is_file() for p in ckpts)
    _flip_byte(newest)
    torch.load(newest, weights_only=True)  # silent corruption: it loads
    with pytest.warns(UserWarning) as caught:
        ckpt, path = load_latest(cfg.run_dir)
    assert path == previous and ckpt["global_step"] == int(previous.stem.split("_")[1])
    messages = [str(w.message) for w in caught]
    print(f"\nflipped byte: {messages}")
    assert any(str(newest) in m and str(previous) in m and "SHA-256" in m for m in messages), messages
    assert any("skipping unusable checkpoint" in m for m in messages)
    (cfg.run_dir / "model.pt").unlink()  # a run killed after its last checkpoint (a finished run is not resumed)
    with pytest.warns(UserWarning, match="resuming from"):
        Trainer(cfg, quiet=True).fit(resume=True)
    got = _params(cfg.run_dir / "model.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert load_latest(cfg.run_dir)[1] == newest  # rewritten, with a matching digest: no warning now


def test_resume_refuses_when_no_checkpoint_is_intact(tmp_path, capsys):
    """Every checkpoint truncated: `ppfr train --resume` exits 2 with a one-line message, and the run folder is
    exactly as it was (nothing deleted, overwritten or added), instead of training from scratch over it."""
    from ppfr.models.checkpoints import CheckpointError
    from ppfr.train.trainer import main as train_main

    cfg = _cfg(tmp_path / "runs")
    Trainer(cfg, quiet=True).fit()
    ckpts = list_checkpoints(cfg.run_dir)
    for p in ckpts:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    (cfg.run_dir / "model.pt").unlink()  # killed before the end (a finished run is left alone, not resumed)
    config = tmp_path / f"{cfg.name}.yaml"
    config.write_text((cfg.run_dir / "config.yaml").read_text())
    before = _snapshot(cfg.run_dir)
    capsys.readouterr()
    assert train_main([str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    print(f"\nall truncated: {err.strip()[:300]}...")
    assert err.count("\n") == 1 and err.startswith("ppfr train: no usable checkpoint in ")
    assert "nothing was changed" in err and all(p.name in err for p in ckpts)
    assert _snapshot(cfg.run_dir) == before
    with pytest.raises(CheckpointError, match="Refusing to resume"):
        Trainer(cfg, quiet=True).fit(resume=True)
    assert _snapshot(cfg.run_dir) == before


def test_resume_of_a_finished_run_is_a_no_op(tmp_path):
    """Trainer.fit(resume=True) on a run with model.pt: nothing is trained or written (model.pt was rewritten with
    a new digest before, and the empty last stage returned None losses)."""
    cfg = _cfg(tmp_path, "max_steps_per_epoch=1")
    Trainer(cfg, quiet=True).fit()
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in cfg.run_dir.rglob("*") if p.is_file()}
    assert Trainer(cfg, quiet=True).fit(resume=True) == {"stages": [], "finished": True}
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in cfg.run_dir.rglob("*") if p.is_file()} == files


def test_unknown_stage_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no stage 'bogus'"):
        Trainer(_cfg(tmp_path, "stages=[{name: bogus}]"), quiet=True).fit()
    assert not (tmp_path / "t_arcface").exists()  # refused before anything was written


def test_weight_decay_split_follows_tface_by_default_and_1d_as_an_option(tmp_path):
    """TFace exempts only parameters whose reference name holds `bn` (METHODS §1.5): MobileFaceNet's BatchNorms (the
    DuetFace client) but none of an IR net's; ``optim.no_decay=1d`` exempts every 1-D tensor instead."""
    from ppfr.methods import build_method
    from ppfr.models.heads import ArcFaceHead
    from ppfr.train.trainer import build_optimizer

    def split(method_name, *extra):
        m = build_method(method_name, depth=18, width=4)
        opt = build_optimizer(m, ArcFaceHead(512, 5), _cfg(tmp_path, *extra, method=method_name))
        return m, {g["name"]: g for g in opt.param_groups}

    m, groups = split("arcface")
    assert "nodecay" not in groups  # the IR net's BatchNorms decay, as in the reference
    assert sum(p.numel() for p in groups["decay"]["params"]) == sum(p.numel() for p in m.parameters())
    m, groups = split("duetface")
    client_bn = {id(p) for mod in m.client.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)
                 for p in mod.parameters()}  # fmt: skip
    assert client_bn and {id(p) for p in groups["nodecay"]["params"]} == client_bn
    assert groups["nodecay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 5e-4
    m, groups = split("arcface", "optim.no_decay=1d")
    assert {id(p) for p in groups["nodecay"]["params"]} == {id(p) for p in m.parameters() if p.ndim <= 1}
    with pytest.raises(ConfigError, match="optim.no_decay"):
        _cfg(tmp_path, "optim.no_decay=bias")


def test_batchnorm_is_per_rank_by_default_and_global_as_an_option(tmp_path):
    from ppfr.methods import build_method
    from ppfr.train.distributed import DistBatchNorm
    from ppfr.train.trainer import prepare_batchnorm

    assert _cfg(tmp_path).batchnorm == "per_rank"
    m = build_method("arcface", depth=18, width=4)
    assert prepare_batchnorm(m, "per_rank", world=2) == 0 and prepare_batchnorm(m, "global", world=1) == 0
    assert not any(isinstance(x, DistBatchNorm) for x in m.modules())
    n = prepare_batchnorm(m, "global", world=2)
    assert n > 0 and sum(isinstance(x, DistBatchNorm) for x in m.modules()) == n
    with pytest.raises(ConfigError, match="batchnorm"):
        _cfg(tmp_path, "batchnorm=sync")


def test_training_keeps_the_last_partial_batch_as_the_reference_does(tmp_path, capsys):
    """drop_last=False (METHODS §1.2): 30 samples in batches of 4 are 8 steps, the last of 2 samples; a one-sample
    tail (33 samples) is skipped with a message, since BatchNorm cannot train on it."""
    from ppfr.data.loader import make_loader as build_loader

    cfg = _cfg(tmp_path, "data.num_samples=30")
    assert len(build_loader(cfg.data)) == 8
    assert len(build_loader(_cfg(tmp_path, "data.num_samples=30", "data.last_batch=drop").data)) == 7
    out = Trainer(_cfg(tmp_path / "odd", "data.num_samples=33", "name=odd", "progress=lines"), quiet=False).fit()
    assert out["stages"][0]["loss_last"] is not None
    assert "skipped a batch of 1 sample" in capsys.readouterr().out
