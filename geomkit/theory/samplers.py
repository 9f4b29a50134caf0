"""Synthetic gradient pairs for claim checks: seeded, several tensors per pair, any float dtype.

A sampler draws pairs ``(forget, retain)``, each a list of tensors (a small "model", so that
tensor and model granularity differ), deterministically from a seed through a
``torch.Generator``. Values are drawn in float64 and then rounded to the sampler's dtype.

Every sampler shares four knobs:

``rho``
    Coordinate-wise correlation of f with r (``f = rho r + sqrt(1 - rho^2) z`` before scaling):
    ``rho < 0`` makes conflicts (and PCGrad projections) frequent.
``norm_ratio``
    ``|f_j| / |r_j|`` per tensor: a number, or a range ``(low, high)`` drawn log-uniformly per
    tensor (docs/theory.md#r4 depends on it).
``dtype``
    float64, float32, bfloat16 or float16.
``shapes``
    The tensor shapes of one pair; every tensor also gets its own scale ``10^U(-1, 1)``.

Samplers: :class:`Gaussian` (dense), :class:`Sparse` (a chosen density of non-zeros),
:class:`HeavyTailed` (Student-t; ``df=1`` is Cauchy), :class:`Zeros` (exact zeros including
``-0.0``, and whole zero tensors: the undefined cases), :class:`Counterexamples` (the three
counterexamples to R4 of docs/theory.md#r4, fixed) and :class:`Fixed` (any given pairs).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from geomkit._validation import check_choice, check_integer, check_pair, check_real, invalid

__all__ = [
    "DTYPES",
    "Counterexample",
    "Counterexamples",
    "Fixed",
    "Gaussian",
    "HeavyTailed",
    "Pair",
    "Sampler",
    "Sparse",
    "Zeros",
    "counterexamples",
    "default_samplers",
]

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
"""The dtypes samplers produce."""

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((8, 8), (48,), (4, 12), (16,))


class Pair(NamedTuple):
    """One synthetic gradient pair: ``forget`` and ``retain``, one tensor per parameter."""

    forget: list[Tensor]
    retain: list[Tensor]


@dataclass(frozen=True)
class Sampler(ABC):
    """Base class of the synthetic gradient-pair samplers (see the module docstring)."""

    rho: float = 0.0
    norm_ratio: float | tuple[float, float] = 1.0
    dtype: torch.dtype = torch.float32
    shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES

    kind: ClassVar[str] = "sampler"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rho", check_real("rho", self.rho, -1.0, 1.0))
        ratio = self.norm_ratio
        if isinstance(ratio, tuple):
            if len(ratio) != 2:
                raise invalid("norm_ratio", ratio, "a number > 0 or a range (low, high)")
            low, high = (check_real("norm_ratio", x, 1e-12, 1e12) for x in ratio)
            if not (0 < low <= high):
                raise invalid("norm_ratio", ratio, "a range (low, high) with 0 < low <= high")
            object.__setattr__(self, "norm_ratio", (low, high))
        else:
            value = check_real("norm_ratio", ratio, 0.0, 1e12, strict=True)
            object.__setattr__(self, "norm_ratio", value)
        if not isinstance(self.dtype, torch.dtype):
            raise invalid(
                "dtype",
                self.dtype,
                f"a torch.dtype, got {type(self.dtype).__name__}",
                error=TypeError,
            )
        check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.shapes, tuple | list) and self.shapes:
            shapes = tuple(tuple(s) if isinstance(s, tuple | list) else (s,) for s in self.shapes)
        else:
            raise invalid("shapes", self.shapes, "a non-empty sequence of shapes")
        for shape in shapes:
            for size in shape:
                check_integer("every tensor dimension", size, 1)
        object.__setattr__(self, "shapes", shapes)

    # -- what a subclass defines -------------------------------------------------------------

    @abstractmethod
    def _base(self, g: torch.Generator, n: int) -> Tensor:
        """``n`` i.i.d. float64 draws of the sampler's distribution (zero-centred)."""

    def _mask(
        self, g: torch.Generator, f: Tensor, r: Tensor, j: int, case: float
    ) -> tuple[Tensor, Tensor]:
        """Put exact zeros into tensor ``j`` of a pair (default: none); ``case`` is one
        uniform draw per pair."""
        return f, r

    def _params(self) -> str:
        return ""

    # -- drawing -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """A short label, e.g. ``gaussian(rho=-0.5,ratio=1,float32)``."""
        ratio = self.norm_ratio
        ratio = f"{ratio[0]:g}..{ratio[1]:g}" if isinstance(ratio, tuple) else f"{ratio:g}"
        extra = self._params()
        extra = f"{extra}," if extra else ""
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.kind}({extra}rho={self.rho:g},ratio={ratio},{dtype})"

    def _ratio(self, g: torch.Generator) -> float:
        if isinstance(self.norm_ratio, tuple):
            low, high = (math.log(x) for x in self.norm_ratio)
            return math.exp(low + (high - low) * float(torch.rand((), generator=g)))
        return self.norm_ratio

    def _limit(self) -> float:
        # keeps every rule's update finite in float16 (|c r_i| <= |f| for PCGrad's c)
        return min(1e4, math.sqrt(torch.finfo(self.dtype).max))

    def _tensor(
        self, g: torch.Generator, shape: tuple[int, ...], j: int, case: float
    ) -> tuple[Tensor, Tensor]:
        n = math.prod(shape)
        r = self._base(g, n)
        z = self._base(g, n)
        f = self.rho * r + math.sqrt(max(0.0, 1.0 - self.rho**2)) * z
        f, r = self._mask(g, f, r, j, case)
        scale = 10.0 ** (2.0 * float(torch.rand((), generator=g)) - 1.0)
        ratio = self._ratio(g)
        nf, nr = float(f.norm()), float(r.norm())
        r = r * (scale / nr) if nr > 0 else r
        f = f * (scale * ratio / nf) if nf > 0 else f
        limit = self._limit()
        f, r = f.clamp(-limit, limit), r.clamp(-limit, limit)
        return f.reshape(shape).to(self.dtype), r.reshape(shape).to(self.dtype)

    def sample(self, n: int, seed: int = 0) -> list[Pair]:
        """Draw ``n`` pairs, deterministically from ``seed`` (the first k of ``sample(n)`` are
        ``sample(k)``).

        Parameters
        ----------
        n : int
            Number of pairs (>= 1).
        seed : int
            Seed of the ``torch.Generator``.

        Returns
        -------
        list of Pair
        """
        n = check_integer("n", n, 1)
        check_integer("seed", seed)
        g = torch.Generator().manual_seed(int(seed))
        pairs = []
        for _ in range(n):
            forget, retain = [], []
            case = float(torch.rand((), generator=g))
            for j, shape in enumerate(self.shapes):
                f, r = self._tensor(g, shape, j, case)
                forget.append(f)
                retain.append(r)
            pairs.append(Pair(forget, retain))
        return pairs


