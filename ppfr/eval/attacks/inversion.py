"""Closed-form inversion of linear payloads: the face solved for from what leaves the client, no learning.

The block-DCT payloads of ArcFace-FD, DuetFace's server and PartialFace are a known linear function of the face
(METHODS.md §2.3): per colour plane ``Z_c = 127.5 (RGB2YCC x)_c + bias_c`` (112 x 112), channel (c, u, v) is
``M_u Z_c M_v^T`` with ``M_f`` the banded 112 x 112 operators of ``ppfr.ops._freq_tables`` (3 non-zeros a row).
High-frequency channels are local derivatives of the image, and a PartialFace payload has 9 of them per pixel
for the ~4 source pixels each 8 x 8 up-sampled block spans: the system is over-determined except for a small null
space (the directions every sent channel annihilates, e.g. row- or column-constant profiles, and the DC the pruned
channels carried). The attack:

1. **Prior from public faces.** The attacker's own faces (``--data``, identities disjoint from the scored ones)
   give the mean face ``mu`` in Z space. It is the only thing learned, and it decides only what the payload does
   not see.
2. **Secret search.** Where the client draws a per-image secret (PartialFace: one of m x n ranks, in any of the
   ``code``, ``paper`` or ``keyed`` spaces), the attacker is not told which. For every candidate channel list of
   the method's :class:`~ppfr.methods.base.FreqPayloadOperator` it measures how well the payload is explained:
   the least-squares residual on a ``patch`` x ``patch`` window at the face centre, where the local operator is a
   small dense matrix (its range basis from one SVD per channel *set*; a permutation only reorders rows). The
   true rank leaves a float32-rounding residual, a wrong subset or order a residual of order one, so the smallest
   relative residual names the secret. Key recovery is scored against the candidate that reproduces the payload
   from the true face.
3. **Solve.** Per colour plane, Tikhonov-regularised least squares toward the mean face,

       Z_c = argmin  sum_{(u,v) sent} ||M_u Z M_v^T - Y_uv||^2 + ridge ||Z - mu_c||^2,

   whose normal matrix ``sum kron(M_u^T M_u, M_v^T M_v) + ridge I`` is a sparse 5 x 5 stencil on the 112 x 112
   grid: one sparse LU (SuperLU) per channel set, cached, then every face is two triangular solves. ``ridge``
   (1e-9; the operators' squared singular values reach 8.06) is far below every observed direction, so the data
   decide all they see and the mean face fills the rest. Back to RGB by the inverse colour map, clamped to [-1, 1].

Measured on celeba112 (64 held-out faces, mean of 2000 public faces, ridge 1e-9): SSIM 1.000 for all 192 channels,
0.919 for DuetFace's 162 server channels, 0.769-0.919 per PartialFace subset of the code space (S1, whose channels
all have u, v >= 1, is the hardest). A Gaussian (PCA, 200 components) prior in place of the mean face moved those
figures by < 0.01 (``docs/attack.md``), so the mean-face prior is kept: it is simple and documented.

The solve is batched and exact; :mod:`benchmarks.bench_inversion` compares it with a dense least-squares reference.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch

from ppfr.eval.attacks import register_attack
from ppfr.eval.attacks.common import Attack, AttackConfig, AttackContext, AttackError
from ppfr.eval.attacks.data import EVAL_STREAM, FaceSet, protect_with
from ppfr.eval.attacks.results import score_images
from ppfr.methods.base import FreqPayloadOperator, Method, Payload
from ppfr.ops._freq_tables import ENC_BIAS, ENC_SCALE, RGB2YCC, banded_operators, dense_operators

# Relative residual above which a chosen candidate is reported as "not explained" (the payload is not what the
# declared operator produces, e.g. a trained model whose options differ from the attacker's rebuild).
EXPLAINED = 1e-6


# ------------------------------------------------------------------------------------------- colour maps
def images_to_planes(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, n, n) RGB in [-1, 1] -> (B, 3, n, n) float64 Z planes (YCbCr - 128 on the 0..255 scale)."""
    a = torch.tensor(RGB2YCC, dtype=torch.float64)
    bias = torch.tensor(ENC_BIAS, dtype=torch.float64)[None, :, None, None]
    return ENC_SCALE * torch.einsum("cd,bdhw->bchw", a, x.double()) + bias


