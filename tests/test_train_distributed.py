"""2-process gloo training on CPU equals 1 process on the same global batch (sharded head + DistBatchNorm)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from ppfr.train.config import load_config

STEPS = 3
GLOBAL_B = 8


def _setup(world: int, rank: int, tmp: str):
    from ppfr.methods import build_method
    from ppfr.train.distributed import convert_batchnorm
    from ppfr.train.trainer import Trainer, build_head, build_optimizer

    cfg = load_config(None, [f"out_dir={tmp}", "method=arcface", "method_options={depth: 18, width: 4}",
                             "optim.lr=0.05", "optim.weight_decay=5e-4", "seed=11"])  # fmt: skip
    trainer = Trainer(cfg, quiet=True)
    torch.manual_seed(0)
    method = build_method("arcface", depth=18, width=4)
    for m in method.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # per-rank dropout masks cannot match one process's; the math under test is the rest
    if world > 1:
        convert_batchnorm(method)
    method.set_stage("train")
    method.train()
    head = build_head(cfg, 10, 512)
    full_w = torch.randn(512, 10, generator=torch.Generator().manual_seed(5)) * 0.01
    inner = getattr(head, "head", head)
    off = getattr(head, "offset", 0)
    with torch.no_grad():
        inner.weight.copy_(full_w[:, off : off + inner.weight.shape[1]])
    opt = build_optimizer(method, head, cfg)
    return trainer, method, head, opt


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(GLOBAL_B, 3, 112, 112, generator=g) * 2 - 1, torch.randint(0, 10, (GLOBAL_B,), generator=g)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    trainer, method, head, opt = _setup(world, rank, tmp)
    x, y = _batch()
    n = GLOBAL_B // world
    losses = [trainer.train_step(method, head, opt, "train", x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n], 100 + s)
              for s in range(STEPS)]  # fmt: skip
    torch.save({"losses": torch.stack(losses), "params": {k: v for k, v in method.state_dict().items()}},
               f"{tmp}/rank{rank}.pt")  # fmt: skip
    torch.distributed.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    trainer, method, head, opt = _setup(1, 0, str(tmp_path))
    x, y = _batch()
    losses = torch.stack([trainer.train_step(method, head, opt, "train", x, y, 100 + s) for s in range(STEPS)])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["losses"], losses, rtol=2e-4, atol=1e-4)
        assert losses[-1] < losses[0]  # it trained
        ref = method.state_dict()
        for k, v in got["params"].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, ref[k], rtol=1e-3, atol=1e-4, msg=k)


# ----------------------------------------------------------------------- the device of each torchrun rank
def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_train_device_is_the_ranks_own_gpu(monkeypatch):
    import pytest

    from ppfr.train.distributed import train_device

    _fake_cuda(monkeypatch, 4)
    assert train_device("cuda", {"LOCAL_RANK": "3", "RANK": "7", "WORLD_SIZE": "8"}) == torch.device("cuda", 3)
    assert train_device("auto", {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
    assert train_device("cuda", {}) == torch.device("cuda", 0)  # a single process: the first visible GPU
    assert train_device("cuda:1", {}) == torch.device("cuda", 1)
    assert train_device("cpu", {"LOCAL_RANK": "3"}) == torch.device("cpu")  # cpu stays cpu
    with pytest.raises(ValueError, match="only 4 CUDA device"):
        train_device("cuda", {"LOCAL_RANK": "5"})
    with pytest.raises(ValueError, match="its own GPU"):
        train_device("cuda:0", {"LOCAL_RANK": "3"})
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer"):
        train_device("cuda", {"LOCAL_RANK": "three"})
    _fake_cuda(monkeypatch, 0)
    assert train_device("auto", {"LOCAL_RANK": "3"}) == torch.device("cpu")
    assert train_device("cpu", {}) == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        train_device("cuda", {"LOCAL_RANK": "0"})


def test_trainer_uses_train_device(monkeypatch, tmp_path):
    import pytest

    from ppfr.train import trainer as trainer_mod
    from ppfr.train.config import ConfigError

    picked = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: picked.append(d))
    monkeypatch.setattr(trainer_mod, "train_device", lambda requested, env: torch.device("cuda", int(env["LOCAL_RANK"])))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = load_config(None, [f"out_dir={tmp_path}", "method=arcface", "method_options={depth: 18, width: 4}"])
    t = trainer_mod.Trainer(cfg, quiet=True)
    assert t.device == torch.device("cuda", 3) and picked == [torch.device("cuda", 3)]
    monkeypatch.undo()  # the real train_device and CUDA state (none on CI: device=cuda is refused, one line)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: .*no CUDA device"):
            trainer_mod.Trainer(load_config(None, ["device=cuda", f"out_dir={tmp_path}"]), quiet=True)
