"""Fused per-tensor kernels shared by :mod:`geomkit.strategies` and :mod:`geomkit.statistics`.

Every kernel is written once as a plain PyTorch function over a 2-D ``[rows, COLUMNS]`` view
of a flattened tensor. Two backends run the same function:

``"eager"``
    Plain PyTorch. On the CPU the rows are processed in blocks of about 64K elements so that the
    temporaries stay in cache; on accelerators each tensor is one block.
``"compiled"``
    The same function through ``torch.compile`` (one fused loop per tensor, reductions split by
    row so that they run in parallel). If compilation fails (no C++ compiler, no Triton), geomkit
    warns once and falls back to eager.

Many tensors at once: :func:`gram_batch`, :func:`linear_moments_batch` and :func:`triple_batch`
cut large tensors into flat float64 chunks and pack small ones together into row-aligned,
zero-padded chunks on the eager backend (the number of operations then grows with the number of
elements, not of tensors; no tensor is copied whole), take each chunk's inner products from
small matrix products and add the chunks' sums up per tensor (docs/method.md#shadow-strategies);
on the compiled backend they run the per-tensor kernels.

Element-wise kernels give identical results on both backends (the arithmetic is the same
sequence of IEEE operations); reductions accumulate in float64 and agree to float64 rounding.

Exactness notes (docs/method.md#sign-test-and-zeros): the sign-conflict test
``sign(f) * sign(r) < 0`` is evaluated as ``float64(f) * float64(r) < 0`` for
float16/bfloat16/float32 inputs, which is exact (the product of two such values never rounds to zero
in float64), and with explicit sign comparisons for float64 inputs. Zeros never conflict; ``-0.0``
is a zero.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from geomkit._validation import check_choice, invalid

__all__ = [
    "BACKENDS",
    "COLUMNS",
    "DOT_FIELDS",
    "GRAM_FIELDS",
    "MOMENT_FIELDS",
    "TRIPLE_FIELDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "combine_linear",
    "combine_select",
    "dot_products",
    "gram",
    "linear_moments",
    "gram_batch",
    "linear_moments_batch",
    "triple_batch",
    "near_zero_batch",
    "compile_failed",
    "triple",
    "update_rounding",
    "subnormal_rounding",
    "FORMULA_SLACK",
    "UNIT_ROUNDOFF_64",
]

BACKENDS: tuple[str, ...] = ("eager", "compiled")
COLUMNS: int = 4096
"""Row length of the 2-D view every kernel works on."""
_CPU_BLOCK_ELEMENTS = {"reduce": 1 << 14, "elementwise": 1 << 16}
"""Eager CPU block sizes, measured on the project machine: reductions make float64 temporaries
and run fastest in 16K-element blocks; element-wise kernels in 64K-element blocks."""

_backend: str = os.environ.get("GEOMKIT_BACKEND", "eager")
if _backend not in BACKENDS:
    raise invalid("GEOMKIT_BACKEND", _backend, "one of " + ", ".join(BACKENDS))
_compiled: dict[Callable, Callable] = {}
_compile_failed = False


def get_backend() -> str:
    """Return the active kernel backend, ``"eager"`` or ``"compiled"``."""
    return _backend


def compile_failed() -> bool:
    """Whether ``torch.compile`` failed in this process, so that "compiled" now runs eagerly."""
    return _compile_failed


def set_backend(name: str) -> None:
    """Select the kernel backend for all strategies and statistics.

    Parameters
    ----------
    name : {"eager", "compiled"}
        ``"compiled"`` fuses each kernel with ``torch.compile``; ``"eager"`` runs plain PyTorch.
        The default is ``"eager"`` (or the ``GEOMKIT_BACKEND`` environment variable).
    """
    global _backend
    check_choice("backend", name, BACKENDS)
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend for the duration of a ``with`` block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


UNIT_ROUNDOFF_64: float = 2.0**-53
"""Unit roundoff of float64: ``|fl(x) - x| <= 2**-53 |x|`` for every rounded float64 operation."""
FORMULA_SLACK: float = 32 * UNIT_ROUNDOFF_64
"""Float64 slack of the ``n_unrounded`` test per unit of ``(max|a| + alpha + gamma) |f_i|`` and
``(max|b| + alpha + gamma) |r_i|``: the combine kernels and the reference ``a f_i + b r_i`` each
make a few float64 roundings of terms no larger than those (PCGrad: ``gamma |c| <= alpha + |b|``;
BLUR: ``alpha |k| <= gamma + |a|``), together at most about 15 of them."""


def update_rounding(dtype: torch.dtype) -> tuple[float, float]:
    """``(u, eta)`` with ``|d_i - d*_i| <= u |d*_i| + eta`` for an update of ``dtype`` that the
    combine kernels form from the exact ``d*_i = a f_i + b r_i`` (float64 roundings aside).

    ``combine_linear`` rounds a float64 value once to ``dtype`` (possibly through float32, a
    double rounding); ``combine_select`` rounds the weights and up to two operations in its
    compute dtype (float32 for 16-bit inputs), then once to ``dtype``. So
    ``u = (1 + u_dtype)(1 + u_compute)^3 - 1`` with ``u_x = eps(x)/2``, and ``eta`` covers
    subnormal results and flush-to-zero: ``tiny(dtype) + 3 tiny(compute dtype)``.

    >>> u, eta = update_rounding(torch.bfloat16)
    >>> round(u / 2**-8, 4)  # one bfloat16 rounding plus three float32 ones
    1.0
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u_dtype, u_compute = torch.finfo(dtype).eps / 2, torch.finfo(compute).eps / 2
    w = 3 * u_compute + 3 * u_compute**2 + u_compute**3  # (1 + u_c)^3 - 1 without cancelling
    u = u_dtype + w + u_dtype * w
    return u, torch.finfo(dtype).tiny + 3 * torch.finfo(compute).tiny


