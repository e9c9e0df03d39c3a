"""Data-parallel helpers that also work on CPU (gloo): a synchronised BatchNorm and the gradient reduction.

torch's SyncBatchNorm refuses CPU tensors, so multi-process CPU training would normalise each rank's slice of the
batch on its own and diverge from single-process training on the same global batch. ``DistBatchNorm`` computes the
batch statistics over all ranks (sum and sum of squares all-reduced, with an autograd-aware all-reduce), so N
processes on B/N samples each compute what one process computes on B.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn


def train_device(requested: str, env: Mapping[str, str]) -> torch.device:
    """The device one training process uses.

    ``requested`` is the config's ``device``: ``cpu``; ``cuda`` (required); ``auto`` (CUDA when available, else CPU);
    or an explicit ``cuda:N`` (single-process use only). Under ``torchrun`` every rank gets ``LOCAL_RANK`` from
    ``env``, and CUDA means ``cuda:LOCAL_RANK`` (one GPU per rank; the CUDA_VISIBLE_DEVICES numbering), never GPU 0
    for all. Without ``LOCAL_RANK`` (a single process) it is ``cuda:0``. Raises ValueError for a bad ``LOCAL_RANK``,
    ``cuda`` without a CUDA device, a ``LOCAL_RANK`` with no GPU of that index, or ``cuda:N`` under torchrun with N
    other than the rank's GPU.
    """
    requested = str(requested)
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "auto" and requested != "cuda" and not requested.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    raw = env.get("LOCAL_RANK")
    try:
        local = int(raw) if raw not in (None, "") else None
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got {raw!r}") from None
    if local is not None and local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    available = torch.cuda.is_available()
    if requested == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise ValueError(f"device {requested!r} asked for but no CUDA device is available")
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if local is not None and index != local:
            raise ValueError(f"device {requested!r} under torchrun with LOCAL_RANK={local}: each rank must use its "
                             f"own GPU (cuda:{local}); set device: cuda")  # fmt: skip
    else:
        index = 0 if local is None else local
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"cuda:{index} asked for (LOCAL_RANK={raw}) but only {count} CUDA device(s) are visible")
    return torch.device("cuda", index)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        # every rank's loss depends on the summed statistic: its gradient is the sum of all ranks' partials
        g = g.clone()
        dist.all_reduce(g)
        return g


class DistBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (any device); plain BatchNorm in eval or with one process."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), n_local])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d (keeping weights and running statistics) with DistBatchNorm, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, DistBatchNorm):
            new = DistBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new.to(next(iter(child.buffers()), torch.empty(0)).device))
        else:
            convert_batchnorm(child)
    return module


def all_reduce_grads(params) -> None:
    """Sum gradients over ranks. The loss is the global-batch mean computed identically on every rank (sharded
    cross-entropy), so each rank's backbone gradient is a partial sum over its own samples."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