@dataclass(frozen=True)
class Gaussian(Sampler):
    """Dense Gaussian coordinates; ``rho`` is the coordinate correlation of f with r."""

    kind: ClassVar[str] = "gaussian"

    def _base(self, g: torch.Generator, n: int) -> Tensor:
        return torch.randn(n, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class Sparse(Sampler):
    """Gaussian coordinates, each of f and r non-zero with probability ``density``
    (independently), the rest exact zeros."""

    density: float = 0.1
    kind: ClassVar[str] = "sparse"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "density", check_real("density", self.density, 0.0, 1.0))

    def _params(self) -> str:
        return f"density={self.density:g}"

    def _base(self, g: torch.Generator, n: int) -> Tensor:
        return torch.randn(n, generator=g, dtype=torch.float64)

    def _mask(
        self, g: torch.Generator, f: Tensor, r: Tensor, j: int, case: float
    ) -> tuple[Tensor, Tensor]:
        keep_f = torch.rand(f.shape, generator=g, dtype=torch.float64) < self.density
        keep_r = torch.rand(r.shape, generator=g, dtype=torch.float64) < self.density
        return f * keep_f, r * keep_r  # -x * 0 gives -0.0: both zeros occur


@dataclass(frozen=True)
class HeavyTailed(Sampler):
    """Student-t coordinates with ``df`` degrees of freedom (``df=1``: Cauchy)."""

    df: int = 1
    kind: ClassVar[str] = "heavy_tailed"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "df", check_integer("df", self.df, 1))

    def _params(self) -> str:
        return f"df={self.df}"

    def _base(self, g: torch.Generator, n: int) -> Tensor:
        z = torch.randn(n, generator=g, dtype=torch.float64)
        chi2 = torch.randn(self.df, n, generator=g, dtype=torch.float64).square().sum(0)
        return z / torch.sqrt(chi2 / self.df)