def planes_to_images(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`images_to_planes`: (B, 3, n, n) Z planes -> (B, 3, n, n) float64 RGB (not clamped)."""
    inv = torch.linalg.inv(torch.tensor(RGB2YCC, dtype=torch.float64))
    bias = torch.tensor(ENC_BIAS, dtype=torch.float64)[None, :, None, None]
    return torch.einsum("cd,bdhw->bchw", inv, (z.double() - bias) / ENC_SCALE)


def _split_colours(channels: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """(C,) channel list -> per colour (positions in the payload, raster frequencies k), in payload order."""
    out: list[tuple[list[int], list[int]]] = [([], []), ([], []), ([], [])]
    for pos, ch in enumerate(channels.tolist()):
        out[ch // 64][0].append(pos)
        out[ch // 64][1].append(ch % 64)
    return out


# --------------------------------------------------------------------------------------------- the solver
class FreqInverter:
    """Batched Tikhonov least-squares inversion of ``freq_encode`` for images of side ``n``.

    prior_mean: (3, n, n) float64 Z planes of the public mean face (see :func:`images_to_planes`).
    ridge: weight of ``||Z - mu||^2``; must be > 0 (it makes the null space well-posed).
    """

    def __init__(self, prior_mean: torch.Tensor, ridge: float = 1e-9) -> None:
        if prior_mean.dim() != 3 or prior_mean.shape[0] != 3 or prior_mean.shape[1] != prior_mean.shape[2]:
            raise ValueError(f"prior_mean must be (3, n, n), got {tuple(prior_mean.shape)}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        self.n = int(prior_mean.shape[-1])
        self.mu = prior_mean.double().cpu()
        self.ridge = float(ridge)
        m, _ = dense_operators(self.n)
        self.m = torch.from_numpy(m)  # (8, n, n) float64
        self._factors: dict[tuple[int, ...], Any] = {}

    @functools.cached_property
    def _gram_1d(self) -> list:
        import scipy.sparse as sp

        mats = [sp.csr_matrix(self.m[f].numpy()) for f in range(8)]
        return [(a.T @ a).tocsr() for a in mats]

    def factor(self, ks: tuple[int, ...]):
        """The sparse LU of ``sum_k kron(M_u^T M_u, M_v^T M_v) + ridge I`` for a frequency set (cached)."""
        key = tuple(sorted(ks))
        lu = self._factors.get(key)
        if lu is None:
            import scipy.sparse as sp
            import scipy.sparse.linalg as spl

            g = self._gram_1d
            nn_ = self.n * self.n
            a = sp.csc_matrix((nn_, nn_))
            for k in key:
                a = a + sp.kron(g[k // 8], g[k % 8], format="csc")
            lu = spl.splu((a + self.ridge * sp.identity(nn_, format="csc")).tocsc())
            self._factors[key] = lu
        return lu

    def solve(self, y: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """y (B, C, n, n) payload of one channel list ``channels`` (C,) -> (B, 3, n, n) float64 Z planes.

        A colour with no channel in the list is the mean face's plane (nothing is observed of it)."""
        b, c, h, w = y.shape
        if (h, w) != (self.n, self.n) or channels.shape != (c,):
            raise ValueError(f"payload (B, {c}, {h}, {w}) does not fit channels {tuple(channels.shape)} / n={self.n}")
        y = y.detach().double().cpu()
        out = self.mu[None].repeat(b, 1, 1, 1)
        for colour, (pos, ks) in enumerate(_split_colours(channels.cpu())):
            if not ks:
                continue
            mu_u = self.m[[k // 8 for k in ks]]  # (K, n, n)
            mu_v = self.m[[k % 8 for k in ks]]
            # A^T y = sum_k M_u^T Y_k M_v, batched over faces and channels
            rhs = (mu_u.transpose(1, 2) @ y[:, pos] @ mu_v).sum(1) + self.ridge * self.mu[colour]
            sol = self.factor(tuple(ks)).solve(np.ascontiguousarray(rhs.reshape(b, -1).T.numpy()))
            out[:, colour] = torch.from_numpy(np.ascontiguousarray(sol.T)).reshape(b, self.n, self.n)
        return out

    def images(self, y: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """:meth:`solve`, then RGB: (B, 3, n, n) float32 in [-1, 1]."""
        return planes_to_images(self.solve(y, channels)).clamp(-1, 1).float()


def dense_inversion_ref(y: torch.Tensor, channels: torch.Tensor, prior_mean: torch.Tensor,
                        ridge: float = 1e-9) -> torch.Tensor:  # fmt: skip
    """The reference semantics of :meth:`FreqInverter.solve`, dense: per colour the operator ``A`` (K n^2, n^2) is
    built from ``kron(M_u, M_v)`` and ``(A^T A + ridge I) z = A^T y + ridge mu`` solved by Cholesky in float64.
    (B, C, n, n), (C,), (3, n, n) -> (B, 3, n, n) Z planes. O(n^6): for small n (tests, the benchmark)."""
    n = prior_mean.shape[-1]
    m = torch.from_numpy(dense_operators(n)[0])
    b = y.shape[0]
    out = prior_mean.double()[None].repeat(b, 1, 1, 1)
    for colour, (pos, ks) in enumerate(_split_colours(channels.cpu())):
        if not ks:
            continue
        a = torch.cat([torch.kron(m[k // 8], m[k % 8]) for k in ks])  # (K n^2, n^2), row-major vec
        lhs = a.T @ a + ridge * torch.eye(n * n, dtype=torch.float64)
        rhs = y.double()[:, pos].reshape(b, -1) @ a + ridge * prior_mean[colour].double().reshape(1, -1)
        out[:, colour] = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(lhs)).T.reshape(b, n, n)
    return out


# ------------------------------------------------------------------------------------------ secret search
class SecretSearch:
    """Finds which candidate channel list produced a payload, by least-squares residual on a central patch.

    candidates: (R, C) int64 (a :class:`FreqPayloadOperator`'s rows); n: image side; patch: window side.
    """

    def __init__(self, candidates: torch.Tensor, n: int, patch: int = 32) -> None:
        if patch > n:
            patch = n
        self.candidates = candidates.cpu()
        self.n = n
        lo = (n - patch) // 2
        self.rows = torch.arange(lo, lo + patch)
        idx = torch.from_numpy(banded_operators(n)["enc_idx"].astype(np.int64))  # (3, n) source taps
        taps = idx[:, self.rows]
        self.src = torch.arange(int(taps.min()), int(taps.max()) + 1)
        m, _ = dense_operators(n)
        self.local = torch.from_numpy(m)[:, self.rows][:, :, self.src]  # (8, P, S) float64
        self._bases: dict[tuple[int, ...], torch.Tensor] = {}

    def _basis(self, ks: tuple[int, ...]) -> torch.Tensor:
        """Orthonormal basis (K P^2, rank) of the range of the local operator of the sorted frequency set ks."""
        q = self._bases.get(ks)
        if q is None:
            a = torch.cat([torch.kron(self.local[k // 8], self.local[k % 8]) for k in ks])  # (K P^2, S^2)
            u, s, _ = torch.linalg.svd(a, full_matrices=False)
            q = u[:, : int((s > s[0] * 1e-10).sum())].contiguous()
            self._bases[ks] = q
        return q

    def residuals(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, C, n, n) -> (B, R) relative residuals (residual energy / payload energy on the patch)."""
        win = y.detach().double().cpu()[:, :, self.rows][:, :, :, self.rows]  # (B, C, P, P)
        b = win.shape[0]
        total = win.pow(2).sum(dim=(1, 2, 3)).clamp_min(1e-300)
        res = torch.zeros(b, self.candidates.shape[0], dtype=torch.float64)
        for r, row in enumerate(self.candidates):
            for pos, ks in _split_colours(row):
                if not ks:
                    continue
                order = sorted(range(len(ks)), key=lambda j: ks[j])
                vec = win[:, [pos[j] for j in order]].reshape(b, -1)  # blocks in sorted-k order
                q = self._basis(tuple(ks[j] for j in order))
                res[:, r] += vec.pow(2).sum(1) - (vec @ q).pow(2).sum(1)
        return res.clamp_min(0) / total[:, None]

    def search(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B,) index of the best candidate and (B,) its relative residual."""
        res = self.residuals(y)
        best = res.argmin(dim=1)
        return best, res.gather(1, best[:, None])[:, 0]


# --------------------------------------------------------------------------------------------- the attack
class Inverter:
    """A method's payload -> face, closed form: the operator the method declares, the public prior, the search.

    ``recover(payload)`` -> (B, 3, n, n) float32 in [-1, 1]; after a call, ``last_keys`` (B,) holds the candidate
    rows found and ``last_residual`` (B,) their relative residuals.
    """

    def __init__(self, op: FreqPayloadOperator, prior_mean: torch.Tensor, cfg: AttackConfig) -> None:
        self.op = op
        self.solver = FreqInverter(prior_mean, cfg.inversion_ridge)
        n = self.solver.n
        self.search = SecretSearch(op.candidates, n, cfg.inversion_patch) if op.candidates.shape[0] > 1 else None
        self.last_keys = torch.zeros(0, dtype=torch.long)
        self.last_residual = torch.zeros(0, dtype=torch.float64)

    @classmethod
    def for_method(cls, method: Method, train: FaceSet, cfg: AttackConfig) -> Inverter | None:
        """None when the method declares no linear payload operator."""
        op = method.payload_operator()
        if op is None:
            return None
        return cls(op, public_mean_planes(train), cfg)

    def recover(self, payload: Payload) -> torch.Tensor:
        if self.op.tensor not in payload.tensors:
            raise AttackError(f"{payload.method} payload has no tensor {self.op.tensor!r} (its operator's input)")
        y = payload.tensors[self.op.tensor]
        b = y.shape[0]
        if self.search is None:
            keys, resid = torch.zeros(b, dtype=torch.long), None
        else:
            keys, resid = self.search.search(y)
        out = torch.empty(b, 3, y.shape[-2], y.shape[-1])
        for r in torch.unique(keys).tolist():
            sel = (keys == r).nonzero()[:, 0]
            out[sel] = self.solver.images(y[sel], self.op.candidates[r])
        self.last_keys = keys
        self.last_residual = resid if resid is not None else torch.zeros(b, dtype=torch.float64)
        return out.to(y.device)


def public_mean_planes(train: FaceSet, batch: int = 256) -> torch.Tensor:
    """(3, n, n) float64: the mean of the attacker's public faces in Z space (the inversion's prior)."""
    acc = None
    for start in range(0, len(train), batch):
        z = images_to_planes(train.batch(torch.arange(start, min(start + batch, len(train))))).sum(0)
        acc = z if acc is None else acc + z
    return acc / len(train)


def true_keys(images: torch.Tensor, y: torch.Tensor, op: FreqPayloadOperator, rows: slice | None = None) -> torch.Tensor:
    """(B,) the candidate row that reproduces payload ``y`` (B, C, n, n) from the true faces (B, 3, n, n): the
    ground truth of key recovery, found without asking the method for its secrets (compared on ``rows`` x
    ``rows`` of the image, all of it by default: the true row matches to float rounding, any other does not)."""
    from ppfr.ops.freq import freq_encode

    rows = rows or slice(None)
    full = freq_encode(images.float())[:, :, rows, rows]  # (B, 192, P, P)
    y = y[:, :, rows, rows]
    err = torch.stack([(full[:, row] - y).pow(2).sum(dim=(1, 2, 3)) for row in op.candidates], dim=1)
    return err.argmin(dim=1)


@register_attack
class InversionAttack(Attack):
    name = "inversion"
    description = "closed-form least-squares recovery of the face from a linear payload, secret searched"
    produces_images = True

    def applies(self, method: Method) -> str | None:
        if method.payload_operator() is None:
            return f"{method.name}'s payload is not a declared linear function of the image"
        return None

    @torch.no_grad()
    def run(self, ctx: AttackContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        cfg, method, val = ctx.cfg, ctx.method, ctx.val
        inv = ctx.shared.get("inverter") or Inverter.for_method(method, ctx.train, cfg)
        ctx.shared["inverter"] = inv
        op = inv.op
        recs, found, truth, resid = [], [], [], []
        t_solve = 0.0
        nb = (len(val) + cfg.eval_batch_size - 1) // cfg.eval_batch_size
        for k, start in enumerate(range(0, len(val), cfg.eval_batch_size)):
            x = val.batch(torch.arange(start, min(start + cfg.eval_batch_size, len(val)))).to(ctx.device)
            payload = protect_with(method, x, cfg, EVAL_STREAM, k)
            t1 = time.perf_counter()
            rec = inv.recover(payload)
            t_solve += time.perf_counter() - t1
            recs.append((rec.cpu() * 0.5 + 0.5).clamp(0, 1))
            found.append(inv.last_keys)
            resid.append(inv.last_residual)
            if op.candidates.shape[0] > 1:
                rows = slice(int(inv.search.rows[0]), int(inv.search.rows[-1]) + 1)
                truth.append(true_keys(x.cpu(), payload.tensors[op.tensor].cpu(), op, rows))
            if ctx.log and (k + 1) % max(1, nb // 5) == 0:
                ctx.log(f"  inversion {min(start + cfg.eval_batch_size, len(val))}/{len(val)} faces "
                        f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        rec = torch.cat(recs)
        keys, res = torch.cat(found), torch.cat(resid)
        sec = score_images(ctx, rec)
        key_rec = float((keys == torch.cat(truth)).double().mean()) if truth else None
        sec.update({
            "key_recovery": key_rec,
            "time_s": round(time.perf_counter() - t0, 2),
            "faces_per_s": round(len(val) / max(t_solve, 1e-9), 2),
            "secret_space": len(op.names),
            "unexplained_faces": int((res > EXPLAINED).sum()),
            "operator": {"tensor": op.tensor, "channels": int(op.candidates.shape[1]), "candidates": len(op.names)},
            "prior": {"kind": "public mean face", "images": len(ctx.train), "ridge": cfg.inversion_ridge},
            "search_patch": cfg.inversion_patch if op.candidates.shape[0] > 1 else None,
            "_grid": rec[ctx.grid_index()],
        })  # fmt: skip
        return sec
