"""The hybrid blur's parameters and the argument checks the PRO-Face C blurs share (METHODS.md §6.2).

Split from :mod:`ppfr.ops.blur` (which re-exports every public name here): this module decides *what* a blur call
computes -- the parameter sets of the method, the draws of :func:`sample_hybrid_params`, the patch layout of
``MyBlurWay`` -- and holds no tensor math on images and no op registration. Everything here runs on the host
(parameters fix shapes, so drawing them on a GPU would force a sync).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch

# METHODS §6.2 parameter sets (train: drawn per batch; test: fixed, from validation/util/utils.py).
HYBRID_NS = (4, 9, 16, 25)
MEDIAN_KS = (7, 9, 11, 13, 15, 17, 19)
GAUSSIAN_K = 31
SIGMA_RANGE = (2.0, 8.0)
PIXEL_BS = tuple(range(3, 12))  # random.randint(7 - 4, 7 + 4), both ends included
TEST_N, TEST_MEDIAN_K, TEST_SIGMA, TEST_PIXEL_B = 16, 13, 5.0, 7
KIND_MEDIAN, KIND_GAUSSIAN, KIND_PIXELATE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# Argument checks (the API boundary), shared by the four blurs.
# ----------------------------------------------------------------------------------------------------------
def _as_int(name: str, v) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None


def _check_odd_k(name: str, k) -> int:
    k = _as_int(name, k)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1, got {k}")
    return k


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float, got {type(sigma).__name__}")
    sigma = float(sigma)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite float > 0, got {sigma}")
    return sigma


# ----------------------------------------------------------------------------------------------------------
# Hybrid blur (MyBlurWay) parameters.
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)  # eq=False: a tensor field makes == ambiguous
class HybridBlurParams:
    """The parameters of one :func:`~ppfr.ops.blur.hybrid_blur` call (all host-side; ``layout`` on the CPU).

    Attributes:
        n: number of patches, a perfect square (the grid is sqrt(n) x sqrt(n)).
        median_k: odd median window side.
        sigma: Gaussian standard deviation (kernel side is always 31).
        pixel_b: pixelation block size.
        layout: (n,) int64 permutation of range(n) shared by the batch (training), or (B, n) one per image
            (test). ``layout[..., i]`` is the patch position (raster order over the grid) that takes slot i:
            slots [0, n//3) are median, [n//3, 2*(n//3)) Gaussian, the rest pixelate (``random.sample`` of the
            original code, PRO-Face C ``MyBlurWay``).
    """

    n: int
    median_k: int
    sigma: float
    pixel_b: int
    layout: torch.Tensor

    @property
    def grid(self) -> int:
        return math.isqrt(self.n)

    def kinds(self) -> torch.Tensor:
        """(L, n) int64 in {0 median, 1 Gaussian, 2 pixelate}: the blur of each patch position, L = 1 or B."""
        lay = self.layout if self.layout.dim() == 2 else self.layout[None]
        return _kinds_from_layout(lay, self.n)


class HybridBlurOutput(NamedTuple):
    """``hybrid_blur``'s result: the blurred batch and the parameters that produced it."""

    image: torch.Tensor
    params: HybridBlurParams


def slot_kinds(n: int) -> torch.Tensor:
    """(n,) int64: the blur of slot i of the permutation -- floor(n/3) median, floor(n/3) Gaussian, rest pixelate."""
    t = n // 3
    s = torch.full((n,), KIND_PIXELATE, dtype=torch.int64)
    s[:t] = KIND_MEDIAN
    s[t : 2 * t] = KIND_GAUSSIAN
    return s


def _kinds_from_layout(layout: torch.Tensor, n: int) -> torch.Tensor:
    sk = slot_kinds(n).to(layout.device).expand(layout.shape[0], n)
    return torch.empty_like(layout).scatter_(1, layout, sk)  # kinds[layout[l, i]] = slot_kinds[i]


def _draw_int(choices: tuple[int, ...], g: torch.Generator) -> int:
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