@dataclass(frozen=True)
class Zeros(Sampler):
    """Gaussian coordinates with a ``fraction`` of exact zeros (``+0.0`` and ``-0.0``) in f and
    r, and whole zero tensors: in a quarter of the pairs the first tensor's f is zero (SAGO then
    gives d = 0 there), in a quarter the last tensor's r is zero, in an eighth every f is zero
    (the undefined cases of docs/theory.md#conventions)."""

    fraction: float = 0.3
    kind: ClassVar[str] = "zeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "fraction", check_real("fraction", self.fraction, 0.0, 1.0))

    def _params(self) -> str:
        return f"fraction={self.fraction:g}"

    def _base(self, g: torch.Generator, n: int) -> Tensor:
        return torch.randn(n, generator=g, dtype=torch.float64)

    def _zero(self, g: torch.Generator, x: Tensor, where: Tensor) -> Tensor:
        negative = torch.rand(x.shape, generator=g, dtype=torch.float64) < 0.5
        zeros = torch.where(negative, -0.0, 0.0).to(torch.float64)
        return torch.where(where, zeros, x)

    def _mask(
        self, g: torch.Generator, f: Tensor, r: Tensor, j: int, case: float
    ) -> tuple[Tensor, Tensor]:
        last = j == len(self.shapes) - 1
        all_f = case < 0.125 or (case < 0.375 and j == 0)
        all_r = 0.375 <= case < 0.625 and last
        zf = torch.rand(f.shape, generator=g, dtype=torch.float64) < self.fraction
        zr = torch.rand(r.shape, generator=g, dtype=torch.float64) < self.fraction
        f = self._zero(g, f, torch.ones_like(zf) if all_f else zf)
        r = self._zero(g, r, torch.ones_like(zr) if all_r else zr)
        return f, r


# ----------------------------------------------------------------------------------------------
# Counterexamples to R4 (docs/theory.md#r4)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counterexample:
    """One counterexample to R4 of docs/theory.md#r4 (one tensor, alpha = gamma = 1).

    ``cos_sago`` and ``cos_pcgrad`` are cos(d, r) of SAGO and PCGrad as docs/theory.md#r4 states
    them (three decimals); ``projects`` whether PCGrad's projection fires.
    """

    label: str
    forget: tuple[float, ...]
    retain: tuple[float, ...]
    cos_sago: float
    cos_pcgrad: float
    projects: bool

    def pair(self, dtype: torch.dtype = torch.float64) -> Pair:
        """The counterexample as a one-tensor :class:`Pair` in ``dtype``."""
        return Pair(
            [torch.tensor(self.forget, dtype=dtype)], [torch.tensor(self.retain, dtype=dtype)]
        )


