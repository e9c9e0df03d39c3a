"""PartialFace rank sampling (METHODS.md §4.2): per-sample (subset, permutation) -> (B, 27) channel indices.

A *rank* is one (subset S_i, permutation P_j) pair. A sample's rank selects s high-frequency DCT frequencies
(the same for Y, Cb and Cr) in a permuted order; the result is the (B, 3 s) channel index tensor that
:func:`ppfr.freq_encode` consumes directly, so sampling and encoding are one pass that computes only the
selected channels (the reference code builds all 6 subsets for the whole batch and then picks one).

Two sampling rules:

* ``"label"`` (the code's rule, `form_training_batch`): the 20 three-element subsets of {0..5} in lexicographic
  order; a sample with label y may only use the 3 subsets ``choice[y mod 20]``; one of them is drawn uniformly
  per sample, and independently one of the n permutations. Requires m = 6.
* ``"uniform"`` (the paper's rule, and inference): subset uniform over all m, permutation uniform over all n.

Rank spaces: :meth:`RankSpace.code` is exactly the reference code's tables (m=6 subsets of s=9, n=3
permutations). :meth:`RankSpace.generate` builds a keyed space with any (s, m, n) (m s <= 54): a seeded
partition of the kept channels and seeded permutations -- the shared secret of client and server. The paper's
default (s, m, n) = (9, 6, 6) is ``RankSpace.paper()``: the code's 6 subsets and 3 permutations, plus 3 seeded
permutations (the paper's 6 matrices are not public, METHODS §10).

No native kernel: the output is B x 27 integers drawn from a torch.Generator; the hot part is the encode.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ppfr import _backend
from ppfr.ops._validate import INT_TYPES, draw_device, require, to_device

# u + v <= 3: the 10 low frequencies PartialFace prunes (raster k = 8u + v), and the 54 it keeps (ascending).
PRUNED = (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)
KEPT = tuple(k for k in range(64) if k not in PRUNED)
CODE_SUBSETS = (
    (5, 34, 38, 21, 42, 55, 57, 50, 62),
    (45, 49, 54, 52, 19, 11, 47, 41, 63),
    (4, 60, 29, 13, 32, 61, 59, 33, 31),
    (48, 15, 35, 22, 27, 40, 14, 43, 18),
    (36, 39, 26, 6, 53, 23, 12, 20, 58),
    (46, 51, 56, 44, 25, 37, 28, 30, 7),
)
# new position j takes old position P[j]
CODE_PERMS = ((0, 1, 2, 3, 4, 5, 6, 7, 8), (7, 3, 0, 6, 5, 4, 1, 2, 8), (4, 8, 6, 0, 2, 5, 3, 7, 1))
LABEL_CHOICES = tuple(itertools.combinations(range(6), 3))  # 20 subsets of 3, lexicographic

SAMPLE_RANKS_BACKENDS = ("ref", "torch")


@dataclass(frozen=True)
class RankSpace:
    """The shared {S, P}: ``subsets`` (m, s) raster frequencies k in [0, 64), ``perms`` (n, s) permutations."""

    subsets: tuple[tuple[int, ...], ...]
    perms: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        s = len(self.subsets[0]) if self.subsets else 0
        if not self.subsets or not self.perms:
            raise ValueError("a rank space needs at least one subset and one permutation")
        if any(len(row) != s for row in self.subsets):
            raise ValueError("all subsets must have the same size s")
        flat = [k for row in self.subsets for k in row]
        if len(set(flat)) != len(flat) or any(not 0 <= k < 64 for k in flat):
            raise ValueError("subsets must be disjoint frequencies in [0, 64)")
        if any(sorted(p) != list(range(s)) for p in self.perms):
            raise ValueError(f"every permutation must be a permutation of range({s})")

    @property
    def s(self) -> int:
        return len(self.subsets[0])

    @property
    def m(self) -> int:
        return len(self.subsets)

    @property
    def n(self) -> int:
        return len(self.perms)

    @classmethod
    def code(cls) -> RankSpace:
        """Exactly the reference code's tables: 6 subsets of 9, 3 permutations."""
        return cls(CODE_SUBSETS, CODE_PERMS)

    @classmethod
    def paper(cls, seed: int = 0) -> RankSpace:
        """Paper default (s, m, n) = (9, 6, 6): the code's tables plus 3 permutations derived from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        extra: list[tuple[int, ...]] = []
        while len(extra) < 3:
            p = tuple(torch.randperm(9, generator=g).tolist())
            if p not in CODE_PERMS and p not in extra:
                extra.append(p)
        return cls(CODE_SUBSETS, CODE_PERMS + tuple(extra))

    @classmethod
    def generate(cls, s: int = 9, m: int = 6, n: int = 6, seed: int = 0) -> RankSpace:
        """A keyed space: a seeded partition of the 54 kept frequencies into m subsets of s, n seeded perms."""
        if s < 1 or m < 1 or n < 1 or s * m > len(KEPT):
            raise ValueError(f"need s, m, n >= 1 and s*m <= {len(KEPT)}, got s={s}, m={m}, n={n}")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(KEPT), generator=g).tolist()
        subsets = tuple(tuple(KEPT[order[i * s + j]] for j in range(s)) for i in range(m))
        perms = [tuple(range(s))]
        while len(perms) < n:
            p = tuple(torch.randperm(s, generator=g).tolist())
            if p not in perms or s < 4:  # tiny s cannot host many distinct perms; allow repeats there
                perms.append(p)
        return cls(subsets, tuple(perms))

    def channel_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(m, n, 3 s) int64: the colour-major channel indices of every rank (subset i, permutation j)."""
        sub = torch.tensor(self.subsets, dtype=torch.int64)  # (m, s)
        perm = torch.tensor(self.perms, dtype=torch.int64)  # (n, s)
        freq = sub[:, None, :].expand(-1, self.n, -1).gather(2, perm[None].expand(self.m, -1, -1))  # (m, n, s)
        table = torch.cat([freq + 64 * c for c in range(3)], dim=-1)  # [Y s][Cb s][Cr s]
        return table.to(device)