def _check_square(n) -> int:
    n = _as_int("n", n)
    if n < 1 or math.isqrt(n) ** 2 != n:
        raise ValueError(f"n must be a perfect square >= 1 (4, 9, 16 or 25 in the method), got {n}")
    return n


def _check_layout(layout, n: int, batch: int) -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        layout = torch.as_tensor(layout)
    if layout.dtype.is_floating_point or layout.dtype == torch.bool or layout.is_complex():
        raise TypeError(f"layout must be an integer tensor, got {layout.dtype}")
    lay = layout.detach().to("cpu", torch.int64)
    if lay.shape not in ((n,), (batch, n)):
        raise ValueError(f"layout must be (n={n},) or (B={batch}, n={n}), got {tuple(lay.shape)}")
    rows = lay if lay.dim() == 2 else lay[None]
    if not torch.equal(rows.sort(dim=-1).values, torch.arange(n).expand_as(rows)):
        raise ValueError(f"every layout row must be a permutation of range({n})")
    return lay.contiguous()


def sample_hybrid_params(
    batch: int,
    n: Optional[int] = None,
    *,
    median_k: Optional[int] = None,
    sigma: Optional[float] = None,
    pixel_b: Optional[int] = None,
    layout: Union[None, torch.Tensor] = None,
    train: bool = True,
    generator: Optional[torch.Generator] = None,
) -> HybridBlurParams:
    """Draw (or validate) the parameters of a hybrid blur of a batch of ``batch`` images (METHODS §6.2).

    Every argument left as None is drawn from ``generator`` in this fixed order (arguments given explicitly
    are not drawn and consume no randomness):

    1. n: train -- uniform over (4, 9, 16, 25); test -- 16.
    2. median_k: train -- uniform over (7, 9, ..., 19); test -- 13.
    3. sigma: train -- U[2, 8) (one float64 draw); test -- 5.
    4. pixel_b: train -- uniform over {3, ..., 11}; test -- 7.
    5. layout: train -- ``randperm(n)`` shared by the batch; test -- one uniform permutation per image,
       ``argsort(rand(batch, n))`` (vectorised; the original used one ``random.sample`` per image).

    Args:
        generator: a CPU ``torch.Generator`` (the parameters fix shapes and are needed on the host, so drawing
            them on a GPU would force a sync). None: a fresh, non-deterministically seeded generator (never the
            global RNG).
    """
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError("generator must be a CPU torch.Generator (parameters are drawn on the host)")
    batch = _as_int("batch", batch)
    if n is None:
        n = _draw_int(HYBRID_NS, generator) if train else TEST_N
    n = _check_square(n)
    if median_k is None:
        median_k = _draw_int(MEDIAN_KS, generator) if train else TEST_MEDIAN_K
    median_k = _check_odd_k("median_k", median_k)
    if sigma is None:
        if train:
            lo, hi = SIGMA_RANGE
            sigma = lo + (hi - lo) * float(torch.rand((1,), generator=generator, dtype=torch.float64))
        else:
            sigma = TEST_SIGMA
    sigma = _check_sigma(sigma)
    if pixel_b is None:
        pixel_b = _draw_int(PIXEL_BS, generator) if train else TEST_PIXEL_B
    pixel_b = _as_int("pixel_b", pixel_b)
    if pixel_b < 1:
        raise ValueError(f"pixel_b must be >= 1, got {pixel_b}")
    if layout is None:
        if train:
            layout = torch.randperm(n, generator=generator)
        else:
            layout = torch.rand((batch, n), generator=generator).argsort(dim=1)
    layout = _check_layout(layout, n, batch)
    return HybridBlurParams(n=n, median_k=median_k, sigma=sigma, pixel_b=pixel_b, layout=layout)


def _grid_geometry(side: int, n: int) -> tuple[int, int, int]:
    """(r, p, side'): grid side r = sqrt(n), patch side p and working side r*p; as MyBlurWay: p = int(side / r),
    and when r*p != side the image is first resized to (p + 1) * r (112 -> 114 for n=9, 115 for n=25)."""
    r = math.isqrt(n)
    p = int(side / r)
    if p * r != side:
        p += 1
    return r, p, r * p