def subnormal_rounding(dtype: torch.dtype) -> float:
    """The absolute part of :func:`update_rounding` under gradual underflow (IEEE 754's
    default, and PyTorch's unless ``torch.set_flush_denormal(True)`` or fast-math kernels):
    half the subnormal spacing of ``dtype`` plus three of the compute dtype's. Used where the
    bound is summed over every coordinate (``eta sqrt(n) |r|`` on ``<d, r>``); the per-coordinate
    test of ``n_unrounded`` keeps the flush-to-zero-safe ``eta``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    half = [torch.finfo(x).tiny * torch.finfo(x).eps / 2 for x in (dtype, compute)]
    return half[0] + 3 * half[1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sign selection runs in float32 for 16-bit inputs, natively otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------------
# The kernels, each on [rows, COLUMNS] views. Reductions return a [k] float64 vector.
# --------------------------------------------------------------------------------------------


def _conflict(f: Tensor, r: Tensor, f64: Tensor | None, r64: Tensor | None) -> Tensor:
    """``sign(f) * sign(r) < 0``: from exact float64 products when given (free where they are
    needed anyway), otherwise from sign comparisons; either way zeros never conflict."""
    if f64 is None or r64 is None or f.dtype == torch.float64:
        return ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))
    return (f64 * r64) < 0


def _k_dot_products(f: Tensor, r: Tensor) -> Tensor:
    f64, r64 = f.double(), r.double()
    return torch.stack([(f64 * f64).sum(1), (r64 * r64).sum(1), (f64 * r64).sum(1)]).sum(1)


def _k_gram(f: Tensor, r: Tensor) -> Tensor:
    f64, r64 = f.double(), r.double()
    c = _conflict(f, r, f64, r64)
    nonzero = (f != 0) & (r != 0)
    zero = torch.zeros((), dtype=torch.float64, device=f.device)
    ff, rr, fr = f64 * f64, r64 * r64, f64 * r64
    sums = [
        torch.where(c, ff, zero).sum(1),
        torch.where(c, zero, ff).sum(1),
        torch.where(c, rr, zero).sum(1),
        torch.where(c, zero, rr).sum(1),
        torch.where(c, fr, zero).sum(1),
        torch.where(c, zero, fr).sum(1),
        c.sum(1, dtype=torch.float64),
        nonzero.sum(1, dtype=torch.float64),
    ]
    return torch.stack(sums).sum(1)


def _triple_sums(f: Tensor, r: Tensor, d: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    f64, r64, d64 = f.double(), r.double(), d.double()
    c = _conflict(f, r, f64, r64)
    opposed = _conflict(d, r, d64, r64)
    nonzero = (f != 0) & (r != 0)
    dr = d64 * r64
    sums = [
        (f64 * f64).sum(1),
        (r64 * r64).sum(1),
        (f64 * r64).sum(1),
        (d64 * d64).sum(1),
        (d64 * f64).sum(1),
        dr.sum(1),
        c.sum(1, dtype=torch.float64),
        nonzero.sum(1, dtype=torch.float64),
        opposed.sum(1, dtype=torch.float64),
        dr.abs().sum(1),
    ]
    return sums, c, f64, r64


def _k_triple(f: Tensor, r: Tensor, d: Tensor) -> Tensor:
    sums, _, _, _ = _triple_sums(f, r, d)
    return torch.stack([*sums, torch.zeros_like(sums[0])]).sum(1)


def _k_triple_checked(f: Tensor, r: Tensor, d: Tensor, check: Tensor) -> Tensor:
    # check: float64 [a_C, b_C, a_A, b_A, u, m_f, m_r, eta] (see triple()). Counts the
    # coordinates where |d_i - (a f_i + b r_i)| > u |a f_i + b r_i| + m_f |f_i| + m_r |r_i| + eta
    # (NaN included), a, b those of C or A.
    sums, c, f64, r64 = _triple_sums(f, r, d)
    ref = torch.where(c, check[0] * f64 + check[1] * r64, check[2] * f64 + check[3] * r64)
    bound = check[4] * ref.abs() + check[5] * f64.abs() + check[6] * r64.abs() + check[7]
    within = (d.double() - ref).abs() <= bound
    return torch.stack([*sums, (~within).sum(1, dtype=torch.float64)]).sum(1)


def _k_linear_moments(f: Tensor, r: Tensor, coefficients: Tensor) -> Tensor:
    # coefficients [S, 2] float64 rows (a, b): rule s forms d = a f + b r on every coordinate.
    # Returns [S * 5]: per rule (n_opposed, <d,d>, <d,f>, <d,r>, sum |d_i r_i|), accumulated
    # directly (no closed form, so no cancellation when d is small next to f and r). The
    # compiled form.
    f64, r64 = f.double(), r.double()
    exact = f.dtype != torch.float64
    p, q = (f64 * r64, r64 * r64) if exact else (None, None)
    out = []
    for s in range(coefficients.shape[0]):
        a, b = coefficients[s, 0], coefficients[s, 1]
        d = a * f64 + b * r64
        # d_i r_i = a f_i r_i + b r_i^2 with exact products for 16/32-bit inputs
        opposed = (a * p + b * q) < 0 if exact else _conflict(d, r64, d, r64)
        out += [
            opposed.sum(1, dtype=torch.float64),
            (d * d).sum(1),
            (d * f64).sum(1),
            (d * r64).sum(1),
            (d * r64).abs().sum(1),
        ]
    return torch.stack(out).sum(1)


def _k_linear_moments_gemm(f: Tensor, r: Tensor, coefficients: Tensor) -> Tensor:
    # The same moments with all rules in small matrix products (the eager form).
    f64, r64 = f.reshape(-1).double(), r.reshape(-1).double()
    d = coefficients @ torch.stack([f64, r64])  # [S, n]
    if f.dtype != torch.float64:
        opposed = (coefficients @ torch.stack([f64 * r64, r64 * r64])) < 0
    else:
        opposed = _conflict(d, r64, d, r64)
    dr = d * r64
    moments = [opposed.sum(1, dtype=torch.float64), (d * d).sum(1), d @ f64, dr.sum(1)]
    moments.append(dr.abs().sum(1))
    return torch.stack(moments, dim=1).reshape(-1)


def _k_gram_gemm(f: Tensor, r: Tensor) -> Tensor:
    # The sign-partitioned Gramian as one 4x4 Gram matrix (the eager form).
    f64, r64 = f.reshape(-1).double(), r.reshape(-1).double()
    c = _conflict(f.reshape(-1), r.reshape(-1), f64, r64)
    zero = torch.zeros((), dtype=torch.float64, device=f.device)
    x = torch.stack(
        [
            torch.where(c, f64, zero),
            torch.where(c, zero, f64),
            torch.where(c, r64, zero),
            torch.where(c, zero, r64),
        ]
    )  # [4, n]: f_C, f_A, r_C, r_A
    g = x @ x.T
    nonzero = ((f != 0) & (r != 0)).sum(dtype=torch.float64)
    return torch.stack(
        [g[0, 0], g[1, 1], g[2, 2], g[3, 3], g[0, 2], g[1, 3], c.sum(dtype=torch.float64), nonzero]
    )


def _k_combine_linear(
    f: Tensor,
    r: Tensor,
    c: Tensor,
    fire_c: Tensor,
    k: Tensor,
    fire_k: Tensor,
    alpha: Tensor,
    gamma: Tensor,
    out: Tensor,
) -> None:
    # d = gamma * f' + alpha * r', f' = f - c r where fire_c, r' = r - k f where fire_k.
    # Computed in float64 and rounded once: the coefficients c, k may lie outside the float32
    # range (|f|/|r| < 1e-38) although every input and the result lie well inside it.
    fw, rw = f.double(), r.double()
    fp = torch.where(fire_c, fw - c * rw, fw)
    rp = torch.where(fire_k, rw - k * fw, rw)
    out.copy_(gamma * fp + alpha * rp)


def _k_combine_select(
    f: Tensor, r: Tensor, alpha: Tensor, gamma: Tensor, prefer_retain: bool, out: Tensor
) -> None:
    # conflict -> alpha r; otherwise gamma f (+ alpha r when prefer_retain).
    dtype = _compute_dtype(f.dtype)
    c = _conflict(f, r, None, None)
    fw, rw = f.to(dtype), r.to(dtype)
    ar = alpha.to(dtype) * rw
    agree = gamma.to(dtype) * fw
    if prefer_retain:
        agree = agree + ar
    out.copy_(torch.where(c, ar, agree))


# --------------------------------------------------------------------------------------------
# Drivers: run a kernel over the 2-D views of one tensor on the active backend.
# --------------------------------------------------------------------------------------------


_EAGER_FORM: dict[Callable, Callable] = {
    _k_linear_moments: _k_linear_moments_gemm,
    _k_gram: _k_gram_gemm,
}
"""Kernels with a different (equivalent) form that runs faster unfused."""


def _eager(kernel: Callable) -> Callable:
    return _EAGER_FORM.get(kernel, kernel)


def _fused(kernel: Callable) -> Callable:
    """The ``torch.compile`` form of ``kernel`` (sizes and offsets dynamic)."""
    fn = _compiled.get(kernel)
    if fn is None:
        fn = torch.compile(kernel, dynamic=True)
        _compiled[kernel] = fn
    return fn


_RECOMPILE_LIMIT = 64
"""Graphs one kernel may specialise into: dtypes x (size and offset 0/1 specialisations).
Raised only around geomkit's own calls; past dynamo's default of 8 a kernel would silently
run unfused."""


def _run(kernel: Callable, *args, fuse: bool):
    """Run ``kernel`` on one block of views, fused when asked and possible, else eagerly."""
    global _compile_failed
    if not fuse or _compile_failed:
        return _eager(kernel)(*args)
    try:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return _fused(kernel)(*args)
    except Exception as error:
        _compile_failed = True
        warnings.warn(
            f"geomkit: torch.compile failed ({type(error).__name__}: {error}); "
            "falling back to the eager backend",
            RuntimeWarning,
            stacklevel=3,
        )
        return _eager(kernel)(*args)


def _views(
    tensors: Sequence[Tensor], kind: str = "reduce"
) -> list[tuple[tuple[Tensor, ...], bool]]:
    """Split same-shaped tensors into ``[rows, COLUMNS]`` blocks plus a ``[1, tail]`` remainder.

    Returns ``(views, fuse)`` pairs: ``fuse`` is true when the compiled backend runs them.
    """
    flats = [t.reshape(-1) for t in tensors]
    n = flats[0].numel()
    main = n - n % COLUMNS
    compiled = _backend == "compiled" and not _compile_failed
    pieces: list[tuple[tuple[Tensor, ...], bool]] = []
    if main:
        rows = main // COLUMNS
        if not compiled and flats[0].device.type == "cpu":
            step = max(1, _CPU_BLOCK_ELEMENTS[kind] // COLUMNS)
        else:
            step = rows
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            views = tuple(x[start * COLUMNS : stop * COLUMNS].view(-1, COLUMNS) for x in flats)
            pieces.append((views, compiled))
    if n > main:
        pieces.append((tuple(x[main:].view(1, -1) for x in flats), compiled))
    return pieces


def _reduce(kernel: Callable, tensors: Sequence[Tensor], *extra) -> Tensor:
    total = None
    for views, fuse in _views(tensors):
        part = _run(kernel, *views, *extra, fuse=fuse)
        total = part if total is None else total + part
    return total


def _elementwise(kernel: Callable, f: Tensor, r: Tensor, out: Tensor, *extra) -> Tensor:
    target = (
        out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    for (fv, rv, ov), fuse in _views([f, r, target], "elementwise"):
        _run(kernel, fv, rv, *extra, ov, fuse=fuse)
    if target is not out:
        out.copy_(target)
    return out


# --------------------------------------------------------------------------------------------
# Public per-tensor entry points (no host synchronisation anywhere).
# --------------------------------------------------------------------------------------------


DOT_FIELDS: tuple[str, ...] = ("ff", "rr", "fr")
"""Layout of :func:`dot_products`, and of the pooled ``dots`` every strategy rule takes."""


def dot_products(f: Tensor, r: Tensor) -> Tensor:
    """Return ``[<f,f>, <r,r>, <f,r>]`` of one tensor pair (layout :data:`DOT_FIELDS`) as a
    float64 device vector."""
    if f.numel() == 0:
        return torch.zeros(len(DOT_FIELDS), dtype=torch.float64, device=f.device)
    return _reduce(_k_dot_products, [f, r])


GRAM_FIELDS: tuple[str, ...] = (
    "ff_conflict",
    "ff_agree",
    "rr_conflict",
    "rr_agree",
    "fr_conflict",
    "fr_agree",
    "n_conflict",
    "n_both_nonzero",
)
"""Layout of :func:`gram`: the sign-partitioned Gramian and two coordinate counts. A field
``x`` of :data:`geomkit.fields.FIELD_TABLE` is either named here or is the sum of
``x_conflict`` and ``x_agree``."""


def gram(f: Tensor, r: Tensor) -> Tensor:
    """Return the sign-partitioned Gramian of one tensor pair (layout :data:`GRAM_FIELDS`).

    C is the set of coordinates with ``sign(f_i) * sign(r_i) < 0`` and A the rest
    (docs/method.md#shadow-strategies); sums are accumulated in float64.
    """
    if f.numel() == 0:
        return torch.zeros(len(GRAM_FIELDS), dtype=torch.float64, device=f.device)
    return _reduce(_k_gram, [f, r])


TRIPLE_FIELDS: tuple[str, ...] = (
    "ff",
    "rr",
    "fr",
    "dd",
    "df",
    "dr",
    "n_conflict",
    "n_both_nonzero",
    "n_opposed",
    "dr_abs",
    "n_unrounded",
)
"""Layout of :func:`triple`: fields of :data:`geomkit.fields.FIELD_TABLE`, by name."""

MOMENT_FIELDS: tuple[str, ...] = ("n_opposed", "dd", "df", "dr", "dr_abs")
"""Layout of the last axis of :func:`linear_moments`."""


def triple(f: Tensor, r: Tensor, d: Tensor, check: Tensor | None = None) -> Tensor:
    """Return the sufficient statistics of one (f, r, d) triple (layout :data:`TRIPLE_FIELDS`).

    ``check``, a float64 vector ``[a_C, b_C, a_A, b_A, u, m_f, m_r, eta]``, makes the same pass
    count ``n_unrounded``: the coordinates (NaN included) where
    ``|d_i - (a f_i + b r_i)| > u |a f_i + b r_i| + m_f |f_i| + m_r |r_i| + eta``, with
    ``(a, b)`` those of C (``sign(f_i) sign(r_i) < 0``) or of A, the reference formed in
    float64. Without ``check`` the count is 0.
    """
    if f.numel() == 0:
        return torch.zeros(len(TRIPLE_FIELDS), dtype=torch.float64, device=f.device)
    if check is None:
        return _reduce(_k_triple, [f, r, d])
    return _reduce(_k_triple_checked, [f, r, d], check.to(device=f.device, dtype=torch.float64))


def linear_moments(f: Tensor, r: Tensor, coefficients: Tensor) -> Tensor:
    """Moments of several uniform linear rules ``d = a f + b r`` on one tensor pair at once.

    Parameters
    ----------
    f, r : Tensor
        One tensor pair.
    coefficients : Tensor
        ``[S, 2]`` float64 rows ``(a, b)``.

    Returns
    -------
    Tensor
        ``[S, 5]`` float64 (layout :data:`MOMENT_FIELDS`): per rule the count of coordinates
        with ``d_i r_i < 0``, and ``<d,d>``, ``<d,f>``, ``<d,r>``, ``sum |d_i r_i|``, each
        accumulated directly over coordinates.
    """
    n_rules = coefficients.shape[0]
    if f.numel() == 0:
        return torch.zeros(n_rules, len(MOMENT_FIELDS), dtype=torch.float64, device=f.device)
    return _reduce(_k_linear_moments, [f, r], coefficients).view(n_rules, len(MOMENT_FIELDS))


def combine_linear(
    f: Tensor,
    r: Tensor,
    out: Tensor,
    *,
    alpha: Tensor,
    gamma: Tensor,
    c: Tensor,
    fire_c: Tensor,
    k: Tensor,
    fire_k: Tensor,
) -> Tensor:
    """Write ``gamma * f' + alpha * r'`` into ``out``: ``f' = f - c r`` where ``fire_c``, else
    ``f``; ``r' = r - k f`` where ``fire_k``, else ``r`` (all scalars are 0-d device tensors)."""
    if f.numel() == 0:
        return out
    return _elementwise(_k_combine_linear, f, r, out, c, fire_c, k, fire_k, alpha, gamma)


def combine_select(
    f: Tensor, r: Tensor, out: Tensor, *, alpha: Tensor, gamma: Tensor, prefer_retain: bool
) -> Tensor:
    """Write the sign-selected combination into ``out``: ``alpha r`` on conflicting coordinates,
    ``gamma f`` (plus ``alpha r`` if ``prefer_retain``) elsewhere."""
    if f.numel() == 0:
        return out
    return _elementwise(_k_combine_select, f, r, out, alpha, gamma, prefer_retain)


# --------------------------------------------------------------------------------------------
# Batched eager forms: many tensors packed into a few chunks.
# --------------------------------------------------------------------------------------------

_ROW: int = 256
"""Row length of a packed chunk of small tensors: every tensor piece starts on a row, the rest of
its last row is zero (zeros add nothing to any statistic: they never conflict, are never both
non-zero, never oppose, and add 0 to every sum)."""
_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 1 << 16}
"""Elements per chunk by device type (default for others: ``_CHUNK_DEFAULT``). On the CPU 64K:
half a megabyte of float64 per row, so that the few rows a kernel writes stay near the cache.
Fixed, not scaled with the thread count: the chunks set the order of the float64 sums, and the
statistics must not change in their last bits with the number of threads."""
_CHUNK_DEFAULT = 1 << 22
"""Elements per chunk on accelerators: large enough to amortise kernel launches while keeping
the temporaries far below a large tensor."""
_FLAT_MIN = 4 * _ROW
"""Tensors with at least this many elements are cut into flat pieces, one per chunk (a single
row as long as the piece: no padding, one matrix product per piece); smaller tensors are packed
together, row-aligned, so that their number does not multiply the number of operations."""