_COUNTEREXAMPLES = (
    Counterexample("orthogonal-dominant", (0.01, 1.0), (1.0, 0.01), 0.020, 0.714, False),
    Counterexample("large-forget", (100.0, 0.01), (1.0, 1.0), 0.707, 0.714, False),
    Counterexample("projected", (-1.0, 0.001), (1.0, 1.0), 0.708, 0.894, True),
)


def counterexamples() -> tuple[Counterexample, ...]:
    """The three counterexamples to R4 of docs/theory.md#r4, cos(d_SAGO, r) < cos(d_PCGrad, r):

    ``r = (1, 0.01), f = (0.01, 1)``: SAGO 0.020 vs PCGrad 0.714;
    ``r = (1, 1), f = (100, 0.01)``: 0.707 vs 0.714;
    ``r = (1, 1), f = (-1, 0.001)`` (PCGrad projects): 0.708 vs 0.894.
    """
    return _COUNTEREXAMPLES


@dataclass(frozen=True)
class Counterexamples(Sampler):
    """The fixed counterexamples of docs/theory.md#r4 as a sampler: :meth:`sample` returns the
    three pairs whatever ``n`` and ``seed`` are (``rho``, ``norm_ratio`` and ``shapes`` are
    ignored)."""

    dtype: torch.dtype = torch.float64
    kind: ClassVar[str] = "counterexamples"

    def _base(self, g: torch.Generator, n: int) -> Tensor:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def name(self) -> str:
        return f"counterexamples({str(self.dtype).replace('torch.', '')})"

    def sample(self, n: int = 3, seed: int = 0) -> list[Pair]:
        check_integer("n", n, 1)
        return [c.pair(self.dtype) for c in _COUNTEREXAMPLES]


@dataclass(frozen=True)
class Fixed(Sampler):
    """Given pairs as a sampler (e.g. hand-made edge cases): :meth:`sample` returns them as
    they are, whatever ``n`` and ``seed`` are. ``label`` names the source."""

    pairs: tuple[Pair, ...] = ()
    label: str = "fixed"
    kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        pairs = tuple(Pair(list(p[0]), list(p[1])) for p in self.pairs)
        if not pairs:
            raise invalid("pairs", self.pairs, "at least one (forget, retain) pair", owner="Fixed")
        for i, (forget, retain) in enumerate(pairs):
            check_pair(forget, retain)
            if [t.shape for t in forget] != [t.shape for t in pairs[0].forget]:
                raise ValueError(f"pair {i} has other tensor shapes than pair 0")
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "dtype", pairs[0].forget[0].dtype)
        object.__setattr__(self, "shapes", tuple(tuple(t.shape) for t in pairs[0].forget))

    def _base(self, g: torch.Generator, n: int) -> Tensor:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def name(self) -> str:
        return f"{self.label}({str(self.dtype).replace('torch.', '')})"

    def sample(self, n: int = 1, seed: int = 0) -> list[Pair]:
        check_integer("n", n, 1)
        return [Pair(list(p.forget), list(p.retain)) for p in self.pairs]


def default_samplers() -> tuple[Sampler, ...]:
    """The samplers of :func:`geomkit.theory.audit_synthetic` by default: dense (independent,
    anti-correlated with a wide norm ratio, correlated with a small ratio), sparse,
    heavy-tailed, exact zeros, in float32, float64, bfloat16 and float16, plus the docs/theory.md#r4
    counterexamples."""
    return (
        Gaussian(rho=0.0, dtype=torch.float32),
        Gaussian(rho=-0.5, norm_ratio=(0.01, 100.0), dtype=torch.float64),
        Gaussian(rho=0.3, norm_ratio=0.1, dtype=torch.bfloat16),
        Sparse(density=0.1, rho=-0.3, dtype=torch.float32),
        HeavyTailed(df=1, norm_ratio=(0.1, 10.0), dtype=torch.float32),
        Zeros(fraction=0.3, rho=-0.2, dtype=torch.float16),
        Counterexamples(),
    )
