"""Training throughput (images/s) of every tiny config: one optimisation step of the method's last stage on a fixed
batch (forward, backward, SGD), as the trainer runs it. Synthetic 112x112 faces, the config's batch size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.conftest import measure
from ppfr.methods import build_method
from ppfr.train.config import load_config
from ppfr.train.trainer import Trainer, build_head, build_optimizer

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*_tiny.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_train_step_throughput(benchmark, config, tmp_path):
    cfg = load_config(config, [f"out_dir={tmp_path}"])
    trainer = Trainer(cfg, quiet=True)
    torch.manual_seed(0)
    method = build_method(cfg.method, **cfg.method_options)
    stage = (cfg.stages[-1].name if cfg.stages else method.stages()[-1].name)
    method.set_stage(stage)
    method.train()
    head = build_head(cfg, cfg.data.num_classes, method.options.embedding_size)
    opt = build_optimizer(method, head, cfg)
    b = cfg.data.batch_size
    g = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, 112, 112, generator=g) * 2 - 1
    y = torch.randint(0, cfg.data.num_classes, (b,), generator=g)
    step = iter(range(10**9))
    measure(benchmark, lambda: trainer.train_step(method, head, opt, stage, x, y, next(step)),
            case=f"train_{config.stem}", provider=f"{cfg.method}:{stage}", images=b, bytes_written=0,
            bytes_read=x.numel() * 4, dev=torch.device("cpu"), rounds=3)  # fmt: skip
