"""The shared input checks: one message format naming the owner, the field and the value."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from geomkit._validation import (
    ConfigError,
    check_choice,
    check_integer,
    check_real,
    check_weight,
    invalid,
)

PACKAGE = Path(__file__).resolve().parents[1] / "geomkit"


def test_invalid_is_the_one_message_format() -> None:
    error = invalid("lr", -1.0, "a finite number > 0")
    assert (
        type(error) is ValueError and str(error) == "invalid lr=-1.0: expected a finite number > 0"
    )
    error = invalid("n", "x", "an integer", owner="Owner", error=ConfigError)
    assert type(error) is ConfigError and str(error) == "Owner: invalid n='x': expected an integer"


def test_check_integer_accepts_integers_and_names_bad_values() -> None:
    assert check_integer("n", np.int64(3), 1) == 3 and isinstance(check_integer("n", 3), int)
    with pytest.raises(TypeError, match=r"^Owner: invalid n=True: expected an integer, got bool$"):
        check_integer("n", True, owner="Owner")
    with pytest.raises(TypeError, match=r"^invalid n=2\.0: expected an integer >= 1, got float$"):
        check_integer("n", 2.0, 1)
    with pytest.raises(ValueError, match=r"^Owner: invalid n=0: expected an integer >= 1$"):
        check_integer("n", 0, 1, owner="Owner")
    with pytest.raises(ValueError, match=r"^invalid n=11: expected an integer >= 1 and <= 10$"):
        check_integer("n", 11, 1, 10)
    assert check_integer("n", None, 1, optional=True) is None
    with pytest.raises(
        TypeError, match=r"^invalid n=None: expected an integer >= 1, got NoneType$"
    ):
        check_integer("n", None, 1)


@pytest.mark.parametrize(
    "kwargs, value, message",
    [
        ({}, math.nan, "invalid x=nan: expected a finite number"),
        ({}, math.inf, "invalid x=inf: expected a finite number"),
        ({"low": 0, "strict": True}, 0.0, "invalid x=0.0: expected a finite number > 0"),
        ({"low": 0}, -1, "invalid x=-1: expected a finite number >= 0"),
        ({"low": 0, "high": 1}, 1.5, r"invalid x=1.5: expected a finite number in \[0, 1\]"),
        ({"high": 1}, 2, "invalid x=2: expected a finite number <= 1"),
        (
            {"low": 0, "high": 1, "strict": True, "strict_high": True},
            1.0,
            r"invalid x=1.0: expected a finite number in \(0, 1\)",
        ),
        (
            {"low": 0, "optional": True},
            -1.0,
            "invalid x=-1.0: expected a finite number >= 0 or None",
        ),
    ],
)
def test_check_real_names_the_range(kwargs, value, message) -> None:
    with pytest.raises(ValueError, match=rf"^{message}$"):
        check_real("x", value, **kwargs)


def test_check_real_accepts_reals_and_rejects_other_types() -> None:
    assert check_real("x", np.float32(0.5), 0, 1) == 0.5
    assert check_real("x", 1, 0, 1) == 1.0 and check_real("x", 0.999, 0, 1, strict_high=True)
    assert check_real("x", None, optional=True) is None
    with pytest.raises(TypeError, match=r"^T: invalid x='1': expected a finite number, got str$"):
        check_real("x", "1", owner="T")
    with pytest.raises(TypeError, match="invalid x=False"):
        check_real("x", False)


def test_the_error_class_replaces_type_and_value_errors() -> None:
    for value in ("1", -1.0):  # wrong type, out of range: both ConfigError
        with pytest.raises(
            ConfigError, match=r"^invalid lr=.*: expected a finite number > 0(, got str)?$"
        ):
            check_real("lr", value, 0.0, strict=True, error=ConfigError)
    with pytest.raises(
        ConfigError, match=r"^invalid steps=1\.5: expected an integer >= 1, got float$"
    ):
        check_integer("steps", 1.5, 1, error=ConfigError)
    with pytest.raises(ConfigError, match=r"^invalid dtype='int8': expected one of a, b$"):
        check_choice("dtype", "int8", ("a", "b"), error=ConfigError)
    check_choice("dtype", "a", ("a", "b"))


def test_check_weight_takes_one_element_tensors() -> None:
    assert check_weight("alpha", torch.tensor(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"^invalid alpha=-1\.0: expected a finite number >= 0$"):
        check_weight("alpha", torch.tensor(-1.0))


def test_config_and_engine_raise_config_error() -> None:
    from geomkit.config import ConfigError as FromConfig
    from geomkit.engine import EngineConfig

    assert FromConfig is ConfigError and issubclass(ConfigError, ValueError)
    cases = [
        ({"lr": -1.0}, r"^invalid lr=-1\.0: expected a finite number > 0$"),
        ({"steps": 0}, r"^invalid steps=0: expected an integer >= 1$"),
        ({"record_every": -1}, r"^invalid record_every=-1: expected an integer >= 0$"),
        (
            {"warmup_ratio": 1.0},
            r"^invalid warmup_ratio=1\.0: expected a finite number in \[0, 1\)$",
        ),
        ({"max_grad_norm": 0.0}, r"^invalid max_grad_norm=0\.0: expected .* > 0 or None$"),
        ({"weight_decay": -0.1}, r"^invalid weight_decay=-0\.1: expected a finite number >= 0$"),
        ({"nonfinite": "warn"}, r"^invalid nonfinite='warn': expected one of error, skip$"),
        ({"trainable": "("}, r"^invalid trainable='\(': expected a valid regex"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            EngineConfig(**kwargs).validate()
    EngineConfig(max_grad_norm=None).validate()


# Phrasings retired in favour of ``invalid name=value: expected ...`` (issue 9, point 7).
RETIRED = (
    re.compile(r"must be .*, got"),  # "flush_every must be an integer >= 1, got 0"
    re.compile(r"; valid \w+ are"),  # "unknown strategy 'x'; valid names are: ..."
    re.compile(r"^unknown .*; (known|valid) "),
    re.compile(r"needs an integer"),  # "Every(k) needs an integer k >= 1, got ..."
)
# Messages that may keep a retired phrasing: {substring of the message: reason}.
ALLOWED: dict[str, str] = {}


def _message(node: ast.expr) -> str | None:
    """The text of a string or f-string expression, ``{}`` for each formatted value."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_message(v) or "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_message(node.left) or "{}") + (_message(node.right) or "{}")
    return None


