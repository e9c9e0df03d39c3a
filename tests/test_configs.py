"""The paper configs (``configs/*_ir18.yaml``, ``configs/*_ir50.yaml``) against METHODS.md.

Each config is loaded and resolved (``base:`` chain, defaults of the trainer and of the method's options, the stage
plan) and every hyper-parameter the spec gives for it is compared: epochs, stages and passes per epoch (TFace's
``NUM_AUG``), lr and its steps, batch, margin head, weight decays, seed, the method options; then the model is built on
the ``meta`` device (no memory, no init cost) and its structure is checked: input channel counts, the rank space,
the stage ends where the interactive / compensation blocks sit, the U-Net widths. A config (or a default) that drifts
fails here; :func:`test_changing_any_listed_value_fails` proves that for every listed config value.

The ArcFace / ArcFace-FD baselines have no yaml of their own in the spec: they are checked against the TFace recipe
the Tencent tasks share (METHODS §1.5, §3.5, §4.4) on RGB (3 channels) and on all 192 DCT channels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from ppfr.methods.base import make_options, method_class
from ppfr.train.config import ConfigError, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER_CONFIGS = sorted(p.name for pattern in ("*_ir18.yaml", "*_ir50.yaml", "*_ir100.yaml")
                       for p in CONFIGS.glob(pattern))  # fmt: skip

# The TFace recipe (METHODS §1.5, §3.5, §4.4, §5.4): batch 64 per GPU, ArcFace s 64 m 0.5, SGD momentum 0.9,
# weight decay 5e-4 for backbone and head, lr 0.1 divided by 10 at epochs 10, 18, 22, 24 epochs, seed 1337, no warm-up
# (WARMUP_STEP -1), AMP off, 512-d embedding, 112x112 input, standard IR widths.
TFACE = {
    "data.batch_size": 64, "head.type": "arcface", "head.s": 64.0, "head.m": 0.5,
    "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "optim.head_weight_decay": None,
    "optim.lr": 0.1, "optim.lr_decay": 0.1, "optim.lr_steps": (10, 18, 22), "optim.warmup_steps": 0,
    "optim.grad_clip": None, "amp": "none", "seed": 1337, "epochs": 24,
    # TFace's trainer (§1.2, §1.5): the bn-name weight-decay split, per-GPU BatchNorm, the last partial batch kept
    "optim.no_decay": "tface", "batchnorm": "per_rank", "data.last_batch": None,
    "method_options.embedding_size": 512, "method_options.image_size": 112, "method_options.width": 64,
}  # fmt: skip

# IR stage ends (index of the last unit of each stage): where DuetFace's interactive blocks and PRO-Face C's
# compensation sit (METHODS §3.3: IR-18 units 1, 3, 5, 7; IR-50 units 2, 6, 20, 23; §6.4: IR-101 units 2, 15, 45, 48).
STAGE_ENDS = {18: [1, 3, 5, 7], 50: [2, 6, 20, 23], 100: [2, 15, 45, 48]}
# PRO-Face C's paper setting (a pretrained frozen server, §6.1 / §6.4): these configs need server_ckpt (see _load)
NEEDS_SERVER = ("profacec_ir50.yaml", "profacec_ir100.yaml")


def _expected(method: str, depth: int) -> dict:
    """Every value METHODS.md gives for the ``method`` paper config at IR-``depth``; keys are dotted config paths
    (``stages`` = the resolved plan of (name, epochs, passes per epoch)), ``model.*`` are structural checks."""
    e = {**TFACE, "method": method, "method_options.depth": depth, "model.stage_ends": STAGE_ENDS[depth]}
    if method in ("arcface", "arcface_fd"):
        e.update({"stages": [("train", 24, 1)], "model.in_channels": 3 if method == "arcface" else 192})
    elif method == "duetface":  # §3.2-§3.5; interface=learned is ppfr's documented choice (docs/methods.md)
        del e["epochs"]  # the stages are listed: the top-level default is unused
        e.update({
            "stages": [("client", 24, 1), ("server", 24, 1)],  # SUB_WARMUP_STEP 24 = NUM_EPOCH, then the server run
            "method_options.roi": "pfld", "method_options.landmark_ckpt": None, "method_options.interface": "learned",
            "model.client_in": 30, "model.in_channels": 162,
            "model.client_taps": [(64, 28), (128, 14), (128, 7), (512, 7)], "model.interfaces_out": [64, 128, 256, 512],
        })  # fmt: skip
    elif method == "partialface":  # §4.2-§4.4: the code's tables (m, n) = (6, 3), r = NUM_AUG 3, label rule
        del e["epochs"]
        e.update({
            "stages": [("train", 24, 3)],
            "method_options.rank_space": "code", "method_options.s": 9, "method_options.train_rule": "label",
            "model.in_channels": 27, "model.rank_space": (9, 6, 3), "model.pruned": (0, 1, 2, 3, 8, 9, 10, 16, 17, 24),
        })  # fmt: skip
    elif method == "minusface":  # §5.2-§5.4 + MFpaper A.3 (wd 1e-4, generator lr x0.5: docs/methods.md)
        del e["epochs"]
        e.update({
            "optim.lr": 0.01, "optim.weight_decay": 1e-4, "optim.generator_lr_mult": 0.5,
            "stages": [("stage1", 24, 1), ("stage2", 24, 3)],  # NUM_DUPS 1 in stage 1, 3x augmentation in stage 2
            "method_options.gen_width": 64, "method_options.alpha": 5.0, "method_options.beta": 1.0,
            "method_options.fp_warmup": False,
            "model.in_channels": 192, "model.fp_in_channels": 3, "model.unet": (192, (64, 128, 256, 512, 1024), 192),
        })  # fmt: skip
    elif method == "profacec":  # §6.3-§6.6; shuffle_block 2 and server_bgr are documented choices
        pretrained = _config_file(method, depth) in NEEDS_SERVER
        e.update({
            "seed": 1567, "epochs": 30, "optim.lr_steps": (5, 10, 16, 22), "optim.head_weight_decay": 4e-4,
            # IR-50 / IR-101: the paper's frozen pretrained server, only the client stage trains (loaded with a dummy
            # server_ckpt, see _load); IR-18 (no pretrained AdaFace): ppfr first trains its own server (30 epochs)
            "stages": [("client", 30, 1)] if pretrained else [("server", 30, 1), ("client", 30, 1)],
            "method_options.server_ckpt": "adaface.ckpt" if pretrained else None,
            "method_options.server_bgr": True,
            "method_options.eval_blur": "hybrid", "method_options.eval_flip": False,  # §6.6: no flip TTA
            "method_options.shuffle_block": 2, "method_options.shuffle_key": 56,
            "method_options.bits": None, "method_options.keep_ratio": 1.0,
            "model.in_channels": 3, "model.client_in": 3,
            "model.keys": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
        })  # fmt: skip
    else:
        raise KeyError(method)
    return e


def _config_file(method: str, depth: int) -> str:
    return f"{method}_ir{depth}.yaml"


EXPECTED = {_config_file(m, d): _expected(m, d) for m in ("arcface", "arcface_fd", "duetface", "partialface",
                                                         "minusface", "profacec") for d in (18, 50)}  # fmt: skip
EXPECTED["profacec_ir100.yaml"] = _expected("profacec", 100)  # the reference's AdaFace IR-101


def _build_meta(cfg: TrainConfig):
    # DuetFace's paper setting loads a PFLD checkpoint at build time; its structure does not depend on the ROI kind
    opts = dict(cfg.method_options)
    if opts.get("roi") == "pfld":
        opts.update(roi="template", landmark_ckpt=None)
    if cfg.method == "profacec":  # the pretrained server is loaded at build time; the structure does not depend on it
        opts.pop("server_ckpt", None)
    cls = method_class(cfg.method)
    with torch.device("meta"):
        method = cls(make_options(cls.Options, opts))
    method.options = make_options(cls.Options, dict(cfg.method_options))  # the config's own (e.g. its server_ckpt)
    return method


def _method_stages(cfg: TrainConfig) -> list[str]:
    """The method's stage names for the config's options, without building it (stages() reads only the options)."""
    cls = method_class(cfg.method)
    bare = cls.__new__(cls)
    object.__setattr__(bare, "options", make_options(cls.Options, dict(cfg.method_options)))
    return [s.name for s in cls.stages(bare)]


def _plan(cfg: TrainConfig) -> list[tuple[str, int, int]]:
    if cfg.stages:  # what Trainer.stage_plan runs
        return [(s.name, s.epochs, s.repeat) for s in cfg.stages]
    return [(name, cfg.epochs, 1) for name in _method_stages(cfg)]


def _value(cfg: TrainConfig, key: str):
    if key.startswith("method_options."):
        opts = make_options(method_class(cfg.method).Options, dict(cfg.method_options))
        return getattr(opts, key.split(".", 1)[1])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def config_mismatches(cfg: TrainConfig, expected: dict) -> list[str]:
    """Listed config values (everything but ``model.*``) that differ from ``expected``."""
    if cfg.method != expected["method"]:  # the other keys would be another method's
        return [f"method: config has {cfg.method!r}, METHODS.md gives {expected['method']!r}"]
    bad = []
    for key, want in expected.items():
        if key.startswith("model."):
            continue
        got = _plan(cfg) if key == "stages" else _value(cfg, key)
        if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
            same = abs(got - want) <= 1e-12 * max(1.0, abs(want))
        else:
            same = got == want and type(got) is type(want)
        if not same:
            bad.append(f"{key}: config has {got!r}, METHODS.md gives {want!r}")
    return bad


def structure_mismatches(method, expected: dict) -> list[str]:
    """The ``model.*`` checks on a built (meta) method."""
    got: dict = {}
    server = getattr(method, "server", None) or method.recognizer
    got["model.stage_ends"] = list(server.stage_ends)
    got["model.in_channels"] = server.input_layer[0].in_channels
    if method.name in ("duetface", "profacec"):
        got["model.client_in"] = method.client.conv1[0].in_channels
    if method.name == "duetface":
        got["model.client_taps"] = [tuple(t) for t in type(method.client).TAP_SHAPES]
        got["model.interfaces_out"] = [i.conv.out_channels for i in method.interfaces]
    if method.name == "partialface":
        from ppfr.ops.sample_ranks import PRUNED

        sp = method.space
        got["model.rank_space"] = (sp.s, sp.m, sp.n)
        got["model.pruned"] = tuple(PRUNED)
        kept = {k for row in sp.channel_table().reshape(-1, 3 * sp.s).tolist() for k in row}
        if any(k % 64 in PRUNED for k in kept):
            got["model.pruned"] = "a pruned frequency is used by a rank"
    if method.name == "minusface":
        g = method.generator
        got["model.fp_in_channels"] = method.recognizer_p.input_layer[0].in_channels
        got["model.unet"] = (g.enc[0][0].in_channels, tuple(b[0].out_channels for b in g.enc), g.head.out_channels)
    if method.name == "profacec":
        got["model.keys"] = [tuple(k.shape) for k in method.keys]
    return [f"{k}: model has {got.get(k)!r}, METHODS.md gives {v!r}" for k, v in expected.items()
            if k.startswith("model.") and got.get(k) != v]  # fmt: skip


def test_every_paper_config_has_expectations():
    assert PAPER_CONFIGS, "no paper configs found"
    assert sorted(PAPER_CONFIGS) == sorted(EXPECTED), "a paper config without a METHODS.md check (or vice versa)"


def _load(name: str, overrides: list[str] | None = None) -> TrainConfig:
    extra = ["method_options.landmark_ckpt=pfld.pth"] if name.startswith("duetface") else []
    if name in NEEDS_SERVER:
        extra = ["method_options.server_ckpt=adaface.ckpt"]
    return load_config(CONFIGS / name, extra + (overrides or []))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_matches_methods_md(name):
    expected = dict(EXPECTED[name])
    cfg = _load(name)
    assert cfg.name == Path(name).stem
    if name.startswith("duetface"):  # loaded with a (dummy) landmark_ckpt: the file's own value is None
        expected["method_options.landmark_ckpt"] = "pfld.pth"
    method = _build_meta(cfg)
    assert [s.name for s in method.stages()] == _method_stages(cfg)
    bad = config_mismatches(cfg, expected) + structure_mismatches(method, expected)
    assert not bad, f"{name} drifted from METHODS.md:\n  " + "\n  ".join(bad)


def _mutations(cfg: TrainConfig, expected: dict) -> list[tuple[str, list[str]]]:
    """One override per listed config value that changes it (stages: each stage's epochs and passes)."""
    alternatives = {"head.type": "cosface", "amp": "bf16", "method_options.roi": "template",
                    "method_options.interface": "random_per_forward", "method_options.rank_space": "paper",
                    "method_options.train_rule": "uniform", "method_options.bits": "8",
                    "method_options.keep_ratio": "0.5", "optim.momentum": "0.95",
                    "optim.no_decay": "1d", "batchnorm": "global", "data.last_batch": "drop",
                    "method": "arcface_fd" if cfg.method == "arcface" else "arcface"}  # fmt: skip
    out = []
    for key, want in expected.items():
        if key.startswith("model."):
            continue
        if key == "stages":
            for i in range(len(want)):
                for field, delta in (("epochs", 1), ("repeat", 1)):
                    st = [list(s) for s in want]
                    st[i][1 if field == "epochs" else 2] += delta
                    text = ", ".join(f"{{name: {n}, epochs: {e}, repeat: {r}}}" for n, e, r in st)
                    out.append((f"stages[{i}].{field}", [f"stages=[{text}]"]))
            continue
        if key in alternatives:
            new = alternatives[key]
        elif want is None:
            new = "1.0e-3" if key.startswith("optim.") else "x.pt"
        elif isinstance(want, bool):
            new = str(not want).lower()
        elif isinstance(want, int):
            new = str(want + 1)
        elif isinstance(want, float):
            new = repr(want * 2 if want else 1.0)
        elif isinstance(want, tuple):
            new = "[" + ", ".join(str(v + (1 if j == 0 else 0)) for j, v in enumerate(want)) + "]"
        elif isinstance(want, str):
            new = want + "_changed"
        else:
            raise AssertionError(f"no mutation for {key}={want!r}")
        out.append((key, [f"{key}={new}"]))
    return out


@pytest.mark.parametrize("name", ["duetface_ir50.yaml", "partialface_ir18.yaml", "minusface_ir50.yaml",
                                  "profacec_ir50.yaml", "profacec_ir18.yaml", "arcface_fd_ir18.yaml"])  # fmt: skip
def test_changing_any_listed_value_fails(name):
    expected = dict(EXPECTED[name])
    if name.startswith("duetface"):  # loaded with a (dummy) landmark_ckpt, see _load
        expected["method_options.landmark_ckpt"] = "pfld.pth"
    base = _load(name)
    assert not config_mismatches(base, expected)
    missed = []
    for key, overrides in _mutations(base, expected):
        try:
            cfg = _load(name, overrides)
        except ConfigError:
            continue  # the changed value does not even load: also a failure
        if not config_mismatches(cfg, expected):
            missed.append(key)
    assert not missed, f"changing these values of {name} went unnoticed: {missed}"


# ------------------------------------------------------------------------ DuetFace: the paper ROI needs a PFLD
def test_duetface_paper_configs_refuse_without_landmark_ckpt(capsys):
    from ppfr.cli import main as ppfr_main
    from ppfr.train.trainer import main as train_main

    for name in ("duetface_ir18.yaml", "duetface_ir50.yaml"):
        with pytest.raises(ConfigError, match="landmark_ckpt"):
            load_config(CONFIGS / name)
    assert ppfr_main(["train", str(CONFIGS / "duetface_ir50.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppfr train: method_options: ") and "landmark_ckpt" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert train_main([str(CONFIGS / "duetface_ir18.yaml")]) == 2
    assert "landmark_ckpt" in capsys.readouterr().err


# ------------------------------------------------------- PRO-Face C: the paper setting needs a pretrained server
def test_profacec_paper_configs_refuse_without_server_ckpt(capsys):
    from ppfr.cli import main as ppfr_main
    from ppfr.train.trainer import main as train_main

    for name in NEEDS_SERVER:
        with pytest.raises(ConfigError, match="method_options: server_ckpt is required"):
            load_config(CONFIGS / name)
    assert ppfr_main(["train", str(CONFIGS / "profacec_ir100.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppfr train: method_options: server_ckpt is required") and "server_ckpt=PATH" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert train_main([str(CONFIGS / "profacec_ir50.yaml")]) == 2
    assert "server_ckpt" in capsys.readouterr().err
    # named: it loads, and only the client stage trains (the server is frozen); the IR-18 config stays self-contained
    cfg = load_config(CONFIGS / "profacec_ir100.yaml", ["method_options.server_ckpt=adaface_ir101.ckpt"])
    assert cfg.method_options["depth"] == 100 and _method_stages(cfg) == ["client"]
    assert _method_stages(load_config(CONFIGS / "profacec_ir18.yaml")) == ["server", "client"]
    # the marker lives in a load-time option: a trained model rebuilds from model.pt without the checkpoint file
    from ppfr.methods.base import LOAD_TIME_OPTIONS

    assert "server_ckpt" in LOAD_TIME_OPTIONS


def test_method_options_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match="method_options: unknown option 'dept'"):
        load_config(None, ["method=arcface", "method_options={dept: 18}"])
    with pytest.raises(ConfigError, match="method: unknown method 'facenet'"):
        load_config(None, ["method=facenet"])
    with pytest.raises(ConfigError, match="method_options: .*roi"):
        load_config(None, ["method=duetface", "method_options={roi: hull}"])
    cfg = load_config(None, ["method=duetface", "method_options={depth: 18, roi: pfld, landmark_ckpt: a.pth}"])
    assert cfg.method_options["landmark_ckpt"] == "a.pth"  # checked for presence only; the file is read at build
    with pytest.raises(ConfigError, match="repeat"):
        load_config(None, ["stages=[{name: train, epochs: 1, repeat: 0}]"])
    assert dataclasses.asdict(load_config(None, ["stages=[{name: train}]"]).stages[0]) == {
        "name": "train", "epochs": 1, "repeat": 1}


# ------------------------------------------------------------------- stages[].repeat: TFace's NUM_AUG replication
def test_stage_repeat_runs_passes_and_keeps_the_epoch_schedule(tmp_path):
    import csv

    from ppfr.train.trainer import Trainer

    cfg = load_config(None, [
        "name=rep", f"out_dir={tmp_path}", "method=arcface", "method_options={depth: 18, width: 4}",
        "data.source=synthetic", "data.backend=torch", "data.num_samples=8", "data.num_classes=4",
        "data.batch_size=4", "data.num_workers=0", "stages=[{name: train, epochs: 2, repeat: 3}]",
        "optim.lr=0.05", "optim.lr_steps=[1]", "optim.warmup_steps=0", "log_every=1", "checkpoint_every=100",
        "eval.before=false", "eval.after=false",
    ])  # fmt: skip
    Trainer(cfg, quiet=True).fit()
    with open(cfg.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 epochs x 3 passes x 2 steps; the lr drops after epoch 1 = after the first 3 passes, not after pass 1
    assert [int(r["epoch"]) for r in rows] == [p for p in range(6) for _ in range(2)]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05] * 6 + [0.005] * 6)
