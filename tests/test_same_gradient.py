"""The same-gradient view (issue 10, B5-B7, C11, C12, C14): the geometry table in two views, the
R4 decomposition of the model-level gap, and figures whose violation counts are the audit's, per
objective, readable at a two-column paper's print size."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.text import Text

import geomkit
import geomkit.plot as gp
from geomkit import theory
from geomkit._deprecation import GeomkitDeprecationWarning
from geomkit.plot.theorem import PRINT_WIDTH
from geomkit.recorder import Recorder

STRATEGIES = ("sum", "pcgrad", "sago")
OBJECTIVES = {"graddiff": 0.5, "simnpo": 20.0}  # typical |f| / |r| scales
STEPS = 6
SHAPES = [(12, 4), (16,), (6, 6), (10,), (8, 3)]
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.mlp.up_proj.weight",
]
EPS = np.finfo(np.float64).eps


def _record(path: Path, objective: str, strategy: str, seed: int, zero_retain_at=None) -> None:
    gen = torch.Generator().manual_seed(seed * 97 + sum(map(ord, objective + strategy)))
    with Recorder(
        path,
        NAMES,
        [math.prod(s) for s in SHAPES],
        strategy,
        attrs={"objective": objective, "run": path.parent.name, "seed": seed},
    ) as rec:
        for step in range(STEPS):
            retain = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
            scales = OBJECTIVES[objective] * torch.exp(torch.randn(len(SHAPES), generator=gen))
            forget = [
                float(k) * (-0.4 * r + torch.randn(s, generator=gen, dtype=torch.float64))
                for k, r, s in zip(scales, retain, SHAPES, strict=True)
            ]
            if step == zero_retain_at:
                retain = [torch.zeros_like(r) for r in retain]  # every cos(., r) undefined
            rec.record(step, forget, retain, forget_loss=1.0, retain_loss=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two objectives x three applied strategies, seed 0 (plus a second seed of graddiff)."""
    root = tmp_path_factory.mktemp("same_gradient")
    for objective in OBJECTIVES:
        for strategy in STRATEGIES:
            name = f"{objective}-{strategy}-seed0"
            _record(root / name / "geometry.zarr", objective, strategy, 0)
    _record(root / "graddiff-sago-seed1" / "geometry.zarr", "graddiff", "sago", 1)
    return root


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    plt.close("all")


def _model_metrics(run) -> tuple:
    m = run.ds.geom.metrics(by="model")
    return m, np.asarray(m["norm_ratio"].values)


# ---------------------------------------------------------------------------------------------
# B5, C14: the geometry table in two views
# ---------------------------------------------------------------------------------------------


def test_same_gradient_table_is_the_shadow_metrics(runs) -> None:
    loaded = geomkit.runs.load(runs)
    table = gp.geometry_table(runs)  # the default view
    assert set(table["view"]) == {"same gradients"}
    for objective in OBJECTIVES:
        members = [r for r in loaded if r.objective == objective]
        part = table[table["objective"] == objective].set_index("strategy")
        recorded = [str(s) for s in members[0].ds["strategy"].values]
        assert sorted(part.index) == sorted(recorded)  # every strategy, applied or shadow
        ratios = np.concatenate([_model_metrics(r)[1] for r in members])
        for name in recorded:
            per_run = [
                float(r.ds.geom.metrics()["cos_dr"].sel(strategy=name).mean()) for r in members
            ]
            row = part.loc[name]
            assert row["cos_dr"] == pytest.approx(np.mean(per_run), rel=1e-12, abs=1e-15)
            assert row["cos_dr_sd"] == pytest.approx(np.std(per_run, ddof=1), rel=1e-9)
            assert row["runs"] == len(members) and row["steps"] == len(members) * STEPS
            assert row["median_ratio"] == pytest.approx(np.median(ratios), rel=1e-12)
        # same gradients: one cos(f, r) and one |f|/|r| for every row of the objective
        assert part["cos_fr"].nunique() == 1 and part["median_ratio"].nunique() == 1


def test_own_trajectory_table_and_its_median_ratio(runs) -> None:
    loaded = geomkit.runs.load(runs)
    own = gp.geometry_table(runs, view="own").set_index(["objective", "strategy"])
    assert own["applied"].all() and len(own) == len(OBJECTIVES) * len(STRATEGIES)
    for run in loaded:
        if run.seed != 0 or run.objective != "simnpo":
            continue
        metrics, ratio = _model_metrics(run)
        row = own.loc[(run.objective, run.strategy)]
        assert row["cos_dr"] == pytest.approx(
            float(metrics["cos_dr"].sel(strategy=run.strategy).mean()), rel=1e-12
        )
        assert row["median_ratio"] == pytest.approx(np.median(ratio), rel=1e-12)


