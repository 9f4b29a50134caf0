"""The claim table: docs/theory.md R0-R9, V1, S1 and S2, each with its statement and what
actually holds.

The SAGO paper (Xiao et al., ACL 2026, arXiv 2604.14808) states that PCGrad and SAGO both keep a
non-negative cosine with the retain gradient and that SAGO "achieves strictly tighter alignment".
docs/theory.md turns that into precise readings R1-R9 (with R2b, R3b), adds R0 (the update that
was formed is its strategy's formula rounded once, the invariant the gate needs to judge it) and
gives each a status:

``"proven"``
    Holds for every input (a short proof exists); a violation beyond tolerance is a bug.
``"false"``
    Fails for some inputs (counterexamples exist); a violation is a measurement, not a bug.
``"open"``
    No proof and no counterexample (or holds only in a restricted reading); measured.

A claim can have different statuses at different strategies and granularities (R2b holds for the
model but fails per tensor; R6 holds for SAGO but not for PCGrad): :meth:`Claim.status_at`.

Gating: a violation of a proven claim sets ``Audit.bug_detected`` only where the claim *gates*
(:meth:`Claim.gates`). The gating claims are exactly R0 (the formed update is its strategy's
formula rounded once; every strategy whose update was formed), R1, R2, R2b for the model, R3
(``pcgrad`` per tensor, ``pcgrad_global`` for the model), R3b (same scopes), R6 for ``sago``
and ``sago_prefer_retain``, and R9. R7 against global PCGrad for the model is proven
(docs/theory.md#r7 gives a proof) but is outside the gate: it is reported with status ``"proven"``
and verdict ``ok`` / ``violated``, never ``BUG``. Tolerances: docs/theory.md#tolerances and
:mod:`geomkit.theory.cases`.

S1 and S2 (open, measured on recorded runs only, never gated) carry the d-level claims over to
the step the optimizer took, ``u = theta_old - theta_new`` (the store's step fields,
docs/method.md#the-step-taken): S1 ``cos(u, r) >= 0`` for a run's applied strategy, S2 the
SAGO-vs-PCGrad ordering of ``cos(u, r)`` between a SAGO run and a PCGrad run
(:mod:`geomkit.theory.steps`).

Scope: a comparison with global PCGrad (R7, R8) is about the model-level vector the projection
was made on; a tensor or layer slice of it is outside the claim, so those comparisons are
evaluated for the model only (:meth:`Claim.evaluated_at`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from geomkit._deprecation import warn_renamed
from geomkit._validation import check_choice, invalid
from geomkit.strategies.base import Strategy

__all__ = ["CLAIMS", "GRANULARITIES", "STATUSES", "Claim", "Comparison", "get_claim", "subject"]


class Comparison(NamedTuple):
    """The subject of a comparison claim (R4, R5, R7, R8): ``first`` aligns at least as well
    with the retain gradient as ``second``.

    A tuple of two strategy names, so ``("sago", "pcgrad")`` is equal to (and hashes like)
    ``Comparison("sago", "pcgrad")``. ``str()`` gives the display label ``"sago>=pcgrad"``
    (the ``strategy`` column of an audit).
    """

    first: str
    second: str

    def __str__(self) -> str:
        return f"{self.first}>={self.second}"


Subject = str | Comparison
"""What a claim is about at one evaluation: a strategy name or a :class:`Comparison`."""


def _name(value: object) -> str:
    if isinstance(value, Strategy):
        return str(value)
    if isinstance(value, str) and value and ">=" not in value:
        return value
    raise TypeError(f"invalid strategy={value!r}: expected a strategy name or a Strategy")


def subject(value: object) -> Subject:
    """Normalise a claim subject: a strategy name or :class:`~geomkit.strategies.Strategy`
    (its label), or a pair of them, a :class:`Comparison`.

    The old comparison spelling ``"a>=b"`` still works and warns
    (:class:`~geomkit._deprecation.GeomkitDeprecationWarning`, a ``FutureWarning``).
    """
    if isinstance(value, Comparison):
        return value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(f"invalid comparison={value!r}: expected a pair (first, second)")
        return Comparison(_name(value[0]), _name(value[1]))
    if isinstance(value, str) and ">=" in value:
        first, second = value.split(">=", 1)
        warn_renamed(value, f"({first!r}, {second!r})", "comparison string", stacklevel=3)
        return subject(tuple(value.split(">=", 1)))
    return _name(value)


STATUSES: tuple[str, ...] = ("proven", "false", "open")
"""The statuses a claim can have at a (strategy, granularity)."""

GRANULARITIES: tuple[str, ...] = ("coordinate", "tensor", "layer", "model")
"""Where a claim is evaluated: one coordinate, one parameter tensor, one layer, the model."""


@dataclass(frozen=True)
class Claim:
    """One reading of the paper's alignment claim (docs/theory.md).

    Parameters
    ----------
    id : str
        Claim id in docs/theory.md (``"R0"`` ... ``"R9"``, ``"R2b"``, ``"R3b"``, ``"V1"``, ``"S1"``,
        ``"S2"``).
    statement : str
        The claim, as a formula.
    status : str
        Status of the claim as stated, for all inputs (one of :data:`STATUSES`).
    strategies : tuple of str or Comparison
        The strategies (names) or :class:`Comparison` pairs the claim is about.
    granularities : tuple of str
        Granularities at which geomkit evaluates it.
    holds : str
        What actually holds (docs/theory.md, abridged).
    overrides : mapping
        ``(subject, granularity) -> status`` where it differs from ``status``; ``"*"``
        matches every granularity. A subject is a strategy name or a :class:`Comparison`.
    ungated : frozenset of (subject, str)
        ``(subject, granularity)`` pairs where the claim is proven but does not gate
        ``bug_detected`` (``"*"`` matches every granularity).
    scopes : mapping
        ``subject -> granularities`` where a strategy (or comparison) is evaluated at fewer
        granularities than ``granularities``.

    The methods take a subject as a name, a :class:`~geomkit.strategies.Strategy`, or a pair
    ``(first, second)`` for a comparison.
    """

    id: str
    statement: str
    status: str
    strategies: tuple[Subject, ...]
    granularities: tuple[str, ...]
    holds: str
    overrides: Mapping[tuple[Subject, str], str] = field(default_factory=dict, hash=False)
    ungated: frozenset[tuple[Subject, str]] = frozenset()
    scopes: Mapping[Subject, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        statuses = [self.status, *self.overrides.values()]
        for status in statuses:
            check_choice("status", status, STATUSES, owner="Claim")
        for granularity in self.granularities:
            check_choice("granularity", granularity, GRANULARITIES, owner="Claim")
        for strategy, granularities in self.scopes.items():
            extra = set(granularities) - set(self.granularities)
            if extra:
                raise ValueError(
                    f"scope of {strategy!r} names granularities {sorted(extra)} outside "
                    f"{self.granularities}"
                )
        object.__setattr__(self, "strategies", tuple(subject(s) for s in self.strategies))
        object.__setattr__(
            self,
            "overrides",
            MappingProxyType({(subject(k), g): v for (k, g), v in self.overrides.items()}),
        )
        object.__setattr__(self, "ungated", frozenset((subject(k), g) for k, g in self.ungated))
        object.__setattr__(
            self,
            "scopes",
            MappingProxyType({subject(k): tuple(v) for k, v in self.scopes.items()}),
        )

    def status_at(self, strategy: object, granularity: str) -> str:
        """The status of this claim for ``strategy`` (a name, Strategy or comparison pair)
        evaluated at ``granularity``."""
        check_choice("granularity", granularity, GRANULARITIES)
        strategy = subject(strategy)
        for key in ((strategy, granularity), (strategy, "*")):
            if key in self.overrides:
                return self.overrides[key]
        return self.status

    def gates(self, strategy: object, granularity: str) -> bool:
        """Whether a violation for ``strategy`` at ``granularity`` sets ``bug_detected``: the
        claim is proven there and not listed in ``ungated``."""
        strategy = subject(strategy)
        if self.status_at(strategy, granularity) != "proven":
            return False
        return (strategy, granularity) not in self.ungated and (strategy, "*") not in self.ungated

    def evaluated_at(self, strategy: object, granularity: str) -> bool:
        """Whether ``strategy`` (or a comparison pair) is evaluated at ``granularity`` (R7 and
        R8 against global PCGrad: the model only)."""
        return granularity in self.scopes.get(subject(strategy), self.granularities)


_ALL_STRATEGIES = ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur")

_TABLE = (
    Claim(
        "R0",
        "the update that was formed is its strategy's float64 linear form a f + b r rounded "
        "once to the gradient dtype, at every coordinate (n_unrounded = 0)",
        "proven",
        _ALL_STRATEGIES,
        ("tensor",),
        "holds by construction of geomkit.kernels (combine_linear: float64, one rounding; "
        "combine_select: float32 for 16-bit inputs, then one rounding); counted per tensor for "
        "the applied update, or the materialised updates at verified records of a closed-form "
        "store; shadows form no update",
    ),
    Claim(
        "R1",
        "SAGO: d_i r_i >= 0 for every coordinate i, hence <d, r> >= 0 at every grouping "
        "(any alpha, gamma >= 0)",
        "proven",
        ("sago",),
        ("coordinate", "tensor", "layer", "model"),
        "holds: <d,r> = alpha sum_C r_i^2 + gamma sum_A f_i r_i, every term >= 0; can be 0; "
        "cos(d, r) undefined when d = 0 (e.g. f = 0)",
    ),
    Claim(
        "R2",
        "per-tensor PCGrad: <d_j, r_j> >= 0 for every tensor j, hence for every grouping",
        "proven",
        ("pcgrad",),
        ("tensor", "layer", "model"),
        "holds up to the 1e-10 in the projection denominator: a residual "
        "gamma |<f,r>| 1e-10 / (|r|^2 + 1e-10) per projected tensor",
    ),
    Claim(
        "R2b",
        "global PCGrad: <d, r> >= 0 for the model (and, as sometimes read, per tensor)",
        "false",
        ("pcgrad_global",),
        ("tensor", "layer", "model"),
        "holds for the model (up to the 1e-10 residual); fails per tensor (a negative tensor in "
        "about half of random draws)",
        {("pcgrad_global", "model"): "proven"},
    ),
    Claim(
        "R3",
        "PCGrad closed form: when the projection fires, cos(d, r) = alpha |r| / "
        "sqrt(alpha^2 |r|^2 + gamma^2 |f~|^2), f~ the projected forget gradient",
        "open",
        ("pcgrad", "pcgrad_global"),
        ("tensor", "model"),
        "proven in the projected branch for the vector the projection was made on (one "
        "tensor for pcgrad, the model for pcgrad_global), and gated there; elsewhere not a claim",
        {("pcgrad", "tensor"): "proven", ("pcgrad_global", "model"): "proven"},
        scopes={"pcgrad": ("tensor",), "pcgrad_global": ("model",)},
    ),
    Claim(
        "R3b",
        "PCGrad is one-sided: the projection fires exactly when <f, r> < 0 on the vector it is "
        "made on (per tensor for pcgrad, the model for pcgrad_global)",
        "proven",
        ("pcgrad", "pcgrad_global"),
        ("tensor", "model"),
        "holds by construction (PCGrad.coefficient); checked from n_projected against the "
        "recorded <f, r>",
        scopes={"pcgrad": ("tensor",), "pcgrad_global": ("model",)},
    ),
    Claim(
        "R4",
        "cos(d_SAGO, r) >= cos(d_PCGrad, r) for all inputs (alpha = gamma = 1)",
        "false",
        (Comparison("sago", "pcgrad"), Comparison("sago", "pcgrad_global")),
        ("tensor", "layer", "model"),
        "false: r=(1,0.01), f=(0.01,1) gives 0.020 vs 0.714; holds in ~38% of random draws; "
        "tends to hold when |f| >~ |r| (a property of the data, not a theorem)",
    ),
    Claim(
        "R5",
        "<d_SAGO, r> >= <d_PCGrad, r> (numerator comparison)",
        "false",
        (Comparison("sago", "pcgrad"), Comparison("sago", "pcgrad_global")),
        ("tensor", "layer", "model"),
        "false in general",
    ),
    Claim(
        "R6",
        "coordinate-wise sign agreement: no coordinate of d opposes r (d_i r_i >= 0)",
        "false",
        ("sago", "sago_prefer_retain", "pcgrad", "pcgrad_global"),
        ("coordinate",),
        "true for SAGO and sago_prefer_retain (the reading of 'strictly tighter' that holds for "
        "every input); false for PCGrad (almost always an opposing coordinate)",
        {("sago", "*"): "proven", ("sago_prefer_retain", "*"): "proven"},
    ),
    Claim(
        "R7",
        "sago_prefer_retain: cos(d, r) >= cos(d_PCGrad, r) (alpha = gamma = 1)",
        "open",
        (
            Comparison("sago_prefer_retain", "pcgrad"),
            Comparison("sago_prefer_retain", "pcgrad_global"),
        ),
        ("tensor", "layer", "model"),
        "proven against global PCGrad for the model (docs/theory.md#r7; evaluated for the "
        "model only, reported but outside the bug gate); open against per-tensor PCGrad (no "
        "counterexample, also at alpha, gamma in {0.1, 1}), measured at every granularity",
        {(Comparison("sago_prefer_retain", "pcgrad_global"), "model"): "proven"},
        frozenset({(Comparison("sago_prefer_retain", "pcgrad_global"), "*")}),
        {Comparison("sago_prefer_retain", "pcgrad_global"): ("model",)},
    ),
    Claim(
        "R8",
        "cos(d_PCGrad per tensor, r) >= cos(d_PCGrad global, r)",
        "open",
        (Comparison("pcgrad", "pcgrad_global"),),
        ("model",),
        "no counterexample beyond float noise; unproven. About the model-level vectors: a tensor "
        "or layer slice of the globally projected update is outside the claim",
    ),
    Claim(
        "R9",
        "SAGO: the two surviving parts alpha r 1_C and gamma f 1_A are orthogonal (disjoint "
        "supports): d_i is alpha r_i or gamma f_i at every coordinate",
        "proven",
        ("sago",),
        ("coordinate", "tensor", "layer", "model"),
        "holds; from additive statistics only its consequence "
        "<d, gamma f + alpha r> - <d, d> = alpha gamma <f, r> can be checked",
    ),
    Claim(
        "V1",
        "shadow closed form = the strategy's own update: at verified records, <d,d>, <d,f>, "
        "<d,r>, n_opposed and n_projected of each closed form (every shadow's, and the applied "
        "strategy's where it is recorded by closed form) equal those of its update "
        "materialised with the strategy's own code",
        "proven",
        ("sum", "pcgrad", "pcgrad_global", "sago", "sago_prefer_retain", "blur"),
        ("tensor",),
        "holds for correct code up to rounding: the materialised update is rounded once to the "
        "gradient dtype, the closed form is float64 (docs/theory.md#v1); counts match exactly "
        "except at coordinates where rounding can flip a sign (stored, verified_n_ambiguous)",
    ),
    Claim(
        "S1",
        "the step the optimizer took keeps a non-negative cosine with the retain gradient: "
        "cos(u, r) >= 0, u = theta_old - theta_new of the run's applied strategy",
        "open",
        _ALL_STRATEGIES,
        ("tensor", "layer", "model"),
        "measured on recorded runs (step fields uu, ur, rr), never gated: the d-level "
        "statement is proven for SAGO (R1), per-tensor PCGrad (R2), global PCGrad for the model "
        "(R2b), but clipping is harmless only globally, and AdamW's per-coordinate "
        "normalisation, momentum and weight decay can turn u away from r; with SGD, no "
        "clipping and no weight decay u = lr d and S1 is the d-level claim",
    ),
    Claim(
        "S2",
        "the SAGO-vs-PCGrad ordering survives the optimizer: cos(u_SAGO, r) >= cos(u_PCGrad, r), "
        "a run with SAGO applied against a run with PCGrad applied (same objective, seed and "
        "weights) at the same record step",
        "open",
        (Comparison("sago", "pcgrad"), Comparison("sago", "pcgrad_global")),
        ("tensor", "layer", "model"),
        "measured, never gated; the two runs share the gradients only at the first step, "
        "afterwards each follows its own trajectory, so the gap mixes the rule with the "
        "trajectory; the d-level ordering (R4, false) at the same records is reported beside it",
    ),
)

CLAIMS: Mapping[str, Claim] = MappingProxyType({c.id: c for c in _TABLE})
"""Every claim of docs/theory.md by id, in order R0, R1, R2, R2b, R3, R3b, R4, ..., R9, V1, S1,
S2."""


def get_claim(claim_id: str) -> Claim:
    """Return the claim with id ``claim_id`` (e.g. ``"R4"``); ValueError if unknown."""
    if not isinstance(claim_id, str):
        raise invalid("claim_id", claim_id, "a str", error=TypeError)
    check_choice("claim_id", claim_id, list(CLAIMS))
    return CLAIMS[claim_id]
