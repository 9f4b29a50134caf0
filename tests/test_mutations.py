"""The mutation table: deliberate bugs, each caught by ``geomkit check`` or ``audit_synthetic``.

Every row of :data:`MUTATIONS` plants one bug with ``pytest.MonkeyPatch`` on the real code path
(a rule, a kernel, the shared sign test, the strategy's weights) - in what the strategy
computes, in the shadow closed form, or in both, as a real bug would - and then either records
a short run with :class:`geomkit.Recorder` (random tensors, the applied strategy and every
shadow recorded by closed forms as the engine records them, every update formed and verified
at two of the four records) and runs ``geomkit check`` on it, or runs
:func:`geomkit.theory.audit_synthetic`. The test asserts the exit status 1 /
``bug_detected`` and that the claims named in the row are among the failing checks. The table
is the one home of the README's "which check catches which mutation" table
(:func:`markdown_table`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import geomkit
from geomkit import kernels, theory
from geomkit.cli import main
from geomkit.strategies import EPSILON, PCGrad, SAGOPreferRetain, Strategy, Sum

# ----------------------------------------------------------------------------------------------
# Recorded runs
# ----------------------------------------------------------------------------------------------

NAMES = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
)
SHAPES = ((16, 16), (32, 16), (16, 32))
RHO = (-0.3, -0.3, 0.3, 0.3)
"""Correlation of f with r per step: the verified steps 0 and 2 (``verify_every=2``) have
<f, r> < 0 and > 0, so both branches of the projection test are materialised."""


@dataclass(frozen=True)
class Setting:
    """How a mutation's run is recorded."""

    applied: str = "sago"
    dtype: torch.dtype = torch.float32
    alpha: float = 1.0
    gamma: float = 1.0
    scale: float = 1.0  # coordinate scale of f and r

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        weights = (
            "" if (self.alpha, self.gamma) == (1.0, 1.0) else f", a={self.alpha:g} g={self.gamma:g}"
        )
        scale = "" if self.scale == 1.0 else f", |x|~{self.scale:g}"
        return f"{self.applied} applied, {dtype}{weights}{scale}"


def record(path: Path, setting: Setting, seed: int = 0) -> Path:
    """A four-step run of ``setting`` under whatever is patched, shadows verified at steps 0
    and 2; returns the run directory."""
    g = torch.Generator().manual_seed(seed)
    rec = geomkit.Recorder(
        path / "geometry.zarr",
        NAMES,
        [math.prod(s) for s in SHAPES],
        setting.applied,
        alpha=setting.alpha,
        gamma=setting.gamma,
        verify_every=2,
        attrs={"dtype": str(setting.dtype).replace("torch.", "")},
    )
    for step, rho in enumerate(RHO):
        z = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        w = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
        f = [(x * setting.scale).to(setting.dtype) for x in z]
        r = [
            ((rho * x + math.sqrt(1 - rho**2) * y) * setting.scale).to(setting.dtype)
            for x, y in zip(z, w, strict=True)
        ]
        rec.record(step, f, r, forget_loss=1.0, retain_loss=1.0)
    rec.close()
    return path


def check_run(run: Path, report: Path) -> tuple[int, set[str]]:
    """``geomkit check RUN``: (exit status, ids of the claims with verdict BUG)."""
    status = main(["check", str(run), "--json", str(report)])
    results = json.loads(report.read_text())["results"]
    return status, {r["claim"] for r in results if r["verdict"] == "BUG"}


# ----------------------------------------------------------------------------------------------
# The mutations (each a function of the MonkeyPatch)
# ----------------------------------------------------------------------------------------------

_ORIGINAL_COEFFICIENT = PCGrad.coefficient
_ORIGINAL_LINEAR = kernels.combine_linear
_ORIGINAL_SELECT = kernels.combine_select
_ORIGINAL_FORM = Strategy.linear_form


def coefficient_x10(mp: pytest.MonkeyPatch) -> None:
    """PCGrad's projection coefficient 10x too large, in the rule (strategy and closed form)."""

    def coefficient(dots):
        c, fired = _ORIGINAL_COEFFICIENT(dots)
        return 10 * c, fired

    mp.setattr(PCGrad, "coefficient", staticmethod(coefficient))