def test_steps_count_defined_values_only(tmp_path) -> None:
    path = tmp_path / "graddiff-pcgrad-seed0" / "geometry.zarr"
    _record(path, "graddiff", "pcgrad", 0, zero_retain_at=2)
    run = geomkit.open_run(path.parent)
    table = gp.geometry_table(run).set_index("strategy")
    assert (table["steps"] == STEPS - 1).all()
    cos = run.geom.metrics()["cos_dr"].sel(strategy="sago").values
    assert np.isnan(cos[2]) and table.loc["sago", "cos_dr"] == pytest.approx(np.nanmean(cos))
    markdown = gp.geometry_table_markdown(table.reset_index())
    assert f"| SAGO | 1 | {STEPS - 1} |" in markdown and "median \\|f\\|/\\|r\\|" in markdown
    assert "\nSame gradients:" in markdown


def test_shadows_flag_is_deprecated_and_kept(runs) -> None:
    with pytest.warns(GeomkitDeprecationWarning, match="shadows="):
        old = gp.geometry_table(runs, shadows=False)
    pd.testing.assert_frame_equal(old, gp.geometry_table(runs, view="own"))
    with pytest.warns(GeomkitDeprecationWarning, match="shadows="):
        old = gp.geometry_table(runs, shadows=True)
    pd.testing.assert_frame_equal(old, gp.geometry_table(runs, by_trajectory=True))
    with pytest.raises(ValueError, match=r"invalid view='mine': expected one of same, own"):
        gp.geometry_table(runs, view="mine")


# ---------------------------------------------------------------------------------------------
# B6: the model-level gap, decomposed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["tensor", "layer"])
def test_decomposition_sums_to_the_model_gap(runs, by) -> None:
    steps = theory.r4_decomposition(runs, by=by)
    parts = theory.r4_decomposition(runs, by=by, per="part")
    n_parts = len(NAMES) if by == "tensor" else 3
    assert len(steps) == 7 * STEPS and len(parts) == len(steps) * n_parts
    # float64 sums of n_parts + 2 terms of size <= 1: a few ulps per term
    size = parts.groupby(["run", "step"])[["per_part_term", "pooling_term"]].apply(
        lambda p: p.abs().to_numpy().sum()
    )
    bound = 4 * (n_parts + 4) * EPS * (size.to_numpy() + 2)
    ordered = steps.set_index(["run", "step"]).loc[size.index]
    assert (ordered["residual"].abs().to_numpy() <= bound).all()
    exact = ordered["uniform_term"] + ordered["weighting_term"] - ordered["per_part_term"]
    assert (exact.abs().to_numpy() <= bound).all()
    summed = parts.groupby(["run", "step"])[["per_part_term", "pooling_term"]].sum()
    np.testing.assert_allclose(summed.to_numpy(), ordered[summed.columns].to_numpy(), atol=1e-14)


def test_decomposition_weights_and_gap_are_the_recorded_cosines(runs) -> None:
    run = geomkit.runs.load(runs)[0]
    ds = run.ds
    parts = theory.r4_decomposition(run, per="part")
    steps = theory.r4_decomposition(run)
    t = ds.geom.metrics(by="tensor")
    m = ds.geom.metrics(by="model")
    for name, column in (("sago", "weight_sago"), ("pcgrad", "weight_against")):
        want = (t["norm_d"].sel(strategy=name) * t["norm_r"]) / (
            m["norm_d"].sel(strategy=name) * m["norm_r"]
        )
        got = parts.pivot(index="step", columns="part", values=column)[list(ds["tensor"].values)]
        np.testing.assert_allclose(got.to_numpy(), want.transpose("record", "tensor"), rtol=1e-12)
    gap = m["cos_dr"].sel(strategy="sago") - m["cos_dr"].sel(strategy="pcgrad")
    np.testing.assert_allclose(steps["gap"], gap.values, rtol=1e-12, atol=1e-15)
    model = [r for r in theory.audit(run, claims=["R4"]) if r.granularity == "model"]
    (r4,) = [r for r in model if r.strategy == "sago>=pcgrad"]
    assert int(steps["violated"].sum()) == r4.violations
    summary = theory.r4_decomposition(run, per="run").iloc[0]
    assert summary["steps"] == STEPS
    assert summary["frac_ratio_ge_1"] == pytest.approx(np.mean(m["norm_ratio"].values >= 1))
    assert summary["mean_gap"] == pytest.approx(
        summary["mean_per_part_term"] + summary["mean_pooling_term"], abs=1e-14
    )


