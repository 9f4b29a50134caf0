"""The shared input checks: one message format naming the owner, the field and the value."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geomkit._validation import check_integer, check_real


def test_check_integer_accepts_integers_and_names_bad_values() -> None:
    assert check_integer("n", np.int64(3), 1) == 3 and isinstance(check_integer("n", 3), int)
    with pytest.raises(TypeError, match=r"^Owner: n must be an integer, got bool: True$"):
        check_integer("n", True, owner="Owner")
    with pytest.raises(TypeError, match=r"n must be an integer, got float: 2\.0"):
        check_integer("n", 2.0)
    with pytest.raises(ValueError, match=r"^Owner: n must be an integer >= 1, got 0$"):
        check_integer("n", 0, 1, owner="Owner")


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        ({}, math.nan, "x must be a finite number, got nan"),
        ({}, math.inf, "x must be a finite number, got inf"),
        ({"low": 0, "strict": True}, 0.0, "x must be a finite number > 0, got 0.0"),
        ({"low": 0}, -1, "x must be a finite number >= 0, got -1.0"),
        ({"low": 0, "high": 1}, 1.5, r"x must be a finite number in \[0, 1\], got 1.5"),
        ({"high": 1}, 2, "x must be a finite number <= 1, got 2.0"),
    ],
)
def test_check_real_names_the_range(kwargs, value, message) -> None:
    with pytest.raises(ValueError, match=rf"^{message}$"):
        check_real("x", value, **kwargs)


def test_check_real_accepts_reals_and_rejects_other_types() -> None:
    assert check_real("x", np.float32(0.5), 0, 1) == 0.5
    assert check_real("x", 1, 0, 1) == 1.0
    with pytest.raises(TypeError, match=r"^T: x must be a real number, got str: '1'$"):
        check_real("x", "1", owner="T")
    with pytest.raises(TypeError, match="x must be a real number, got bool"):
        check_real("x", False)