@dataclass(frozen=True)
class Ranks:
    """Sampled ranks: ``channels`` (B, 3 s) int64 for freq_encode, ``subset`` (B,), ``perm`` (B,) indices."""

    channels: torch.Tensor
    subset: torch.Tensor
    perm: torch.Tensor


def _check_labels(labels: torch.Tensor | None, batch: int | None) -> int:
    if labels is None:
        if batch is None or batch < 1:
            raise ValueError("pass labels (B,) or batch=B")
        return batch
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in INT_TYPES:
        raise ValueError("labels must be a 1-D integer tensor (B,)")
    if labels.numel():  # CPU labels: a ValueError now; device labels: a device-side assert (no host sync)
        require((labels >= 0).all(), "labels must be non-negative class indices")
    return labels.shape[0]


def _draw(b: int, space: RankSpace, rule: str, generator: torch.Generator | None,
          device: torch.device = torch.device("cpu")):  # fmt: skip
    """The random draws shared by both backends: (B,) subset choices (within the rule) and (B,) permutations,
    on ``device``. They are drawn on the generator's device (a CPU generator gives the same draws everywhere;
    the copy is non-blocking) or, without a generator, on ``device`` from its global RNG."""
    where = draw_device(generator, device)
    pick = torch.randint(0, 3 if rule == "label" else space.m, (b,), generator=generator, device=where)
    perm = torch.randint(0, space.n, (b,), generator=generator, device=where)
    return to_device(pick, device), to_device(perm, device)


@functools.lru_cache(maxsize=64)
def _device_tables(space: RankSpace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, n, 3 s) channel table and (20, 3) label choices on ``device``, made once (no per-call copy)."""
    with torch.inference_mode(False):  # normal tensors even when first asked for under inference_mode
        return space.channel_table(device), torch.tensor(LABEL_CHOICES, device=device)


def sample_ranks_ref(
    labels: torch.Tensor | None = None, *, batch: int | None = None, space: RankSpace | None = None,
    rule: str = "label", generator: torch.Generator | None = None,
) -> Ranks:  # fmt: skip
    """Per-sample loop, written like the reference code's `form_training_batch` (same draws as the fast form)."""
    space = space or RankSpace.code()
    b = _check_labels(labels, batch)
    pick, perm = _draw(b, space, rule, generator)
    subset, chans = [], []
    for i in range(b):
        s_i = LABEL_CHOICES[int(labels[i]) % 20][int(pick[i])] if rule == "label" else int(pick[i])
        order = [space.subsets[s_i][p] for p in space.perms[int(perm[i])]]
        chans.append([64 * c + k for c in range(3) for k in order])
        subset.append(s_i)
    dev = labels.device if labels is not None else torch.device("cpu")
    return Ranks(torch.tensor(chans, device=dev), torch.tensor(subset, device=dev), perm.to(dev))


