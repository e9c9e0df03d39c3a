"""End-to-end training throughput against the bare step: does the loader, augmentation and bookkeeping keep up?

For every tiny config, on real JPEG faces (celeba112's ``train/`` folder when ``../shared`` is beside the repo,
else a folder of synthetic JPEG faces written once to a temporary directory), three numbers in one run:

* ``bare``: ``Trainer.train_step`` on one fixed batch in a loop (forward, backward, SGD; what bench_train.py times;
  with ``distill:`` the teacher's embedding of that batch is cached after the first step);
* ``end_to_end``: ``ppfr train`` itself (``Trainer.fit``: decode, flip, batching, device copy, lr schedule, logging,
  checkpoints) over the same number of steps, from the steady state: the wall time of a run of ``STEPS + WARM``
  steps minus that of a run of ``WARM`` steps, so model construction, the first (allocating) steps and the loader's
  start-up cancel out;
* their ratio, asserted ``<= MAX_RATIO`` (1.3): the input path and the bookkeeping cost at most 30 % over the step.

With ``distill:``, the teacher's embeddings of the whole dataset are computed once per (teacher, dataset) and kept
on disk (ppfr.train.teacher_store), as the first ``ppfr train`` on a dataset does; that build is timed on its own
(``teacher_store_s``, into a fresh ``$PPFR_CACHE_DIR``) before the runs, whose steps then read the store.

Run: ``pytest benchmarks/bench_train_e2e.py --benchmark-only -s`` (about a minute per config on 2 cores). The
machine must not be shared with other jobs for the ratio to mean anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from ppfr.methods import build_method
from ppfr.train.config import load_config
from ppfr.train.trainer import Trainer, build_head, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
# the tiny configs, and the transfer configs: their teacher (face-api.js on every clean face, cached per image) is
# part of what has to keep up
CONFIGS = sorted(p for pat in ("*_tiny.yaml", "*_transfer.yaml") for p in (ROOT / "configs").glob(pat))
CELEBA = ROOT.parent / "shared" / "data" / "celeba112" / "train"
STEPS = int(os.environ.get("PPFR_BENCH_E2E_STEPS", "12"))
WARM = 3
MAX_RATIO = 1.3


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> str:
    """A folder of aligned 112x112 JPEG faces, one sub-folder per identity."""
    if CELEBA.is_dir():
        return str(CELEBA)
    import cv2
    import numpy as np

    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for ident in range(20):
        (root / f"{ident:03d}").mkdir()
        base = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
        for k in range(32):
            img = np.clip(base.astype(np.int16) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"{ident:03d}" / f"{k:03d}.jpg"), img)
    return str(root)


def _cfg(config: Path, out: Path, faces: str, steps: int, stage: str | None):
    extra = [f"out_dir={out}", f"data.source={faces}", f"max_steps_per_epoch={steps}", "epochs=1",
             "eval.pairs=null", "eval.before=false", "eval.after=false", "progress=lines"]  # fmt: skip
    if stage is not None:
        extra.append(f"stages=[{{name: {stage}, epochs: 1}}]")
    return load_config(config, extra)


def _last_stage(config: Path) -> str:
    cfg = load_config(config, [])
    return cfg.stages[-1].name if cfg.stages else build_method(cfg.method, **cfg.method_options).stages()[-1].name


def _fit_seconds(cfg) -> float:
    t0 = time.perf_counter()
    Trainer(cfg, quiet=True).fit()
    return time.perf_counter() - t0


def _bare_images_per_s(cfg, stage: str, num_classes: int, steps: int) -> float:
    trainer = Trainer(cfg, quiet=True)
    torch.manual_seed(0)
    method = build_method(cfg.method, **cfg.method_options)
    trainer.setup_transfer(method)  # transfer: / distill: as ppfr train applies them (no-ops otherwise)
    st = method.set_stage(stage)
    method.train()
    if trainer.transfer is not None:  # epoch 0 of the stage, as the end-to-end run (frozen while freeze_epochs > 0)
        trainer.transfer.apply_epoch(method, st.trainable, 0)
    head = build_head(cfg, num_classes, method.options.embedding_size)
    proj, pretrained = None, frozenset()
    if trainer.distiller is not None:
        proj = trainer.distiller.new_projection(method.options.embedding_size, cfg.data.image_size,
                                                trainer.distill_start())  # fmt: skip
    if trainer.transfer is not None:
        pretrained = trainer.transfer.pretrained_ids()
    opt = build_optimizer(method, head, cfg, pretrained, proj)
    b = cfg.data.batch_size
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
    y = torch.randint(0, num_classes, (b,), generator=g)
    for s in range(WARM):
        trainer.train_step(method, head, opt, stage, x, y, s)
    t0 = time.perf_counter()
    for s in range(steps):
        trainer.train_step(method, head, opt, stage, x, y, WARM + s).item()  # the trainer reads the loss too
    return steps * b / (time.perf_counter() - t0)


def _build_teacher_store(cfg) -> float | None:
    """With ``distill:``, the per-dataset teacher store (ppfr.train.teacher_store) built once before the timed
    runs, as the first run on a dataset builds it; its one-time cost is reported, not folded into the ratio."""
    if cfg.distill.teacher is None or not cfg.distill.precompute:
        return None
    from ppfr.train.teacher_store import precompute

    trainer = Trainer(cfg, quiet=True)
    trainer.setup_transfer(build_method(cfg.method, **cfg.method_options))
    t0 = time.perf_counter()
    precompute(trainer.distiller, cfg.data, lambda _msg: None)
    return time.perf_counter() - t0


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_train_end_to_end_keeps_up_with_the_bare_step(benchmark, config, faces, tmp_path, monkeypatch):
    stage = _last_stage(config)
    long_cfg = _cfg(config, tmp_path / "long", faces, WARM + STEPS, stage)
    short_cfg = _cfg(config, tmp_path / "short", faces, WARM, stage)
    monkeypatch.setenv("PPFR_CACHE_DIR", str(tmp_path / "cache"))  # a fresh store: its build is measured here
    store_s = _build_teacher_store(long_cfg)
    num_classes = sum(1 for p in Path(faces).iterdir() if p.is_dir())
    b = long_cfg.data.batch_size

    def run() -> float:
        return _fit_seconds(long_cfg) - _fit_seconds(short_cfg)

    seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    e2e = STEPS * b / seconds
    bare = _bare_images_per_s(long_cfg, stage, num_classes, STEPS)
    ratio = bare / e2e
    benchmark.extra_info.update(case=f"train_e2e_{config.stem}", stage=stage, bare_images_per_s=round(bare, 2),
                                end_to_end_images_per_s=round(e2e, 2), ratio=round(ratio, 3),
                                teacher_store_s=None if store_s is None else round(store_s, 1),
                                data="celeba112/train" if faces == str(CELEBA) else "synthetic JPEG faces")  # fmt: skip
    store = "" if store_s is None else f" (the teacher store, built once per dataset: {store_s:.0f} s)"
    print(f"\n{config.stem} [{stage}]: bare {bare:.1f} img/s, end to end {e2e:.1f} img/s, ratio {ratio:.2f}{store}")
    assert ratio <= MAX_RATIO, f"{config.stem}: ppfr train runs at {e2e:.1f} img/s, {ratio:.2f}x slower than its bare step"
