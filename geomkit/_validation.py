"""Checks of user input shared by the public entry points (explicit errors, never ``assert``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["check_integer", "check_out", "check_pair", "check_real", "check_weight"]


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def check_integer(
    name: str, value: object, low: int | None = None, *, owner: str | None = None
) -> int:
    """Return ``value`` as an int if it is an integer (not a bool) >= ``low``, else raise.

    Messages name ``owner`` (the class or function checking), the field and the value.
    """
    p = _prefix(owner)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{p}{name} must be an integer, got {type(value).__name__}: {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{p}{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    strict: bool = False,
    owner: str | None = None,
) -> float:
    """Return ``value`` as a float if it is a finite real number in range, else raise.

    The range is ``[low, high]`` (``(low, high]`` with ``strict``); either end may be None.
    """
    p = _prefix(owner)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{p}{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{p}{name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if strict else value < low)
    above = high is not None and value > high
    if below or above:
        if low is not None and high is not None:
            interval = f"in {'(' if strict else '['}{low:g}, {high:g}]"
        elif low is not None:
            interval = f"{'>' if strict else '>='} {low:g}"
        else:
            interval = f"<= {high:g}"
        raise ValueError(f"{p}{name} must be a finite number {interval}, got {value!r}")
    return value


def check_weight(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise.

    Python and NumPy reals and one-element tensors are accepted; booleans are not.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_pair(
    forget: Sequence[Tensor],
    retain: Sequence[Tensor],
    names: tuple[str, str] = ("forget", "retain"),
) -> tuple[list, list]:
    """Validate two equal-length sequences of matching floating-point tensors.

    ``names`` are the roles of the two sequences, used in error messages.

    Raises
    ------
    TypeError
        If an argument is not a sequence of tensors, or a tensor is not floating point.
    ValueError
        If the lengths, shapes, dtypes or devices of corresponding tensors differ.
    """
    a, b = names
    if isinstance(forget, Tensor) or isinstance(retain, Tensor):
        raise TypeError(
            f"{a} and {b} must be sequences of tensors (one per parameter), "
            "got a single tensor; wrap it in a list"
        )
    forget, retain = list(forget), list(retain)
    if len(forget) != len(retain):
        raise ValueError(
            f"{a} and {b} must have the same number of tensors, "
            f"got {len(forget)} {a} and {len(retain)} {b} tensors"
        )
    if not forget:
        raise ValueError(f"{a} and {b} are empty; expected at least one tensor each")
    for j, (f, r) in enumerate(zip(forget, retain, strict=True)):
        for role, t in ((a, f), (b, r)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{role}[{j}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(
                    f"{role}[{j}] has dtype {t.dtype}; expected a floating-point tensor "
                    "(float16, bfloat16, float32 or float64)"
                )
        if f.shape != r.shape or f.dtype != r.dtype or f.device != r.device:
            raise ValueError(
                f"{a}[{j}] and {b}[{j}] must match in shape, dtype and device, "
                f"got {a}[{j}] {_describe(f)} and {b}[{j}] {_describe(r)}"
            )
    return forget, retain


def check_out(out: Sequence[Tensor], forget: list[Tensor]) -> list[Tensor]:
    """Validate ``out=`` tensors against the forget tensors they will receive results for."""
    if isinstance(out, Tensor):
        raise TypeError("out must be a sequence of tensors (one per parameter), got one tensor")
    out = list(out)
    if len(out) != len(forget):
        raise ValueError(f"out must hold {len(forget)} tensors, one per parameter, got {len(out)}")
    for j, (o, f) in enumerate(zip(out, forget, strict=True)):
        if not isinstance(o, Tensor):
            raise TypeError(f"out[{j}] must be a torch.Tensor, got {type(o).__name__}")
        if o.shape != f.shape or o.dtype != f.dtype or o.device != f.device:
            raise ValueError(
                f"out[{j}] must match forget[{j}] in shape, dtype and device, "
                f"got out[{j}] {_describe(o)} and forget[{j}] {_describe(f)}"
            )
    return out


def zero_d(value: float, like: Tensor) -> Tensor:
    """A 0-d float64 tensor on ``like``'s device (created without a host round trip)."""
    return torch.full((), value, dtype=torch.float64, device=like.device)