def test_decomposition_explains_a_model_gap_against_every_tensor_gap() -> None:
    """A big tensor where SAGO is slightly behind and a tiny one where it is far ahead: the mean
    tensor gap is positive, the model gap negative, and the weighting term says why."""
    from geomkit.theory.breakdown import _decompose
    from geomkit.theory.cases import build_cases

    # per tensor j: ff, rr, fr and for each strategy dd, df, dr; the other fields unused
    def stats(rows):
        from geomkit.fields import FIELDS, INDEX

        out = np.zeros((1, len(rows), len(FIELDS)))
        for j, row in enumerate(rows):
            for key, value in row.items():
                out[0, j, INDEX[key]] = value
        return out

    common = [{"ff": 1.0, "rr": 100.0, "fr": 0.0}, {"ff": 1e-4, "rr": 1e-4, "fr": 0.0}]
    sago = stats([{**common[0], "dd": 1.0, "dr": 1.0}, {**common[1], "dd": 1e-4, "dr": 1e-4}])
    pcgrad = stats([{**common[0], "dd": 1.0, "dr": 2.0}, {**common[1], "dd": 1e-4, "dr": 0.0}])
    cases = build_cases(
        {"sago": sago, "pcgrad": pcgrad},
        batch_labels=["step 0"],
        tensor_labels=["big", "small"],
        groupings={"model": (np.zeros(2, dtype=int), ["model"])},
        alpha=1.0,
        gamma=1.0,
        dtype=torch.float64,
        source="constructed",
        evidence={"sago": "shadow", "pcgrad": "shadow"},
    )
    frame = _decompose(
        cases["tensor"], cases["model"], "pcgrad", np.array([0]), ["big", "small"], "step"
    )
    row = frame.iloc[0]
    # big: cos 0.1 vs 0.2 (gap -0.1); small: cos 1 vs 0 (gap +1): mean tensor gap +0.45
    assert row["part_gap_mean"] == pytest.approx(0.45)
    assert row["gap"] < 0 < row["uniform_term"] and row["weighting_term"] < 0
    assert row["gap"] == pytest.approx(row["per_part_term"] + row["pooling_term"], abs=1e-15)


def test_decomposition_names_a_missing_strategy(tmp_path) -> None:
    path = tmp_path / "only" / "geometry.zarr"
    with Recorder(path, ["w"], [4], "sago", shadows=["sum"]) as rec:
        rec.record(0, [torch.randn(4)], [torch.randn(4)])
    with pytest.raises(ValueError, match="did not record strategy 'pcgrad'"):
        theory.r4_decomposition(path.parent)
    with pytest.raises(ValueError, match="invalid per='steps'"):
        theory.r4_decomposition(path.parent, per="steps")


# ---------------------------------------------------------------------------------------------
# B7, C11: the scatter counts as the audit does, per objective, and turns into a density
# ---------------------------------------------------------------------------------------------


def _audit_counts(source, by: str, comparison: str = "sago>=pcgrad") -> dict[str, tuple[int, int]]:
    loaded = geomkit.runs.load(source)
    objective = {r.label: r.objective for r in loaded}
    out: dict[str, list[int]] = {}
    for r in theory.audit(loaded, claims=["R4"]):
        if r.granularity == by and r.strategy == comparison:
            counts = out.setdefault(objective[r.source], [0, 0])
            counts[0] += r.violations
            counts[1] += r.cases
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize("by", ["tensor", "layer", "model"])
def test_scatter_counts_are_the_audits_per_objective(runs, by) -> None:
    result = gp.sago_vs_pcgrad(runs, by=by)
    audit = _audit_counts(runs, by)
    assert set(result.extras["counts"]) == set(OBJECTIVES)
    for ax, objective in zip(result.axes, sorted(OBJECTIVES), strict=True):
        counts = result.extras["counts"][objective]
        assert (counts["violations"], counts["cases"]) == audit[objective]
        assert f"{counts['violations']} of {counts['cases']}" in ax.get_title()
        assert ax.get_title().startswith(objective)
    assert result.extras["n_below"] == sum(v for v, _ in audit.values())


def test_scatter_is_a_density_above_the_threshold(runs) -> None:
    few = gp.sago_vs_pcgrad(runs)
    assert few.extras["mode"] == "points"
    assert all(isinstance(few.artists[o], PathCollection) for o in OBJECTIVES)
    many = gp.sago_vs_pcgrad(runs, density_above=10)
    assert many.extras["mode"] == "density"
    for objective in OBJECTIVES:
        hexes = many.artists[objective]
        assert isinstance(hexes, PolyCollection)
        points = many.extras["counts"][objective]["cases"]
        assert int(np.ma.sum(hexes.get_array())) == points  # every point in one hexagon
        line = many.artists[(objective, "diagonal")]
        assert line.axes is hexes.axes and line.get_linestyle() == "--"
    assert "per hexagon" in many.extras["colorbar"].ax.get_ylabel()


