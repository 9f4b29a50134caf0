"""Executable checks of the SAGO paper's alignment claims (docs/theory.md, R1-R9, S1, S2).

Xiao et al., "SAGO", ACL 2026 (arXiv 2604.14808) state that PCGrad and SAGO both keep a
non-negative cosine with the retain gradient and that SAGO aligns "strictly tighter".
docs/theory.md splits that into claims R1-R9 with a status each (proven / false / open). This
package checks every claim, at coordinate, tensor, layer and model granularity, on synthetic
gradient pairs and on recorded runs, and reports margins, tolerances and undefined cases; it never
assumes the paper is right.

>>> from geomkit import theory
>>> report = theory.audit_synthetic(n=4)                  # samplers x strategies x claims
>>> report.bug_detected                                    # a proven claim violated?
False
>>> import tempfile, torch, geomkit
>>> tmp = tempfile.TemporaryDirectory()                    # a tiny recorded run, SAGO applied
>>> rec = geomkit.Recorder(f"{tmp.name}/geometry.zarr", ["layers.0.w", "layers.1.w"], [8, 8],
...                        "sago")
>>> for step in range(3):
...     rec.record(step, torch.randn(2, 8).unbind(), torch.randn(2, 8).unbind())
>>> rec.close()
>>> ds = geomkit.open_run(tmp.name)
>>> theory.audit(ds).bug_detected                          # every claim on the recorded steps
False
>>> theory.r4_breakdown(ds).rate_by_ratio.dims             # R4 violations by |f| / |r|
('against', 'ratio_bin')
>>> parts = theory.r4_decomposition(ds)                     # model gap = per-tensor + pooling
>>> bool(abs(parts.gap - parts.per_part_term - parts.pooling_term).max() < 1e-12)
True
>>> tmp.cleanup()

Modules: :mod:`~geomkit.theory.claims` (the claim table), :mod:`~geomkit.theory.samplers`
(synthetic pairs, the R4 counterexamples), :mod:`~geomkit.theory.checks` and
:mod:`~geomkit.theory.coordinates` (one check per claim), :mod:`~geomkit.theory.synthetic` and
:mod:`~geomkit.theory.recorded` (audits), :mod:`~geomkit.theory.breakdown` (R4 measured and
decomposed), :mod:`~geomkit.theory.steps` (S1, S2: the step the optimizer took, open and never
gated), :mod:`~geomkit.theory.report` (result types).
"""

from geomkit.theory.breakdown import (
    DEFAULT_BINS,
    ComparisonCases,
    comparison_cases,
    r4_breakdown,
    r4_decomposition,
)
from geomkit.theory.cases import Cases, build_cases, rtol
from geomkit.theory.claims import CLAIMS, GRANULARITIES, STATUSES, Claim, Comparison, get_claim
from geomkit.theory.recorded import audit
from geomkit.theory.report import Audit, CheckResult
from geomkit.theory.samplers import (
    Counterexample,
    Counterexamples,
    Fixed,
    Gaussian,
    HeavyTailed,
    Pair,
    Sampler,
    Sparse,
    Zeros,
    counterexamples,
    default_samplers,
)
from geomkit.theory.synthetic import audit_synthetic

__all__ = [
    "CLAIMS",
    "DEFAULT_BINS",
    "GRANULARITIES",
    "STATUSES",
    "Audit",
    "Cases",
    "CheckResult",
    "Claim",
    "Comparison",
    "ComparisonCases",
    "Counterexample",
    "Counterexamples",
    "Fixed",
    "Gaussian",
    "HeavyTailed",
    "Pair",
    "Sampler",
    "Sparse",
    "Zeros",
    "audit",
    "audit_synthetic",
    "build_cases",
    "comparison_cases",
    "counterexamples",
    "default_samplers",
    "get_claim",
    "r4_breakdown",
    "r4_decomposition",
    "rtol",
]
