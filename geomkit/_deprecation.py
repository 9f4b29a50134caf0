"""Old spellings of renamed names: keyword arguments, configuration keys and command-line flags.

Every rename goes through this module so that all old spellings warn the same way, with a
:class:`GeomkitDeprecationWarning` (a :class:`FutureWarning`, shown to users by default) naming
the old and the new spelling, and keep working until they are removed.

One name per meaning across the API, the configuration and the command line (old spellings
in brackets):

* ``retain_loss=``: the kind of retain loss, ``"nll"``, ``"kl"`` or ``"none"`` (``retain=``);
* ``forget_data``, ``retain_data`` (``--forget-data``, ``--retain-data``): the corpus files of
  a run on local files (``forget``, ``--forget``, ``--retain``);
* ``out=`` (``--out``): where results are written (``path=``, ``out_dir=``, ``record_to=``);
* ``by=``: what one value aggregates, ``"tensor"``, ``"layer"``, ``"component"``,
  ``"module"`` or ``"model"``, and in the theory also ``"coordinate"`` (``granularity=``).

The bare words ``forget`` and ``retain`` name the two slots of a pair (the two gradients of a
strategy or recorder, the two batch streams of an unlearner).
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["GeomkitDeprecationWarning", "DeprecatedFlag", "rename_keys", "renamed", "warn_renamed"]

F = TypeVar("F", bound=Callable[..., Any])


class GeomkitDeprecationWarning(FutureWarning):
    """An old spelling of a renamed argument, configuration key or flag was used."""


def warn_renamed(old: str, new: str, what: str = "argument", stacklevel: int = 3) -> None:
    """Warn that ``old`` is a deprecated spelling of ``new`` (``what``: argument, key, flag)."""
    warnings.warn(
        f"{what} {old!r} is deprecated and will be removed; use {new!r}",
        GeomkitDeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed(**aliases: str) -> Callable[[F], F]:
    """Decorator: accept each ``old=`` keyword of ``aliases`` (``old="new"``) as ``new=``.

    The old keyword warns; giving both spellings raises ``TypeError``. The signature shown by
    :func:`inspect.signature` and ``help`` is the new one.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in aliases.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{function.__qualname__}() got both {new!r} and its deprecated "
                            f"spelling {old!r}; pass only {new!r}"
                        )
                    warn_renamed(f"{old}=", f"{new}=", stacklevel=3)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def rename_keys(
    values: Mapping[str, Any],
    aliases: Mapping[str, str],
    source: str,
    error: type[Exception] = ValueError,
) -> dict[str, Any]:
    """``values`` with every deprecated key of ``aliases`` (old -> new) renamed, warning once each.

    ``source`` names where the keys come from (a file, "the overrides"); a key given in both
    spellings raises ``error``.
    """
    renamed_values = dict(values)
    for old, new in aliases.items():
        if old in renamed_values:
            if new in renamed_values:
                raise error(
                    f"{source} gives both {new!r} and its deprecated spelling {old!r}; "
                    f"keep only {new!r}"
                )
            warn_renamed(old, new, f"key in {source}:", stacklevel=3)
            renamed_values[new] = renamed_values.pop(old)
    return renamed_values


class DeprecatedFlag(argparse.Action):
    """An ``argparse`` action for an old flag: warns, then stores like the new one.

    Pass the new flag as ``new=``: ``add_argument("--retain", dest="retain_data",
    action=DeprecatedFlag, new="--retain-data", help=argparse.SUPPRESS)``.
    """

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_renamed(option_string or self.option_strings[0], self.new, "flag", stacklevel=2)
        setattr(namespace, self.dest, values)