def _raised_messages(source: str) -> list[tuple[int, str]]:
    """``(line, message)`` of every exception raised with a literal message in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            text = _message(node.exc.args[0])
            if text is not None:
                found.append((node.lineno, text))
    return found


def _retired(text: str) -> bool:
    return any(p.search(text) for p in RETIRED) and not any(a in text for a in ALLOWED)


def test_retired_phrasings_are_detected() -> None:
    source = (
        "def f(n, name):\n"
        "    raise ValueError(f'n must be an integer >= 1, got {n!r}')\n"
        "    raise ValueError(f\"unknown strategy {name!r}; valid names are: \" + 'a, b')\n"
        "    raise ValueError(f'invalid n={n!r}: expected an integer >= 1')\n"
    )
    assert [line for line, text in _raised_messages(source) if _retired(text)] == [2, 3]


def test_no_retired_message_phrasings_in_the_package() -> None:
    """Error messages about user input use ``[owner: ]invalid name=value: expected ...``."""
    offenders, scanned = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        messages = _raised_messages(path.read_text(encoding="utf-8"))
        scanned += len(messages)
        rel = path.relative_to(PACKAGE.parent)
        offenders += [f"{rel}:{line}: {text}" for line, text in messages if _retired(text)]
    assert scanned > 100  # the scan sees the package's messages
    assert not offenders, "retired message style:\n" + "\n".join(offenders)