def coefficient_x10_kernel(mp: pytest.MonkeyPatch) -> None:
    """The projection coefficient 10x too large in the update kernel (the strategy only)."""

    def combine_linear(f, r, out, *, c, **kwargs):
        return _ORIGINAL_LINEAR(f, r, out, c=10 * c, **kwargs)

    mp.setattr(kernels, "combine_linear", combine_linear)


def project_always(mp: pytest.MonkeyPatch) -> None:
    """PCGrad projects also when <f, r> >= 0, in the rule (strategy and closed form)."""

    def coefficient(dots):
        fired = torch.ones_like(dots[..., 2], dtype=torch.bool)
        return dots[..., 2] / (dots[..., 1] + EPSILON), fired

    mp.setattr(PCGrad, "coefficient", staticmethod(coefficient))


def project_always_apply(mp: pytest.MonkeyPatch) -> None:
    """PCGrad's update projects also when <f, r> >= 0 (the strategy only)."""

    def apply(self, f, r, out, dots, alpha, gamma):
        c = dots[..., 2] / (dots[..., 1] + EPSILON)
        yes = torch.ones((), dtype=torch.bool, device=f.device)
        no = torch.zeros((), dtype=torch.bool, device=f.device)
        zero = torch.zeros((), dtype=torch.float64, device=f.device)
        return kernels.combine_linear(
            f, r, out, alpha=alpha, gamma=gamma, c=c, fire_c=yes, k=zero, fire_k=no
        )

    mp.setattr(PCGrad, "apply", apply)


def pcgrad_is_sum(mp: pytest.MonkeyPatch) -> None:
    """PCGrad's update is the plain sum (the strategy only)."""
    mp.setattr(PCGrad, "apply", Sum.apply)


def pcgrad_form_is_sum(mp: pytest.MonkeyPatch) -> None:
    """PCGrad's closed form is the plain sum's (the shadow statistics only)."""
    mp.setattr(PCGrad, "linear_form", Sum.linear_form)


def prefer_retain_is_sum(mp: pytest.MonkeyPatch) -> None:
    """sago_prefer_retain's update is the plain sum (the strategy only)."""
    mp.setattr(SAGOPreferRetain, "apply", Sum.apply)


def prefer_retain_form_is_sum(mp: pytest.MonkeyPatch) -> None:
    """sago_prefer_retain's closed form is the sum's (its stored statistics the sum's)."""
    mp.setattr(SAGOPreferRetain, "linear_form", Sum.linear_form)


def _select(conflict: Callable) -> Callable:
    """kernels._k_combine_select with another conflict test."""

    def kernel(f, r, alpha, gamma, prefer_retain, out):
        dtype = kernels._compute_dtype(f.dtype)
        c = conflict(f, r)
        fw, rw = f.to(dtype), r.to(dtype)
        ar = alpha.to(dtype) * rw
        agree = gamma.to(dtype) * fw
        if prefer_retain:
            agree = agree + ar
        out.copy_(torch.where(c, ar, agree))

    return kernel


def sago_flipped(mp: pytest.MonkeyPatch) -> None:
    """SAGO's conflict test flipped (agreeing coordinates take alpha r), in its kernel."""
    mp.setattr(kernels, "_k_combine_select", _select(lambda f, r: (f * r) > 0))


def sago_float32_product(mp: pytest.MonkeyPatch) -> None:
    """SAGO's conflict test as ``(f*r) < 0`` in float32 in its kernel: the product of two tiny
    values underflows to 0 and a conflicting coordinate is taken for agreeing."""
    mp.setattr(kernels, "_k_combine_select", _select(lambda f, r: (f.float() * r.float()) < 0))


def shared_float32_product(mp: pytest.MonkeyPatch) -> None:
    """The shared sign test (kernels._conflict: SAGO's update, the Gramian, every count) as
    ``(f*r) < 0`` in float32: strategy, closed form and recorded counts wrong together."""

    def conflict(f, r, f64, r64):
        return (f.float() * r.float()) < 0

    mp.setattr(kernels, "_conflict", conflict)