def _sample_ranks_torch(b, labels, space, rule, generator, dev: torch.device) -> Ranks:
    """Vectorised sampling on ``dev``: draws, label lookup and table gather never leave the device."""
    pick, perm = _draw(b, space, rule, generator, dev)
    table, choices = _device_tables(space, dev)  # (m, n, 3s), (20, 3)
    if rule == "label":
        subset = choices[to_device(labels, dev).remainder(20)].gather(1, pick[:, None]).squeeze(1)
    else:
        subset = pick
    return Ranks(table[subset, perm], subset, perm)


def sample_ranks(
    labels: torch.Tensor | None = None, *, batch: int | None = None, space: RankSpace | None = None,
    rule: str = "label", generator: torch.Generator | None = None, backend: str = "auto",
    device: torch.device | str | None = None,
) -> Ranks:  # fmt: skip
    """Draw one PartialFace rank per sample, vectorised, without a host sync.

    Args:
        labels: (B,) int class labels (needed for ``rule="label"``; otherwise pass ``batch``).
        batch: B when no labels are given (inference, ``rule="uniform"``).
        space: the shared rank space (default: the reference code's :meth:`RankSpace.code`).
        rule: ``"label"`` (code: 3 of 6 subsets by ``label % 20``) or ``"uniform"`` (paper / inference).
        generator: a ``torch.Generator`` for reproducible draws; a CPU one gives the same ranks on every
            device (the draws are copied over non-blocking). None: ``device``'s global RNG.
        backend: ``auto`` | ``torch`` | ``ref`` (the per-sample loop, which reads every draw on the host;
            identical results).
        device: where the result lives (default: the labels' device, else the CPU). The torch backend samples
            there without reading anything back to the host.

    Returns:
        :class:`Ranks` with ``channels`` (B, 3 s) int64 in [0, 192), colour-major [Y s][Cb s][Cr s], frequency
        order permuted; feed it to ``freq_encode(x, ranks.channels)``.
    """
    if rule not in ("label", "uniform"):
        raise ValueError(f"rule must be 'label' or 'uniform', got {rule!r}")
    space = space or RankSpace.code()
    if rule == "label":
        if labels is None:
            raise ValueError("rule='label' needs labels")
        if space.m != 6:
            raise ValueError(f"rule='label' is defined for m=6 subsets (3-of-6 by label % 20); space has m={space.m}")
    b = _check_labels(labels, batch)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = labels.device if labels is not None else torch.device("cpu")
    be = _backend.resolve("sample_ranks", backend, dev, SAMPLE_RANKS_BACKENDS)
    if be == "ref":
        r = sample_ranks_ref(labels, batch=b, space=space, rule=rule, generator=generator)
        return Ranks(*(t.to(dev) for t in (r.channels, r.subset, r.perm)))
    return _sample_ranks_torch(b, labels, space, rule, generator, dev)


def partialface_batch_ref(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference code's training-batch path (METHODS §4.6), for tests and benchmarks.

    Literal 896x896 encode of the whole batch -> build all 6 subsets for every sample (6B x 27 x H x W) -> keep
    each sample's drawn subset -> permute per sample in a Python loop. Uses the same draws as
    :func:`sample_ranks` (``rule="label"``, code tables), so the output equals
    ``freq_encode(x, sample_ranks(labels, generator=g).channels)``.
    """
    from ppfr.ops.freq import freq_encode_ref

    b, _, h, w = x.shape
    space = RankSpace.code()
    pick, perm = _draw(b, space, "label", generator)
    full = freq_encode_ref(x).reshape(b, 3, 64, h, w)
    all_subsets = torch.stack([full[:, :, list(s)] for s in space.subsets], dim=1)  # (B, 6, 3, 9, H, W)
    out = []
    for i in range(b):
        s_i = LABEL_CHOICES[int(labels[i]) % 20][int(pick[i])]
        sub = all_subsets[i, s_i]  # (3, 9, H, W)
        out.append(sub[:, list(space.perms[int(perm[i])])].reshape(27, h, w))
    return torch.stack(out)


def _check_sample_ranks(backend: str, dev: torch.device) -> float:
    labels = torch.arange(7, device=dev) * 13
    a = sample_ranks(labels, generator=torch.Generator().manual_seed(0), backend=backend).channels
    b = sample_ranks_ref(labels, generator=torch.Generator().manual_seed(0)).channels
    return float((a != b).sum())


SELF_CHECKS = {"sample_ranks": (SAMPLE_RANKS_BACKENDS, _check_sample_ranks)}