def test_scatter_tolerance_argument_is_deprecated(runs) -> None:
    with pytest.warns(GeomkitDeprecationWarning, match="tolerance="):
        old = gp.sago_vs_pcgrad(runs, tolerance=0.5)
    assert old.extras["counts"] == gp.sago_vs_pcgrad(runs).extras["counts"]


def test_scatter_count_equals_the_audit_on_a_geomkit_run(smoke_runs) -> None:
    status, out = smoke_runs  # a real `geomkit run --preset smoke` (tests/conftest.py)
    assert status == 0
    result = gp.sago_vs_pcgrad(out)
    audit = _audit_counts(out, "tensor")
    counts = result.extras["counts"]
    assert {k: (v["violations"], v["cases"]) for k, v in counts.items()} == audit


# ---------------------------------------------------------------------------------------------
# C12: violation rates, per objective, readable in print, "not evaluated" is not "0"
# ---------------------------------------------------------------------------------------------


def _printed_sizes(fig, width: float) -> list[tuple[str, float]]:
    """(text, size in pt) of every visible text once the figure's content is printed
    ``width`` inches wide."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    content = fig.get_tightbbox(renderer).width  # inches
    scale = min(1.0, width / content)
    return [
        (t.get_text(), t.get_fontsize() * scale)
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip()
    ]


def test_no_text_below_7pt_at_print_width(runs) -> None:
    frame = theory.audit(geomkit.runs.load(runs)).to_frame()
    with gp.paper_style():
        rates = gp.violation_rates(frame, objectives=runs)
        assert rates.figure.get_size_inches()[0] == pytest.approx(PRINT_WIDTH)
        small = [(t, s) for t, s in _printed_sizes(rates.figure, PRINT_WIDTH) if s < 7]
        assert not small, small
        scatter = gp.sago_vs_pcgrad(runs)
        width = scatter.figure.get_size_inches()[0]  # the documented width it is drawn at
        assert width in (pytest.approx(gp.SINGLE_COLUMN), pytest.approx(gp.DOUBLE_COLUMN))
        small = [(t, s) for t, s in _printed_sizes(scatter.figure, width) if s < 7]
        assert not small, small


def test_violation_rates_per_objective_and_not_evaluated_is_distinct(runs) -> None:
    loaded = geomkit.runs.load(runs)
    frame = theory.audit(loaded).to_frame()
    result = gp.violation_rates(frame, objectives=loaded)
    assert [a.get_title(loc="left") for a in result.axes] == [
        "graddiff (4 runs)",
        "simnpo (3 runs)",
    ]
    texts, cells = result.extras["texts"], result.artists
    objective = {r.label: r.objective for r in loaded}
    frame["objective"] = frame["source"].map(objective)
    r4 = frame[(frame["claim"] == "R4") & (frame["granularity"] == "tensor")]
    r4 = r4[r4["strategy"] == "sago>=pcgrad"].groupby("objective")[["violations", "cases"]].sum()
    for name, row in r4.iterrows():
        rate = 100 * row["violations"] / row["cases"]
        shown = texts[(name, "R4 sago>=pcgrad", "tensor")].get_text()
        assert shown == ("0" if rate == 0 else "<1" if rate < 1 else f"{rate:.0f}")
    # a claim with 0 cases (e.g. R9 per coordinate needs the gradients) is not evaluated
    not_evaluated = next(
        k for k, t in texts.items() if t.get_text() == "n/e" and k[0] == "graddiff"
    )
    claim, strategy = not_evaluated[1].split(" ", 1)
    rows = frame[(frame["objective"] == "graddiff") & (frame["claim"] == claim)]
    rows = rows[(rows["strategy"] == strategy) & (rows["granularity"] == not_evaluated[2])]
    assert len(rows) > 0 and rows["cases"].sum() == 0
    zero = next(k for k, t in texts.items() if t.get_text() == "0" and k[0] == "graddiff")
    assert cells[not_evaluated].get_hatch() and not cells[zero].get_hatch()
    assert to_rgba(cells[zero].get_facecolor()) == pytest.approx(to_rgba("white"))
    assert to_rgba(cells[not_evaluated].get_facecolor()) != to_rgba(cells[zero].get_facecolor())


def test_write_figures_writes_both_tables(runs, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = gp.write_figures(runs, tmp_path, formats=("png",), dpi=30, per_run=[])
    same = pd.read_csv(tmp_path / "geometry_table.csv")
    own = pd.read_csv(tmp_path / "geometry_table_own.csv")
    assert set(same["view"]) == {"same gradients"} and set(own["view"]) == {"own trajectory"}
    assert results["geometry_table"][0].read_text().startswith("| Objective | Method")
    assert "Own trajectory" in (tmp_path / "geometry_table_own.md").read_text()
