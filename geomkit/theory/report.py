"""Results of claim checks: one :class:`CheckResult` per (claim, strategy, granularity, source),
collected in an :class:`Audit` that renders as a table, a DataFrame or JSON.

Nothing here prints; :attr:`Audit.bug_detected` is what a command line exits on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from geomkit._deprecation import renamed
from geomkit._validation import check_choice, invalid
from geomkit.theory.claims import GRANULARITIES, STATUSES, subject

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["COLUMNS", "Audit", "CheckResult"]

COLUMNS: tuple[str, ...] = (
    "claim",
    "granularity",
    "strategy",
    "status",
    "source",
    "cases",
    "undefined",
    "violations",
    "non_finite",
    "violation_rate",
    "worst_margin",
    "where",
    "tolerance",
    "evidence",
    "gates",
    "verdict",
    "note",
)
"""Columns of :meth:`Audit.to_frame` (then ``statement``, ``strategies``, ``details``)."""

EVIDENCE: tuple[str, ...] = ("materialised", "measured", "shadow", "by construction", "none")
"""Where a result's numbers come from: a strategy run on synthetic data (``materialised``), the
applied update of a recorded run (``measured``), shadow statistics of a recorded run
(``shadow``), a value recorded by construction (``by construction``: nothing evaluated), or no
data (``none``)."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of checking one claim for one strategy at one granularity on one source.

    Attributes
    ----------
    claim, statement, status : str
        Claim id (docs/theory.md), the claim, and its status at this strategy and granularity
        (``"proven"``, ``"false"`` or ``"open"``).
    gates : bool
        Whether a violation sets :attr:`Audit.bug_detected`: True exactly for the proven
        claims the product gates on (R1, R2, R2b for the model, R6 for SAGO and
        ``sago_prefer_retain``, R9); False for a proven claim outside the gate (R7 against
        global PCGrad for the model), and for false and open claims. Default (``None``):
        ``status == "proven"``.
    strategy : str
        The strategy, or the label ``"a>=b"`` of a comparison (R4, R5, R7, R8): ``str`` of
        its :class:`~geomkit.theory.claims.Comparison`.
    strategies : tuple of str
        Every strategy involved.
    granularity : str
        ``"coordinate"``, ``"tensor"``, ``"layer"`` or ``"model"``.
    source : str
        ``"synthetic:<sampler>"`` or the run name.
    cases : int
        Cases evaluated (coordinates, or (step, group) pairs, or samples).
    undefined : int
        Cases where the checked quantity is undefined because of a true zero norm (finite
        statistics): neither pass nor fail.
    violations : int
        Evaluated cases where the claim fails beyond ``tolerance``, non-finite cases included.
    non_finite : int
        Of the violations, the cases whose statistics or checked quantity are NaN or infinite
        (a NaN update, a tampered statistic): never undefined, never a pass.
    worst_margin : float
        The most negative value of the quantity that should be ``>= 0`` (for R3: the largest
        absolute deviation from the closed form); ``-inf`` (R3: ``+inf``) when a case is
        non-finite (the most negative finite margin is then ``details["worst_finite_margin"]``);
        NaN when nothing was evaluated or the data carry counts only.
    where : str
        Where ``worst_margin`` occurred (step and tensor/layer, or sample, tensor, coordinate);
        with non-finite cases, the first of them.
    tolerance : str
        The tolerance and tie convention used.
    evidence : str
        One of ``materialised``, ``measured``, ``shadow``, ``by construction``, ``none``.
    note : str
        Anything else a reader needs (what could not be evaluated and why, weights used).
    details : mapping of str to float
        Extra measurements (R4: mean and median gap, rates split at ``|f| = |r|``;
        ``worst_finite_margin`` when a case is non-finite).
    """

    claim: str
    statement: str
    status: str
    strategy: str
    strategies: tuple[str, ...]
    granularity: str
    source: str
    cases: int
    undefined: int
    violations: int
    worst_margin: float
    where: str
    tolerance: str
    evidence: str = "materialised"
    note: str = ""
    details: Mapping[str, float] = field(default_factory=dict, hash=False, compare=True)
    non_finite: int = 0
    gates: bool | None = None

    def __post_init__(self) -> None:
        check_choice("status", self.status, STATUSES, owner="CheckResult")
        gates = self.status == "proven" if self.gates is None else self.gates
        if not isinstance(gates, bool):
            raise invalid(
                "gates", self.gates, "a bool or None", owner="CheckResult", error=TypeError
            )
        if gates and self.status != "proven":
            raise invalid(
                "gates",
                gates,
                f"False for status={self.status!r} (only a proven claim can gate)",
                owner="CheckResult",
            )
        object.__setattr__(self, "gates", gates)
        check_choice("granularity", self.granularity, GRANULARITIES, owner="CheckResult")
        check_choice("evidence", self.evidence, EVIDENCE, owner="CheckResult")
        for name in ("cases", "undefined", "violations", "non_finite"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise invalid(name, value, "an integer >= 0", owner="CheckResult")
            object.__setattr__(self, name, int(value))
        if self.violations > self.cases:
            raise ValueError(f"violations ({self.violations}) exceed cases ({self.cases})")
        if self.non_finite > self.violations:
            raise ValueError(
                f"non_finite ({self.non_finite}) exceeds violations ({self.violations}): a "
                "non-finite case is a violation"
            )
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "worst_margin", float(self.worst_margin))
        object.__setattr__(self, "details", {k: float(v) for k, v in self.details.items()})

    @property
    def violation_rate(self) -> float:
        """``violations / cases``; NaN when no case was evaluated."""
        return self.violations / self.cases if self.cases else math.nan

    @property
    def failed(self) -> bool:
        """A gating proven claim violated beyond tolerance (or non-finite): a bug in the code
        or the data."""
        return bool(self.gates) and self.violations > 0

    @property
    def verdict(self) -> str:
        """``BUG`` (a gating claim violated), ``ok`` (proven, no violation), ``violated``
        (a proven claim outside the gate violated: reported, not a bug verdict), ``holds`` /
        ``fails`` (a measured claim), or ``n/a`` (nothing evaluated)."""
        if self.failed:
            return "BUG"
        if self.cases == 0:
            return "n/a"
        if self.status == "proven":
            return "violated" if self.violations else "ok"
        return "fails" if self.violations else "holds"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (NaN kept as float NaN; :meth:`Audit.to_json` writes null)."""
        out = asdict(self)
        out["strategies"] = list(self.strategies)
        out["details"] = dict(self.details)
        out["violation_rate"] = self.violation_rate
        out["verdict"] = self.verdict
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        """Inverse of :meth:`to_dict` (derived keys are ignored; null floats become NaN)."""
        if not isinstance(data, Mapping):
            raise invalid("data", data, "a mapping", owner="CheckResult.from_dict", error=TypeError)
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"evidence", "note", "details", "non_finite", "gates"}
        if missing:
            raise ValueError(f"check result is missing {sorted(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["worst_margin"] = _float(kwargs["worst_margin"])
        kwargs["details"] = {k: _float(v) for k, v in (kwargs.get("details") or {}).items()}
        return cls(**kwargs)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _nan_to_none(value: Any) -> Any:
    # strict JSON has no NaN or infinity: NaN -> null, +-inf -> "inf" / "-inf"
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@dataclass(frozen=True)
class Audit:
    """A collection of :class:`CheckResult` (every claim at every applicable granularity).

    ``str(audit)`` is a plain-text table; :attr:`bug_detected` is True only when a gating
    proven claim (R1 for SAGO, R2 per-tensor PCGrad, R2b global PCGrad for the model, R6 for
    SAGO and ``sago_prefer_retain``, R9) is violated beyond tolerance or non-finite. Violations
    of false or open claims (R4, R5, R2b per tensor, ...) are measurements and never set it; R7
    against global PCGrad for the model is proven but outside the gate (``gates=False``,
    verdict ``violated`` if it fails).
    """

    results: tuple[CheckResult, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        results = tuple(self.results)
        for r in results:
            if not isinstance(r, CheckResult):
                raise invalid(
                    "results",
                    r,
                    f"CheckResult objects, got {type(r).__name__}",
                    owner="Audit",
                    error=TypeError,
                )
        object.__setattr__(self, "results", results)
        object.__setattr__(self, "attrs", dict(self.attrs))

    def __iter__(self) -> Iterator[CheckResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __add__(self, other: Audit) -> Audit:
        if not isinstance(other, Audit):
            return NotImplemented
        return Audit(self.results + other.results, {**self.attrs, **other.attrs})

    @property
    def bug_detected(self) -> bool:
        """Whether any gating proven claim was violated beyond tolerance (non-finite cases
        count as violations)."""
        return any(r.failed for r in self.results)

    @property
    def failed(self) -> bool:
        """Alias of :attr:`bug_detected` (what ``geomkit check`` exits non-zero on)."""
        return self.bug_detected

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The results that set :attr:`bug_detected`."""
        return tuple(r for r in self.results if r.failed)

    @renamed(granularity="by")
    def select(
        self,
        claim: str | None = None,
        by: str | None = None,
        strategy: str | tuple[str, str] | None = None,
        source: str | None = None,
    ) -> Audit:
        """The results matching every given field (``by``: the results' granularity);
        ``strategy`` is a name, a Strategy, or a comparison pair ``(first, second)`` (its label
        ``"first>=second"`` also matches)."""
        if strategy is not None and not isinstance(strategy, str):
            strategy = str(subject(strategy))
        want = {"claim": claim, "granularity": by, "strategy": strategy, "source": source}
        keep = tuple(
            r for r in self.results if all(v is None or getattr(r, k) == v for k, v in want.items())
        )
        return Audit(keep, self.attrs)

    @renamed(granularity="by")
    def get(
        self, claim: str, by: str, strategy: str | tuple[str, str] | None = None
    ) -> CheckResult:
        """The single result for ``claim`` at granularity ``by`` (and ``strategy``)."""
        found = self.select(claim, by, strategy).results
        if len(found) != 1:
            raise KeyError(
                f"{len(found)} results for claim={claim!r}, by={by!r}, "
                f"strategy={strategy!r}; pass strategy= (and select(source=...)) to pick one"
            )
        return found[0]

    # -- renderings --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"bug_detected": bool, "attrs": {...}, "results": [CheckResult.to_dict(), ...]}``."""
        return {
            "bug_detected": self.bug_detected,
            "attrs": dict(self.attrs),
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Audit:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping) or "results" not in data:
            raise ValueError("expected a mapping with a 'results' list (Audit.to_dict output)")
        return cls(tuple(CheckResult.from_dict(r) for r in data["results"]), data.get("attrs", {}))

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 1) -> str:
        """Serialise as strict JSON (NaN written as null); also write it to ``path`` if given."""
        text = json.dumps(_nan_to_none(self.to_dict()), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> Audit:
        """Read an audit written by :meth:`to_json` (a path, or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame, one row per result, columns :data:`COLUMNS` and then
        ``statement``, ``strategies``, ``details``."""
        import pandas as pd

        rows = []
        for r in self.results:
            row = r.to_dict()
            rows.append(
                {
                    **{c: row[c] for c in COLUMNS},
                    "statement": r.statement,
                    "strategies": r.strategies,
                    "details": dict(r.details),
                }
            )
        return pd.DataFrame(rows, columns=[*COLUMNS, "statement", "strategies", "details"])

    def table(self, width: int = 48) -> str:
        """A plain-text table (``where`` and ``note`` cut to ``width`` characters)."""
        head = (
            "claim",
            "granularity",
            "strategy",
            "status",
            "verdict",
            "source",
            "gate",
            "cases",
            "undef",
            "viol",
            "nonfin",
            "rate",
            "worst",
            "where",
            "evidence",
        )
        lines = []
        for r in self.results:
            where = r.where if len(r.where) <= width else r.where[: width - 1] + "~"
            lines.append(
                (
                    r.claim,
                    r.granularity,
                    r.strategy,
                    r.status,
                    r.verdict,
                    r.source,
                    "yes" if r.gates else "no",
                    str(r.cases),
                    str(r.undefined),
                    str(r.violations),
                    str(r.non_finite),
                    _fmt(r.violation_rate),
                    _fmt(r.worst_margin),
                    where,
                    r.evidence,
                )
            )
        widths = [max([len(h), *(len(row[i]) for row in lines)]) for i, h in enumerate(head)]
        numeric = {7, 8, 9, 10, 11, 12}

        def render(row: Iterable[str]) -> str:
            cells = [
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(cells).rstrip()

        out = [render(head), render("-" * w for w in widths)]
        out += [render(row) for row in lines]
        failures = self.failures
        outside = sum(1 for r in self.results if r.verdict == "violated")
        if failures:
            verdict = f"BUG: {len(failures)} gating proven claim check(s) violated"
        elif outside:
            verdict = (
                f"no gating proven claim violated; {outside} proven check(s) outside the gate "
                "violated (reported, not a bug)"
            )
        else:
            verdict = "no proven claim violated"
        out.append("")
        out.append(verdict)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()