def weights_swapped(mp: pytest.MonkeyPatch) -> None:
    """alpha and gamma swapped in the update kernels (the strategy only)."""

    def linear(f, r, out, *, alpha, gamma, **kwargs):
        return _ORIGINAL_LINEAR(f, r, out, alpha=gamma, gamma=alpha, **kwargs)

    def select(f, r, out, *, alpha, gamma, prefer_retain):
        return _ORIGINAL_SELECT(f, r, out, alpha=gamma, gamma=alpha, prefer_retain=prefer_retain)

    mp.setattr(kernels, "combine_linear", linear)
    mp.setattr(kernels, "combine_select", select)


def weights_swapped_form(mp: pytest.MonkeyPatch) -> None:
    """alpha and gamma swapped in the strategies' closed forms (the shadow statistics only)."""

    def linear_form(self, dots):
        return self.rule.linear_form(dots, self.gamma, self.alpha)

    mp.setattr(Strategy, "linear_form", linear_form)


@dataclass(frozen=True)
class Mutation:
    """One planted bug and the check that must catch it.

    ``changes`` says what the bug alters (the strategy's update, the shadow closed form, or
    both); ``caught_by`` the claim ids that must report BUG, ``granularity`` where, ``check``
    ``"recorded"`` (``geomkit check`` on a run recorded under the bug) or ``"synthetic"``
    (``audit_synthetic``); ``xfail`` a reason when the catch is not in this branch yet.
    """

    id: str
    bug: str
    patch: Callable[[pytest.MonkeyPatch], None]
    changes: str
    caught_by: tuple[str, ...]
    granularity: str
    check: str = "recorded"
    setting: Setting = Setting()
    xfail: str = ""


_F32 = Setting("pcgrad", torch.float32)
_TINY = Setting("sago", torch.bfloat16, scale=1e-23)  # products of two coordinates < 2^-149
_WEIGHTS = Setting("sago", torch.float32, alpha=0.5, gamma=2.0)

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "coef_x10",
        "projection coefficient x10 (rule)",
        coefficient_x10,
        "both",
        ("R3",),
        "tensor (pcgrad), model (pcgrad_global)",
        setting=_F32,
    ),
    Mutation(
        "coef_x10_kernel",
        "projection coefficient x10 (update kernel)",
        coefficient_x10_kernel,
        "strategy",
        ("R0", "V1"),  # the updates formed at the verified records (closed-form store)
        "tensor",
        setting=_F32,
    ),
    Mutation(
        "project_always",
        "projection also when <f,r> >= 0 (rule)",
        project_always,
        "both",
        ("R3b",),
        "tensor (pcgrad), model (pcgrad_global)",
        setting=_F32,
    ),
    Mutation(
        "project_always_apply",
        "projection also when <f,r> >= 0 (update)",
        project_always_apply,
        "strategy",
        ("R0", "V1"),
        "tensor",
        setting=_F32,
    ),
    Mutation(
        "pcgrad_is_sum", "PCGrad == sum (update)", pcgrad_is_sum, "strategy", ("V1",), "tensor"
    ),
    Mutation(
        "pcgrad_form_is_sum",
        "PCGrad == sum (closed form)",
        pcgrad_form_is_sum,
        "closed form",
        ("R3", "V1"),
        "tensor, model",
    ),
    Mutation(
        "prefer_retain_is_sum",
        "prefer-retain == sum (update)",
        prefer_retain_is_sum,
        "strategy",
        ("R6", "V1"),
        "coordinate (materialised shadow); tensor",
    ),
    Mutation(
        "prefer_retain_form_is_sum",
        "prefer-retain == sum (closed form)",
        prefer_retain_form_is_sum,
        "closed form",
        ("V1",),
        "tensor",
    ),
    Mutation(
        "sago_flipped",
        "SAGO conflict test flipped",
        sago_flipped,
        "strategy",
        ("R0", "R1", "R6", "V1"),
        "coordinate to model",
    ),
    Mutation(
        "sago_f32_underflow",
        "SAGO conflict test (f*r) < 0 in float32 (underflows)",
        sago_float32_product,
        "strategy",
        ("R0", "R1", "R6", "V1"),
        "coordinate to model",
        setting=_TINY,
    ),
    Mutation(
        "shared_f32_underflow",
        "(f*r) < 0 in float32 in the shared sign test (update, Gramian, counts)",
        shared_float32_product,
        "both",
        ("R1", "V1"),
        "tensor to model; tensor",
        setting=_TINY,
    ),
    Mutation(
        "shared_f32_underflow_synthetic",
        "(f*r) < 0 in float32 in the shared sign test (update, Gramian, counts)",
        shared_float32_product,
        "both",
        ("R0", "R1", "R6"),
        "coordinate, tensor, model",
        check="synthetic",
        setting=_TINY,
    ),
    Mutation(
        "weights_swapped",
        "alpha and gamma swapped (update kernels)",
        weights_swapped,
        "strategy",
        ("R0", "V1"),  # the updates formed at the verified records (closed-form store)
        "tensor",
        setting=_WEIGHTS,
    ),
    Mutation(
        "weights_swapped_form",
        "alpha and gamma swapped (closed forms)",
        weights_swapped_form,
        "closed form",
        ("R0", "R3", "V1"),
        "tensor, model",
        setting=_WEIGHTS,
    ),
)
"""The mutation table (README: which check catches which mutation)."""


