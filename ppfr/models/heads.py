"""Margin heads (METHODS.md §1.4): ArcFace, CosFace, and a class-sharded (model-parallel) head with a
distributed softmax cross-entropy for multi-process training.

The class matrix W (D x C) is initialised N(0, 0.01^2). ArcFace uses cos(theta + m) on the target class when
cos(theta) > cos(pi - m), else the numerically safe cos(theta) - m sin(pi - m) (monotone past theta + m > pi).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class MarginHead(nn.Module):
    """Base: normalised cosine logits with a margin on the target class, scaled by s. forward -> (loss, logits)."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.s, self.m, self.num_classes = float(s), float(m), num_classes
        self.weight = nn.Parameter(torch.randn(embedding_size, num_classes) * 0.01)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, emb: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
               offset: int = 0) -> torch.Tensor:  # fmt: skip
        """Margin logits (B, C_local) for the classes [offset, offset + C_local) held in ``weight``."""
        w = self.weight if weight is None else weight
        # margins need full precision (cos near +-1, sqrt(1 - cos^2)): the head always runs in float32
        with torch.autocast(emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float()), F.normalize(w.float(), dim=0).t()).clamp(-1, 1)
        local = labels - offset
        hit = (local >= 0) & (local < cos.shape[1])
        idx = local.clamp(0, cos.shape[1] - 1)[:, None]
        tgt = cos.gather(1, idx)
        cos = cos.scatter(1, idx, torch.where(hit[:, None], self.target_logit(tgt), tgt))
        return cos * self.s

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(emb, labels)
        return F.cross_entropy(logits, labels), logits


class ArcFaceHead(MarginHead):
    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        sin = (1.0 - cos * cos).clamp_min(0).sqrt()
        with_margin = cos * math.cos(self.m) - sin * math.sin(self.m)
        return torch.where(cos > math.cos(math.pi - self.m), with_margin, cos - self.m * math.sin(math.pi - self.m))


class CosFaceHead(MarginHead):
    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.4) -> None:
        super().__init__(embedding_size, num_classes, s, m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


def class_split(num_classes: int, world: int) -> list[int]:
    """Classes per rank (the first ranks take one more when C is not divisible), as TFace's get_class_split."""
    base, extra = divmod(num_classes, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        outs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(outs, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous()
        dist.all_reduce(g)
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over class-sharded logits: all-reduce(max) and all-reduce(sum exp); mean over batch."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, offset: int) -> torch.Tensor:
        mx = logits.max(dim=1, keepdim=True).values
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        e = (logits - mx).exp()
        denom = e.sum(dim=1, keepdim=True)
        dist.all_reduce(denom)
        prob = e / denom
        local = labels - offset
        hit = (local >= 0) & (local < logits.shape[1])
        idx = local.clamp(0, logits.shape[1] - 1)[:, None]
        # log-softmax form: the target probability underflows float32 for early-training margin logits (s = 64)
        tgt = torch.where(hit[:, None], logits.gather(1, idx), torch.zeros_like(mx))
        dist.all_reduce(tgt)
        ctx.save_for_backward(prob, idx, hit)
        return (denom.log() + mx - tgt).mean()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        prob, idx, hit = ctx.saved_tensors
        grad = prob.clone()
        grad.scatter_add_(1, idx, -hit[:, None].to(grad.dtype))
        return grad * g / prob.shape[0], None, None


class ShardedMarginHead(nn.Module):
    """Model-parallel margin head: rank r holds the columns of classes [offset_r, offset_r + C_r).

    forward(emb (B_local, D), labels (B_local,)) gathers embeddings and labels of all ranks (gradient-carrying),
    computes this rank's margin logits and the distributed cross-entropy over the global batch. With no process
    group (or world size 1) it is exactly the plain head.
    """

    def __init__(self, head_cls: type[MarginHead], embedding_size: int, num_classes: int, s: float = 64.0,
                 m: float = 0.5, rank: int | None = None, world: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = world if world is not None else (dist.get_world_size() if self.distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if self.distributed else 0)
        split = class_split(num_classes, self.world)
        self.offset, self.local_classes = sum(split[: self.rank]), split[self.rank]
        self.head = head_cls(embedding_size, self.local_classes, s, m)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.distributed or self.world == 1:
            logits = self.head.logits(emb, labels)
            return F.cross_entropy(logits, labels), logits
        all_emb = _AllGather.apply(emb)
        all_labels = [torch.empty_like(labels) for _ in range(self.world)]
        dist.all_gather(all_labels, labels.contiguous())
        all_labels = torch.cat(all_labels)
        logits = self.head.logits(all_emb, all_labels, offset=self.offset)
        return _DistCrossEntropy.apply(logits, all_labels, self.offset), logits