class _Chunk:
    """Pieces of one or several tensors packed into a ``[k, rows, width]`` float64 block.

    ``row_ids`` maps each row to the index (within the group) of the tensor it belongs to.
    A flat chunk holds one piece of a large tensor as one row of ``width`` elements.
    """

    __slots__ = ("n_rows", "pieces", "row_ids", "width")

    def __init__(self, width: int = _ROW) -> None:
        self.pieces: list[tuple[int, int, int, int]] = []  # (tensor, start, stop, first row)
        self.n_rows = 0
        self.row_ids: list[int] = []
        self.width = width


def _chunks(numels: Sequence[int], device: torch.device) -> list[_Chunk]:
    """Cut tensors of ``numels`` elements into chunks: flat pieces of large tensors, small
    tensors packed row-aligned together."""
    elements = _CHUNK_ELEMENTS.get(device.type, _CHUNK_DEFAULT)
    capacity = max(1, elements // _ROW)
    flat, packed = [], [_Chunk()]
    for j, n in enumerate(numels):
        if n >= _FLAT_MIN:
            pieces = -(-n // elements)
            size = -(-n // pieces)  # equal pieces
            for start in range(0, n, size):
                stop = min(n, start + size)
                chunk = _Chunk(stop - start)
                chunk.pieces.append((j, start, stop, 0))
                chunk.row_ids.append(j)
                chunk.n_rows = 1
                flat.append(chunk)
            continue
        start = 0
        while start < n:
            chunk = packed[-1]
            if chunk.n_rows == capacity:
                chunk = _Chunk()
                packed.append(chunk)
            rows = min(capacity - chunk.n_rows, -(-(n - start) // _ROW))
            stop = min(n, start + rows * _ROW)
            chunk.pieces.append((j, start, stop, chunk.n_rows))
            chunk.row_ids += [j] * rows
            chunk.n_rows += rows
            start = stop
    return flat + [c for c in packed if c.n_rows]


def _pack(chunk: _Chunk, tensors: Sequence[Sequence[Tensor]], workspace: Tensor) -> Tensor:
    """``[rows, chunk rows, width]`` float64 in ``workspace`` (``rows`` of at least the chunk's
    size): the chunk's pieces of each list in the first ``len(tensors)`` rows (zero-padded),
    the other rows left for the kernel to write."""
    size = chunk.n_rows * chunk.width
    x = workspace[:, :size]
    if len(chunk.pieces) > 1 or chunk.pieces[0][2] - chunk.pieces[0][1] < size:
        x[: len(tensors)].zero_()
    for j, start, stop, row in chunk.pieces:
        at = row * chunk.width
        for k, ts in enumerate(tensors):
            x[k, at : at + stop - start].copy_(ts[j].reshape(-1)[start:stop])
    return x.view(-1, chunk.n_rows, chunk.width)


def _groups(forget: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for j, f in enumerate(forget):
        groups.setdefault((f.device, f.dtype), []).append(j)
    return groups


def _packed(
    kernel: Callable[..., Tensor],
    width: tuple[int, ...],
    tensors: Sequence[Sequence[Tensor]],
    per_tensor: Tensor | None = None,
) -> Tensor:
    """Run ``kernel(x, dtype, per_row)`` over the chunks of every (device, dtype) group.

    ``x`` is ``[kernel.rows(per_row), chunk rows, width]`` float64 with the inputs in its
    first rows; ``kernel`` returns per-row sums ``[*width, rows]``, added up per tensor.
    Returns ``[n_tensors, *width]`` float64 on the first tensor's device. ``per_tensor``
    (``[n_tensors, ...]``) is gathered per row and handed to the kernel. A kernel with an
    entry in ``_EXACT`` is exact only on finite inputs: on devices in ``HOST_READ_FREE`` a
    group whose sums come out non-finite is computed again with the exact kernel (one check
    per group); elsewhere the exact kernel runs directly (a check would stall the stream).
    """
    home = tensors[0][0].device
    out = torch.zeros(len(tensors[0]), *width, dtype=torch.float64, device=home)
    for (device, dtype), members in _groups(tensors[0]).items():
        group = [[ts[j] for j in members] for ts in tensors]
        extra = None if per_tensor is None else per_tensor[members].to(device)
        chunks = _chunks([t.numel() for t in group[0]], device)
        if not chunks:  # every tensor of the group is empty: its sums stay 0
            continue
        exact = _EXACT.get(kernel)
        if exact is None or device.type not in HOST_READ_FREE:
            total = _group_sums(exact or kernel, width, group, chunks, dtype, extra)
        else:  # fast, then checked (a free host read here)
            total = _group_sums(kernel, width, group, chunks, dtype, extra)
            if not bool(torch.isfinite(total).all()):
                total = _group_sums(exact, width, group, chunks, dtype, extra)
        index = torch.tensor(members, dtype=torch.long, device=home)
        out.index_copy_(0, index, total.movedim(-1, 0).to(home))
    return out


def _group_sums(
    kernel: Callable[..., Tensor],
    width: tuple[int, ...],
    group: Sequence[Sequence[Tensor]],
    chunks: Sequence[_Chunk],
    dtype: torch.dtype,
    extra: Tensor | None,
) -> Tensor:
    """``[*width, n_members]``: the kernel's sums over the chunks of one group, in one reused
    float64 workspace."""
    device = group[0][0].device
    total = torch.zeros(*width, len(group[0]), dtype=torch.float64, device=device)
    rows = _SCRATCH[kernel](len(group), extra)
    size = max(c.n_rows * c.width for c in chunks)
    workspace = torch.empty(rows, size, dtype=torch.float64, device=device)  # reused
    ids = torch.tensor([j for c in chunks for j in c.row_ids], dtype=torch.long, device=device)
    first = 0
    for chunk in chunks:
        rows_of = ids[first : first + chunk.n_rows]  # one host-to-device copy per group
        first += chunk.n_rows
        per_row = None if extra is None else extra[rows_of]
        sums = kernel(_pack(chunk, group, workspace), dtype, per_row)
        total.index_add_(len(width), rows_of, sums)
    return total


def _gram_rows(x: Tensor, k: int) -> Tensor:
    """``[R, k, k]``: the Gram matrix of the first ``k`` rows of ``x`` ``[.., R, W]``, per
    chunk row (one matrix product)."""
    y = x[:k].transpose(0, 1)
    return torch.bmm(y, y.transpose(1, 2))


def _signs(f: Tensor, r: Tensor, dtype: torch.dtype, s: Tensor, c: Tensor) -> Tensor:
    """Write ``s`` = 1 where f and r are both non-zero (else 0) and ``c`` = -1 on C
    (``sign(f_i) sign(r_i) < 0``), 0 elsewhere; return the per-row counts ``[2, R]`` (both
    non-zero, conflicting)."""
    if dtype == torch.float64:  # sign comparisons: a product may underflow
        s.copy_((f != 0) & (r != 0))
        c.copy_(((f > 0) & (r < 0)) | ((f < 0) & (r > 0))).neg_()
    else:  # the float64 product is exact: its sign is the sign test, non-zero iff both are
        torch.mul(f, r, out=s).sign_()
        torch.clamp(s, max=0.0, out=c)
        s.abs_()
    return torch.stack([s.sum(-1), c.sum(-1).neg_()])


def _opposed(d: Tensor, r: Tensor, dtype: torch.dtype, dr: Tensor) -> tuple[Tensor, ...]:
    """``(n_opposed, negative sum, sum)`` per row of ``d`` ``[..., W]`` against ``r``
    ``[W]``: the count of coordinates with ``d_i r_i < 0``, ``sum min(d_i r_i, 0)`` and
    ``sum d_i r_i``; ``dr`` is scratch of ``d``'s shape (below float64 it may be ``d``
    itself: the sign test then reads the products only)."""
    torch.mul(d, r, out=dr)
    total = dr.sum(-1)
    if dtype == torch.float64:  # sign comparisons: a product may underflow
        opposed = ((d > 0) & (r < 0)) | ((d < 0) & (r > 0))
        return opposed.sum(-1, dtype=torch.float64), dr.clamp_(max=0.0).sum(-1), total
    # for <= 32-bit f, r (|x| >= 1.4e-45 when non-zero) the float64 product d_i r_i underflows
    # only if |d_i| < 1e-278, which a non-zero a f_i + b r_i reaches only with coefficients
    # below about 1e-200 (the registered rules' are the weights and alpha - <f,r>/<r,r>)
    negative = dr.clamp_(max=0.0)
    negative_sum = negative.sum(-1)
    return negative.sign_().sum(-1).neg_(), negative_sum, total


def _abs_sum(total: Tensor, negative: Tensor) -> Tensor:
    """``sum |x_i|`` from ``total = sum x_i`` and ``negative = sum min(x_i, 0)``: ``total - 2
    negative``, and inf where ``negative`` is -inf (there ``total`` may be -inf or NaN from inf -
    inf, while the sum of absolute values is inf, as in the per-tensor kernels)."""
    return torch.where(negative == -math.inf, math.inf, total - 2 * negative)


def _p_gram(x: Tensor, dtype: torch.dtype, _: None) -> Tensor:
    # x: [6, R, W] = (f, r, scratch x4). Per row: the GRAM_FIELDS sums, from the 2x2 Gram
    # matrices of (f_A, r_A) and of (f_C, r_C) (see _signs), one matrix product each. The
    # split is arithmetic: with m = 1 on C and 0 elsewhere, f_C = f m and f_A = f - f_C, exact
    # for finite values (x * 1, x * 0 and x - x are exact). A non-finite input turns some sums
    # into NaN, and _packed then takes the group again with _p_gram_selected.
    f, r = x[0], x[1]
    counts = _signs(f, r, dtype, x[4], x[5])  # [2, R]: both non-zero, conflicting
    on_c = x[5].neg_()  # 1.0 on C, 0.0 elsewhere
    torch.mul(x[:2], on_c, out=x[2:4])  # f_C, r_C
    x[:2].sub_(x[2:4])  # f_A, r_A
    return _gram_sums(x, counts)


def _p_gram_selected(x: Tensor, dtype: torch.dtype, _: None) -> Tensor:
    # As _p_gram, the split by selection (no arithmetic): a non-finite value lands in its own
    # part's sums only, as in gram(), and the counts come from comparisons (a NaN is non-zero,
    # never conflicting). Slower on the CPU (masked_fill_), so there only the fallback.
    f, r = x[0], x[1]
    counts = _signs(f, r, torch.float64, x[4], x[5])
    on_c = x[5] < 0
    torch.mul(x[:2], on_c, out=x[2:4]).masked_fill_(~on_c, 0.0)  # f_C, r_C (inf * 0 undone)
    x[:2].masked_fill_(on_c, 0.0)  # f_A, r_A
    return _gram_sums(x, counts)


def _gram_sums(x: Tensor, counts: Tensor) -> Tensor:
    """The GRAM_FIELDS rows from x = (f_A, r_A, f_C, r_C, ...) and the sign counts."""
    agree, conflict = _gram_rows(x[:2], 2), _gram_rows(x[2:4], 2)  # [R, 2, 2] each
    sums = [conflict[:, 0, 0], agree[:, 0, 0], conflict[:, 1, 1], agree[:, 1, 1]]
    sums += [conflict[:, 0, 1], agree[:, 0, 1], counts[1], counts[0]]
    return torch.stack(sums)


def _p_moments(x: Tensor, dtype: torch.dtype, coefficients: Tensor) -> Tensor:
    # x: [2S + 2, R, W] = (f, r, scratch); coefficients: [R, S, 2] float64 rows (a, b). Per
    # row: [S, 5] moments of d = a f + b r, formed in float64 and accumulated directly (no
    # closed form, so no cancellation when d is small next to f and r).
    n = coefficients.shape[1]
    a = coefficients[..., 0].T.unsqueeze(-1)  # [S, R, 1]
    b = coefficients[..., 1].T.unsqueeze(-1)
    f, r, d = x[0], x[1], x[2 : n + 2]
    torch.mul(a, f, out=d).addcmul_(b, r)
    df = torch.bmm(d.transpose(0, 1), f.unsqueeze(-1)).squeeze(-1).T  # [S, R]: one product
    dd = torch.linalg.vector_norm(d, dim=-1).square_()  # one fused pass, never negative
    n_opposed, negative, dr = _opposed(d, r, dtype, x[n + 2 :] if dtype == torch.float64 else d)
    # sum |d_i r_i| = sum d_i r_i - 2 sum min(d_i r_i, 0), both summed directly
    return torch.stack([n_opposed, dd, df, dr, _abs_sum(dr, negative)], dim=1)  # [S, 5, R]


def _p_triple(x: Tensor, dtype: torch.dtype, check: Tensor | None) -> Tensor:
    # x: [6, R, W] = (f, r, d, scratch x3); check: [R, 8] per row (see triple()) or None. Per
    # row: the TRIPLE_FIELDS sums; the inner products from one Gram matrix of (f, r, d).
    f, r, d = x[0], x[1], x[2]
    g = _gram_rows(x, 3)  # ff rr dd / fr df dr
    s, c = x[3], x[4]
    n_both, n_conflict = _signs(f, r, dtype, s, c)
    n_opposed, negative, _ = _opposed(d, r, dtype, x[5])
    dr = g[:, 1, 2]
    if check is None:
        n_off = torch.zeros_like(dr)
    else:
        c = check.T.unsqueeze(-1)  # [8, R, 1]
        conflict = x[4] != 0
        ref = torch.where(conflict, c[0] * f + c[1] * r, c[2] * f + c[3] * r)
        bound = c[4] * ref.abs() + c[5] * f.abs() + c[6] * r.abs() + c[7]
        within = (d - ref).abs() <= bound  # NaN is not
        n_off = (~within).sum(-1, dtype=torch.float64)
    sums = [g[:, 0, 0], g[:, 1, 1], g[:, 0, 1], g[:, 2, 2], g[:, 0, 2], dr]
    sums += [n_conflict, n_both, n_opposed, _abs_sum(dr, negative), n_off]
    return torch.stack(sums)


def _p_near_zero(x: Tensor, dtype: torch.dtype, params: Tensor) -> Tensor:
    # x: [2S + 4, R, W] = (f, r, scratch); params: [R, S, 5] float64 rows (a, b, c_f, c_r, s).
    # Per row and rule: the count of coordinates with r_i != 0 and
    # |a f_i + b r_i| <= c_f |f_i| + c_r |r_i| + s.
    n = params.shape[1]
    a, b, c_f, c_r, s = (params[..., i].T.unsqueeze(-1) for i in range(5))  # [S, R, 1]
    f, r = x[0], x[1]
    value, bound = x[2 : n + 2], x[n + 2 : 2 * n + 2]
    torch.mul(a, f, out=value).addcmul_(b, r).abs_()
    af, ar = torch.abs(f, out=x[2 * n + 2]), torch.abs(r, out=x[2 * n + 3])
    torch.mul(c_f, af, out=bound).addcmul_(c_r, ar).add_(s)
    near = torch.le(value, bound) & (r != 0)
    return near.sum(-1, dtype=torch.float64)  # [S, R]


_SCRATCH: dict[Callable, Callable[[int, Tensor | None], int]] = {
    _p_gram: lambda k, _: 6,
    _p_gram_selected: lambda k, _: 6,
    _p_moments: lambda k, coefficients: 2 * coefficients.shape[-2] + 2,
    _p_triple: lambda k, _: 6,
    _p_near_zero: lambda k, params: 2 * params.shape[-2] + 4,
}
"""Rows of the float64 block each packed kernel works in (inputs first), from the number of
inputs and the per-tensor parameters (``[n_tensors, S, ...]``: S rules)."""
_EXACT: dict[Callable, Callable] = {_p_gram: _p_gram_selected}
"""Kernels exact on finite inputs only, and the kernel exact on every input that replaces
them (on the CPU ``masked_fill_`` costs about ten times a multiplication; on GPUs both are
memory-bound)."""
HOST_READ_FREE: set[str] = {"cpu"}
"""Device types whose results the host reads without a synchronisation cost: only there do the
kernels check a result (finiteness) before going on."""


def _batched() -> bool:
    """Whether the batched (packed) eager forms run: always unless compiled kernels do."""
    return _backend != "compiled" or _compile_failed


def gram_batch(forget: Sequence[Tensor], retain: Sequence[Tensor]) -> Tensor:
    """:func:`gram` of every tensor pair at once: ``[n_tensors, len(GRAM_FIELDS)]`` float64 on
    the first tensor's device.

    On the eager backend the tensors are packed into a few chunks (pieces of large tensors,
    many small tensors together), so that the number of operations does not grow with the
    number of tensors; the compiled backend runs :func:`gram` per tensor.

    >>> f = [torch.tensor([1.0, -2.0]), torch.tensor([3.0])]
    >>> r = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0])]
    >>> torch.equal(gram_batch(f, r), torch.stack([gram(*p) for p in zip(f, r)]))
    True
    """
    if not forget:
        raise ValueError("forget is empty; expected at least one tensor")
    if not _batched():
        home = forget[0].device
        return torch.stack([gram(f, r).to(home) for f, r in zip(forget, retain, strict=True)])
    return _packed(_p_gram, (len(GRAM_FIELDS),), [forget, retain])


def linear_moments_batch(
    forget: Sequence[Tensor], retain: Sequence[Tensor], coefficients: Tensor
) -> Tensor:
    """:func:`linear_moments` of every tensor pair at once.

    ``coefficients`` is ``[n_tensors, S, 2]`` float64 (rows ``(a, b)`` per tensor and rule);
    returns ``[n_tensors, S, len(MOMENT_FIELDS)]`` float64 on the first tensor's device.
    Packed like :func:`gram_batch` on the eager backend.
    """
    if not forget:
        raise ValueError("forget is empty; expected at least one tensor")
    if not _batched():
        home = forget[0].device
        return torch.stack(
            [
                linear_moments(f, r, c.to(f.device)).to(home)
                for f, r, c in zip(forget, retain, coefficients, strict=True)
            ]
        )
    width = (coefficients.shape[1], len(MOMENT_FIELDS))
    return _packed(_p_moments, width, [forget, retain], coefficients)


def triple_batch(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    combined: Sequence[Tensor],
    checks: Tensor | None = None,
) -> Tensor:
    """:func:`triple` of every (f, r, d) at once: ``[n_tensors, len(TRIPLE_FIELDS)]`` float64
    on the first tensor's device.

    ``checks`` is ``None`` or ``[n_tensors, 8]`` float64, one ``check`` vector of
    :func:`triple` per tensor. Packed like :func:`gram_batch` on the eager backend.
    """
    if not forget:
        raise ValueError("forget is empty; expected at least one tensor")
    if not _batched():
        home = forget[0].device
        rows = [
            triple(f, r, d, None if checks is None else checks[j]).to(home)
            for j, (f, r, d) in enumerate(zip(forget, retain, combined, strict=True))
        ]
        return torch.stack(rows)
    if checks is not None:
        checks = checks.to(dtype=torch.float64)
    return _packed(_p_triple, (len(TRIPLE_FIELDS),), [forget, retain, combined], checks)


def near_zero_batch(forget: Sequence[Tensor], retain: Sequence[Tensor], params: Tensor) -> Tensor:
    """Per tensor and rule, the coordinates where ``d_i = a f_i + b r_i`` is too close to 0 for
    the sign of ``d_i r_i`` to be certain.

    ``params`` is ``[n_tensors, S, 5]`` float64 rows ``(a, b, c_f, c_r, s)``; a coordinate
    counts where ``r_i != 0`` and ``|a f_i + b r_i| <= c_f |f_i| + c_r |r_i| + s`` (evaluated
    in float64). Returns ``[n_tensors, S]`` float64 on the first tensor's device. Packed like
    :func:`gram_batch` (on every backend: it runs at verified records only).

    >>> f, r = [torch.tensor([1.0, -1.0, 2.0])], [torch.tensor([-1.0, 3.0, 0.0])]
    >>> params = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    >>> near_zero_batch(f, r, params).tolist()  # d = f + r = (0, 2, 2); r_3 = 0 never counts
    [[1.0]]
    """
    if not forget:
        raise ValueError("forget is empty; expected at least one tensor")
    return _packed(_p_near_zero, (params.shape[1],), [forget, retain], params)