def markdown_table() -> str:
    """The README table: mutation -> the check that catches it."""
    lines = [
        "| mutation | changes | caught by (claim) | granularity | check | data |",
        "|---|---|---|---|---|---|",
    ]
    for m in MUTATIONS:
        check = "`geomkit check` (recorded)" if m.check == "recorded" else "`audit_synthetic`"
        lines.append(
            f"| {m.bug} | {m.changes} | {', '.join(m.caught_by)} | {m.granularity} | {check} "
            f"| {m.setting} |"
        )
    return "\n".join(lines)


def _params() -> list:
    return [
        pytest.param(m, id=m.id, marks=pytest.mark.xfail(strict=True, reason=m.xfail))
        if m.xfail
        else pytest.param(m, id=m.id)
        for m in MUTATIONS
    ]


def _tiny_pairs(dtype: torch.dtype, scale: float, n: int = 4) -> theory.Fixed:
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(n):
        f = [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in SHAPES]
        r = [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in SHAPES]
        pairs.append(theory.Pair(f, r))
    return theory.Fixed(pairs=tuple(pairs), label="tiny")


@pytest.mark.parametrize("mutation", _params())
def test_mutation_is_caught(mutation: Mutation, tmp_path: Path, monkeypatch) -> None:
    mutation.patch(monkeypatch)
    s = mutation.setting
    if mutation.check == "synthetic":
        audit = theory.audit_synthetic(_tiny_pairs(s.dtype, s.scale), alpha=s.alpha, gamma=s.gamma)
        failing = {r.claim for r in audit.failures}
        assert audit.bug_detected
    else:
        status, failing = check_run(record(tmp_path / "run", s), tmp_path / "audit.json")
        assert status == 1
    assert set(mutation.caught_by) <= failing, (mutation.id, sorted(failing))


@pytest.mark.parametrize(
    "setting", sorted({m.setting for m in MUTATIONS if m.check == "recorded"}, key=str), ids=str
)
def test_honest_runs_of_every_setting_pass(setting: Setting, tmp_path: Path) -> None:
    # the control: the same recordings without a bug pass, with every shadow verified
    status, failing = check_run(record(tmp_path / "run", setting), tmp_path / "audit.json")
    assert (status, failing) == (0, set())
    audit = theory.audit(tmp_path / "run", claims=["V1"])
    assert all(r.cases > 0 and r.evidence == "materialised" for r in audit)


def test_honest_tiny_pairs_pass_the_synthetic_audit() -> None:
    assert not theory.audit_synthetic(_tiny_pairs(torch.bfloat16, 1e-23)).bug_detected


def test_the_table_names_every_mutation_once() -> None:
    table = markdown_table()
    assert len({m.id for m in MUTATIONS}) == len(MUTATIONS) == len(table.splitlines()) - 2
    for m in MUTATIONS:
        assert f"| {m.bug} | {m.changes} | {', '.join(m.caught_by)} |" in table
