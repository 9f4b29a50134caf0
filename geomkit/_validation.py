"""Checks of user input shared by the public entry points (explicit errors, never ``assert``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ConfigError",
    "check_choice",
    "check_integer",
    "check_out",
    "check_pair",
    "check_real",
    "check_weight",
    "invalid",
]


class ConfigError(ValueError):
    """An invalid configuration value (``invalid <field>=<value>: expected <allowed>``)."""


def invalid(
    name: str,
    value: object,
    expected: str,
    *,
    owner: str | None = None,
    error: type[Exception] = ValueError,
) -> Exception:
    """The one error message of user input: ``[owner: ]invalid name=value: expected ...``.

    Returns the exception (of class ``error``) for the caller to raise.
    """
    prefix = f"{owner}: " if owner else ""
    return error(f"{prefix}invalid {name}={value!r}: expected {expected}")


def _raise(
    name: str,
    value: object,
    expected: str,
    owner: str | None,
    error: type[Exception] | None,
    kind: type[Exception],
) -> None:
    """Raise :func:`invalid` as ``error``, or as ``kind`` (TypeError / ValueError) if None; a
    wrong type is named (``..., got str``)."""
    if kind is TypeError:
        expected += f", got {type(value).__name__}"
    raise invalid(name, value, expected, owner=owner, error=error or kind)


def check_integer(
    name: str,
    value: object,
    low: int | None = None,
    high: int | None = None,
    *,
    optional: bool = False,
    owner: str | None = None,
    error: type[Exception] | None = None,
) -> int | None:
    """Return ``value`` as an int if it is an integer (not a bool) in ``[low, high]``, else raise.

    ``optional`` also accepts None (returned as is). A wrong type raises ``TypeError``, a value
    out of range ``ValueError``; ``error`` (e.g. :class:`ConfigError`) replaces both. Messages
    name ``owner`` (the class or function checking), the field and the value.
    """
    if optional and value is None:
        return None
    bounds = [f">= {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    expected = " and ".join(["an integer " + bounds[0], *bounds[1:]]) if bounds else "an integer"
    expected += " or None" if optional else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _raise(name, value, expected, owner, error, TypeError)
    if (low is not None and value < low) or (high is not None and value > high):
        _raise(name, value, expected, owner, error, ValueError)
    return int(value)


def check_real(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    strict: bool = False,
    strict_high: bool = False,
    optional: bool = False,
    owner: str | None = None,
    error: type[Exception] | None = None,
) -> float | None:
    """Return ``value`` as a float if it is a finite real number in range, else raise.

    The range is ``[low, high]``, open at ``low`` with ``strict`` and at ``high`` with
    ``strict_high``; either end may be None. ``optional``, ``owner`` and ``error`` as for
    :func:`check_integer`.
    """
    if optional and value is None:
        return None
    if low is not None and high is not None:
        interval = f" in {'(' if strict else '['}{low:g}, {high:g}{')' if strict_high else ']'}"
    elif low is not None:
        interval = f" {'>' if strict else '>='} {low:g}"
    elif high is not None:
        interval = f" {'<' if strict_high else '<='} {high:g}"
    else:
        interval = ""
    expected = f"a finite number{interval}" + (" or None" if optional else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _raise(name, value, expected, owner, error, TypeError)
    number = float(value)
    below = low is not None and (number <= low if strict else number < low)
    above = high is not None and (number >= high if strict_high else number > high)
    if not math.isfinite(number) or below or above:
        _raise(name, value, expected, owner, error, ValueError)
    return number


def check_choice(
    name: str,
    value: object,
    allowed: Sequence[object],
    *,
    owner: str | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise :func:`invalid` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise invalid(
            name, value, "one of " + ", ".join(map(str, allowed)), owner=owner, error=error
        )


def check_weight(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite real number >= 0, else raise.

    Python and NumPy reals and one-element tensors are accepted; booleans are not.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    return check_real(name, value, 0.0)  # type: ignore[return-value]


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
        role = a if isinstance(forget, Tensor) else b
        raise TypeError(
            f"invalid {role}: expected a sequence of tensors (one per parameter), "
            "got a single tensor; wrap it in a list"
        )
    forget, retain = list(forget), list(retain)
    if len(forget) != len(retain):
        raise ValueError(
            f"invalid {b}: expected the same number of tensors as {a}, "
            f"got {len(forget)} {a} and {len(retain)} {b} tensors"
        )
    if not forget:
        raise ValueError(f"{a} and {b} are empty; expected at least one tensor each")
    for j, (f, r) in enumerate(zip(forget, retain, strict=True)):
        for role, t in ((a, f), (b, r)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"invalid {role}[{j}] of type {type(t).__name__}: expected a torch.Tensor"
                )
            if not t.is_floating_point():
                raise TypeError(
                    f"invalid {role}[{j}] of dtype {t.dtype}: expected a floating-point tensor "
                    "(float16, bfloat16, float32 or float64)"
                )
        if f.shape != r.shape or f.dtype != r.dtype or f.device != r.device:
            raise ValueError(
                f"invalid {b}[{j}] ({_describe(r)}): expected the shape, dtype and device of "
                f"{a}[{j}] ({_describe(f)})"
            )
    return forget, retain


def check_out(out: Sequence[Tensor], forget: list[Tensor]) -> list[Tensor]:
    """Validate ``out=`` tensors against the forget tensors they will receive results for."""
    if isinstance(out, Tensor):
        raise TypeError(
            "invalid out: expected a sequence of tensors (one per parameter), got a single tensor"
        )
    out = list(out)
    if len(out) != len(forget):
        raise ValueError(
            f"invalid out of {len(out)} tensors: expected {len(forget)}, one per parameter"
        )
    for j, (o, f) in enumerate(zip(out, forget, strict=True)):
        if not isinstance(o, Tensor):
            raise TypeError(f"invalid out[{j}] of type {type(o).__name__}: expected a torch.Tensor")
        if o.shape != f.shape or o.dtype != f.dtype or o.device != f.device:
            raise ValueError(
                f"invalid out[{j}] ({_describe(o)}): expected the shape, dtype and device of "
                f"forget[{j}] ({_describe(f)})"
            )
    return out


def zero_d(value: float, like: Tensor) -> Tensor:
    """A 0-d float64 tensor on ``like``'s device (created without a host round trip)."""
    return torch.full((), value, dtype=torch.float64, device=like.device)
