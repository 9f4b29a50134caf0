"""geomkit.plot: what is drawn (data, labels from attributes, styles), ax= handling, skipping
with a message when data is missing, the figure set on disk, and no figures left open."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.colors import LogNorm

import geomkit.plot as gp
from geomkit._deprecation import GeomkitDeprecationWarning
from geomkit.store import stack_runs

STRATEGIES = ("sum", "pcgrad", "sago")
STEP_STATISTICS = ("uu", "uf", "ur", "ud", "dd_step", "n_u_opposed_r", "n_u_opposed_f")
LAYERS = 3
RECORDS = 6
EVALUATIONS = (0, 2, 4, 6)

# --------------------------------------------------------------------------------------------
# Synthetic runs in the store layout (docs/schema.md), with statistics of real (f, r, d) vectors
# --------------------------------------------------------------------------------------------


def _combine(name: str, f: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, int]:
    fr, rr = f @ r, r @ r
    if name == "sum":
        return f + r, 0
    if name == "pcgrad":
        if fr < 0:
            return f - fr / (rr + 1e-10) * r + r, 1
        return f + r, 0
    if name == "sago":
        conflict = np.sign(f) * np.sign(r) < 0
        return np.where(conflict, r, f), 0
    raise AssertionError(name)


def _tensors() -> list[tuple[str, int, str, str, int]]:
    tensors = [("model.embed_tokens.weight", -1, "embed", "embed", 24)]
    for i in range(LAYERS - 1):
        tensors.append((f"model.layers.{i}.self_attn.q_proj.weight", i, "attn_q", "attention", 16))
        tensors.append((f"model.layers.{i}.mlp.up_proj.weight", i, "mlp_up", "mlp", 20))
    return tensors


def make_run(
    applied: str = "sago",
    *,
    seed: int = 0,
    objective: str = "graddiff",
    shadows: tuple[str, ...] = STRATEGIES,
    evaluations: tuple[int, ...] | None = EVALUATIONS,
    steps: int = RECORDS,
    step_fields: bool = True,
    realized: bool = True,
) -> xr.Dataset:
    """One run as geomkit.open_run returns it, with the applied strategy first.

    ``step_fields``: the statistics of a step u (an AdamW-like turn of the applied d,
    u = 0.01 sign(d) sqrt|d|) as schema version 3 stores them; ``realized``: the losses after
    each recorded step (the first-order prediction plus a small second-order term).
    """
    rng = np.random.default_rng(seed * 100 + sum(map(ord, applied)))
    strategies = [applied] + [s for s in shadows if s != applied]
    tensors = _tensors()
    fields = {k: np.zeros((RECORDS, len(tensors))) for k in ("ff", "rr", "fr")}
    counts = {k: np.zeros((RECORDS, len(tensors)), np.int64) for k in ("nc", "nb")}
    upd = {k: np.zeros((RECORDS, len(strategies), len(tensors))) for k in ("dd", "df", "dr")}
    opp = np.zeros((RECORDS, len(strategies), len(tensors)), np.int64)
    proj = np.zeros_like(opp)
    moved = {k: np.zeros((RECORDS, len(tensors))) for k in STEP_STATISTICS}
    for t in range(RECORDS):
        for j, (_, _, _, _, n) in enumerate(tensors):
            r = rng.normal(size=n)
            scale = np.exp(rng.normal(0.5, 0.8))
            f = scale * (-0.4 * r + rng.normal(size=n))
            fields["ff"][t, j], fields["rr"][t, j], fields["fr"][t, j] = f @ f, r @ r, f @ r
            counts["nc"][t, j] = int(np.sum(np.sign(f) * np.sign(r) < 0))
            counts["nb"][t, j] = int(np.sum((f != 0) & (r != 0)))
            for k, name in enumerate(strategies):
                d, fired = _combine(name, f, r)
                upd["dd"][t, k, j], upd["df"][t, k, j], upd["dr"][t, k, j] = d @ d, d @ f, d @ r
                opp[t, k, j] = int(np.sum(d * r < 0))
                proj[t, k, j] = fired
                if k == 0:  # the applied strategy: the step it took (no random draw)
                    u = 0.01 * np.sign(d) * np.sqrt(np.abs(d))
                    for key, value in (
                        ("uu", u @ u),
                        ("uf", u @ f),
                        ("ur", u @ r),
                        ("ud", u @ d),
                        ("dd_step", d @ d),
                        ("n_u_opposed_r", np.sum(u * r < 0)),
                        ("n_u_opposed_f", np.sum(u * f < 0)),
                    ):
                        moved[key][t, j] = value
    step = np.arange(steps)
    shrink = {"sum": 1.0, "pcgrad": 0.6, "sago": 0.3}.get(applied, 0.5)
    attrs = lambda long, units="1": {"long_name": long, "units": units, "description": long}  # noqa: E731
    data = {
        "forget_loss": (("step",), -0.5 * step - rng.normal(0, 0.05, steps), attrs("forget loss")),
        "retain_loss": (
            ("step",),
            1 + shrink * step + rng.normal(0, 0.05, steps),
            attrs("retain loss"),
        ),
        "wall_time": (("step",), 0.1 * step, attrs("wall time", "s")),
        "ff": (("record", "tensor"), fields["ff"], attrs("<f, f>", "gradient^2")),
        "rr": (("record", "tensor"), fields["rr"], attrs("<r, r>", "gradient^2")),
        "fr": (("record", "tensor"), fields["fr"], attrs("<f, r>", "gradient^2")),
        "n_conflict": (("record", "tensor"), counts["nc"], attrs("conflicting", "count")),
        "n_both_nonzero": (("record", "tensor"), counts["nb"], attrs("both", "count")),
        "n_opposed": (("record", "strategy", "tensor"), opp, attrs("opposed", "count")),
        "n_projected": (("record", "strategy", "tensor"), proj, attrs("projected", "count")),
    }
    for k in ("dd", "df", "dr"):
        data[k] = (("record", "strategy", "tensor"), upd[k], attrs(k, "gradient^2"))
    coords = {
        "step": ("step", step, attrs("optimizer step")),
        "record": ("record", np.arange(RECORDS), attrs("recorded optimizer step")),
        "strategy": ("strategy", np.array(strategies, object), attrs("combination strategy")),
        "measured": ("strategy", np.arange(len(strategies)) == 0),
        "tensor": ("tensor", np.array([t[0] for t in tensors], object), attrs("tensor")),
        "layer": ("tensor", np.array([t[1] for t in tensors]), attrs("layer")),
        "component": ("tensor", np.array([t[2] for t in tensors], object), attrs("component")),
        "module": ("tensor", np.array([t[3] for t in tensors], object), attrs("module")),
        "numel": ("tensor", np.array([t[4] for t in tensors]), attrs("coordinates", "count")),
    }
    if step_fields:
        for key, values in moved.items():
            data[key] = (("record", "tensor"), values, attrs(f"step statistic {key}"))
        if realized:
            after = {"forget_loss": moved["uf"].sum(1), "retain_loss": moved["ur"].sum(1)}
            for loss, inner in after.items():
                before = data[loss][1]
                value = np.full(steps, np.nan)
                n = min(steps, RECORDS)
                value[:n] = before[:n] - inner[:n] + 0.5 * inner[:n] ** 2  # -<u, g> + O(u^2)
                data[f"{loss}_after"] = (("step",), value, attrs(f"{loss} after the step"))
    if evaluations is not None:
        ev = np.asarray(evaluations)
        progress = ev / max(ev.max(), 1)
        quality = {"sum": 0.5, "pcgrad": 0.8, "sago": 0.9}.get(applied, 0.7)
        noise = rng.normal(0, 0.02, len(ev)) * (ev > 0)
        data["forget_acc"] = (
            ("evaluation",),
            1 - 0.8 * progress + noise,
            attrs("forget QA accuracy"),
        )
        data["retain_acc"] = (
            ("evaluation",),
            1 - (1 - quality) * progress + noise,
            attrs("retain QA accuracy"),
        )
        data["general_acc"] = (
            ("evaluation",),
            0.7 - 0.1 * (1 - quality) * progress,
            attrs("general-probe accuracy"),
        )
        coords["evaluation"] = ("evaluation", ev, attrs("optimizer steps completed"))
    return xr.Dataset(
        data,
        coords,
        attrs={
            "geomkit_schema": "geomkit.run",
            "schema_version": 1,
            "applied_strategy": applied,
            "objective": objective,
            "seed": seed,
            "alpha": 1.0,
            "gamma": 1.0,
            "run": f"{objective}-{applied}-seed{seed}",
        },
    )


def stack(runs: list[xr.Dataset]) -> xr.Dataset:
    """Runs along ``run`` the way geomkit.open_runs stacks them."""
    return stack_runs(runs, [ds.attrs["run"] for ds in runs])


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    leaked = plt.get_fignums()
    plt.close("all")
    assert not leaked, f"figures left open: {leaked}"


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


@pytest.fixture(scope="module")
def run() -> xr.Dataset:
    return make_run("sago")


@pytest.fixture(scope="module")
def runs() -> list[xr.Dataset]:
    return [make_run(s, seed=seed) for s in STRATEGIES for seed in (0, 1)]


def _on(artists, ax) -> bool:
    return all(a.axes is ax for a in artists)


# --------------------------------------------------------------------------------------------
# Style
# --------------------------------------------------------------------------------------------


def test_axis_label_from_attributes_skips_unit_one() -> None:
    assert gp.axis_label({"long_name": "retain loss", "units": "1"}) == "retain loss"
    assert gp.axis_label({"long_name": "wall time", "units": "s"}) == "wall time [s]"
    assert gp.axis_label({}, "fallback") == "fallback"


def test_paper_markers_and_style_is_restored() -> None:
    assert gp.strategy_style("sum").marker == "s"
    assert gp.strategy_style("pcgrad").marker == "^"
    assert gp.strategy_style("sago").marker == "*"
    assert gp.strategy_style("new_rule") == gp.strategy_style("new_rule")  # stable fallback
    before = matplotlib.rcParams["pdf.fonttype"], matplotlib.rcParams["axes.spines.top"]
    with gp.paper_style():
        assert matplotlib.rcParams["pdf.fonttype"] == 42
        assert matplotlib.rcParams["axes.spines.top"] is False
    assert (matplotlib.rcParams["pdf.fonttype"], matplotlib.rcParams["axes.spines.top"]) == before


def test_save_writes_pdf_and_png(tmp_path, ax) -> None:
    ax.plot([0, 1], [1, 0])
    paths = gp.save(ax.figure, tmp_path / "sub" / "figure")
    assert [p.name for p in paths] == ["figure.pdf", "figure.png"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    assert paths[1].read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="'docx'"):
        gp.save(ax.figure, tmp_path / "figure", formats=("docx",))


# --------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------


def test_cos_fr_heatmap_is_layer_by_step(run, ax) -> None:
    result = gp.cos_fr_heatmap(run, ax=ax)
    mesh = result.artists["heatmap"]
    expected = run.geom.metrics(by="layer")["cos_fr"].transpose("layer", "record")
    assert mesh.get_array().shape == (LAYERS, RECORDS)
    np.testing.assert_allclose(mesh.get_array(), expected.values)
    assert result.ax is ax and mesh.axes is ax
    assert ax.get_xlabel() == "recorded optimizer step"
    assert ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == [gp.OUTSIDE_BLOCKS, "0", "1"]
    long_name = expected.attrs["long_name"]
    assert ax.get_title().startswith(f"{long_name} per layer")
    label = result.extras["colorbar"].ax.get_xlabel().replace("\n", " ")
    top = np.ceil(np.abs(expected.values).max() * 10) / 10  # symmetric, up to a tenth
    assert label == f"{long_name} (scale {-top:g} to {top:g}, centred at 0)"
    norm = mesh.norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((-top, 0.0, top))


def test_conflict_heatmap_values(run) -> None:
    result = gp.conflict_heatmap(run)
    values = result.artists["heatmap"].get_array()
    expected = run.geom.metrics(by="layer")["conflict_rate"].transpose("layer", "record")
    np.testing.assert_allclose(values, expected.values)
    assert 0 <= values.min() and values.max() <= 1
    norm = result.artists["heatmap"].norm  # a rate: the scale is the data's range, stated
    assert (norm.vmin, norm.vmax) == pytest.approx((values.min(), values.max()))
    label = result.extras["colorbar"].ax.get_xlabel().replace("\n", " ")
    assert label.startswith(expected.attrs["long_name"]) and "scale fit to data" in label
    assert result.ax.get_title().startswith(expected.attrs["long_name"])
    plt.close(result.figure)


# --------------------------------------------------------------------------------------------
# Alignment over steps and per layer
# --------------------------------------------------------------------------------------------


def test_alignment_one_line_per_strategy_applied_solid(run) -> None:
    fig, axes = plt.subplots(1, 2)
    result = gp.alignment_over_steps(run, ("cos_dr", "cos_df"), ax=axes)
    assert set(result.artists) == {(m, s) for m in ("cos_dr", "cos_df") for s in STRATEGIES}
    metrics = run.geom.metrics(by="model")
    for (metric, strategy), line in result.artists.items():
        panel = axes[0] if metric == "cos_dr" else axes[1]
        assert line.axes is panel
        np.testing.assert_allclose(line.get_ydata(), metrics[metric].sel(strategy=strategy))
        if strategy == "sago":  # applied
            assert line.get_linestyle() == "-" and "(shadow)" not in line.get_label()
        else:
            assert line.get_linestyle() == "--" and line.get_label().endswith("(shadow)")
        assert line.get_marker() == gp.strategy_style(strategy).marker
    assert axes[0].get_ylabel().replace("\n", " ") == metrics["cos_dr"].attrs["long_name"]
    assert len(axes[0].get_lines()) == len(STRATEGIES) + 1  # + the zero line
    plt.close(fig)


def test_alignment_layer_selection(run, ax) -> None:
    result = gp.alignment_over_steps(run, metric="cos_dr", layer=1, ax=ax, strategies=["pcgrad"])
    assert list(result.artists) == [("cos_dr", "pcgrad")]
    expected = run.geom.metrics(by="layer")["cos_dr"].sel(layer=1, strategy="pcgrad")
    np.testing.assert_allclose(result.artists[("cos_dr", "pcgrad")].get_ydata(), expected)
    with pytest.raises(ValueError, match="invalid layer=7"):
        gp.alignment_over_steps(run, "cos_dr", layer=7, ax=ax)
    with pytest.raises(gp.MissingVariable, match="'blur'"):
        gp.alignment_over_steps(run, "cos_dr", strategies=["blur"], ax=ax)


def test_alignment_small_multiples(run) -> None:
    result = gp.alignment_by_layer(run, "cos_df", ncols=2)
    assert len(result.axes) == LAYERS
    assert set(result.artists) == {(layer, s) for layer in (-1, 0, 1) for s in STRATEGIES}
    for (layer, _), line in result.artists.items():
        assert line.axes is result.axes[[-1, 0, 1].index(layer)]
    assert [a.get_title() for a in result.axes] == [gp.OUTSIDE_BLOCKS, "layer 0", "layer 1"]
    # 3 panels in 2 columns: the top-right panel has none below it and keeps its tick labels.
    top_right = result.axes[1]
    assert top_right.xaxis.get_tick_params()["labelbottom"] in (True, None)
    assert any(t.get_visible() and t.get_text() for t in top_right.get_xticklabels())
    assert not any(t.get_text() for t in result.axes[0].get_xticklabels() if t.get_visible())
    long_name = run.geom.metrics(by="layer")["cos_df"].attrs["long_name"]
    assert result.figure.get_suptitle().startswith(f"{long_name} per layer")
    plt.close(result.figure)


@pytest.mark.parametrize("kind", ["violin", "box", "strip"])
def test_distributions_per_layer_and_strategy(run, ax, kind) -> None:
    result = gp.alignment_distributions(run, "cos_dr", kind=kind, ax=ax)
    frame = result.extras["data"]
    assert len(frame) == RECORDS * LAYERS * len(STRATEGIES)
    assert [t.get_text() for t in ax.get_xticklabels()] == [gp.OUTSIDE_BLOCKS, "0", "1"]
    legend = [t.get_text() for t in result.extras["legend"].get_texts()]
    assert legend == ["SAGO", "sum (shadow)", "PCGrad (shadow)"]
    assert result.artists["distribution"] and _on(result.artists["distribution"], ax)


def test_distributions_per_tensor(run, ax) -> None:
    result = gp.alignment_distributions(run, "cos_fr", by="tensor", ax=ax)
    frame = result.extras["data"]
    assert len(frame) == RECORDS * len(_tensors())
    assert "strategy" not in frame


# --------------------------------------------------------------------------------------------
# Theorem figures
# --------------------------------------------------------------------------------------------


def test_sago_vs_pcgrad_scatter(run, ax) -> None:
    from geomkit import theory

    result = gp.sago_vs_pcgrad(run, ax=ax)
    points = result.artists["graddiff"]
    metrics = run.geom.metrics(by="tensor")
    x = metrics["cos_dr"].sel(strategy="pcgrad").values.ravel()
    assert result.extras["n_points"] == x.size == RECORDS * len(_tensors())
    (r4,) = [
        r
        for r in theory.audit(run, claims=["R4"])
        if r.granularity == "tensor" and r.strategy == "sago>=pcgrad"
    ]
    assert result.extras["n_below"] == r4.violations
    assert result.extras["counts"]["graddiff"]["cases"] == r4.cases
    assert f"{r4.violations} of {r4.cases}" in ax.get_title()
    np.testing.assert_allclose(sorted(points.get_offsets()[:, 0]), sorted(x))
    assert isinstance(points.norm, LogNorm) and result.extras["mode"] == "points"
    assert _on([points, result.artists[("graddiff", "diagonal")]], ax)
    assert "|f| / |r|" in result.extras["colorbar"].ax.get_ylabel()


def test_sago_vs_pcgrad_skips_without_the_strategy(ax) -> None:
    with pytest.raises(gp.MissingVariable, match="'pcgrad'") as error:
        gp.sago_vs_pcgrad(make_run("sago", shadows=("sum", "sago")), ax=ax)
    assert isinstance(error.value, gp.PlotSkipped) and error.value.variable == "pcgrad"


def test_violation_rates_cells(ax) -> None:
    frame = pd.DataFrame(
        {
            "claim": ["R1", "R1", "R4", "R4"],
            "granularity": ["tensor", "model", "tensor", "model"],
            "violation_rate": [0.0, 0.0, 0.62, 0.3],
            "status": ["proven", "proven", "false", "false"],
        }
    )
    result = gp.violation_rates(frame, ax=ax)
    texts = result.extras["texts"]
    assert texts[("objective not given", "R4", "tensor")].get_text() == "62"
    assert texts[("objective not given", "R1", "model")].get_text() == "0"
    assert len(result.artists) == 4 and _on(result.artists.values(), ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["R1", "R4"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tensor", "model"]
    with pytest.raises(ValueError, match="violation_rate"):
        gp.violation_rates(frame.drop(columns="violation_rate"), ax=ax)


def test_violation_rates_pool_sources_of_one_objective_only() -> None:
    """Audit.to_frame() has one row per source (run or sampler) and strategy; sources of one
    objective are pooled, objectives never."""
    frame = pd.DataFrame(
        {
            "claim": ["R4", "R4", "R4", "R1"],
            "granularity": ["tensor"] * 4,
            "strategy": ["sago>=pcgrad", "sago>=pcgrad", "sago>=pcgrad_global", "sago"],
            "source": ["run-a", "run-b", "run-a", "run-a"],
            "cases": [10, 30, 10, 0],
            "violations": [5, 3, 1, 0],
            "violation_rate": [0.5, 0.1, 0.1, np.nan],
            "status": ["false"] * 3 + ["proven"],
        }
    )
    pooled = gp.violation_rates(frame)
    table = pooled.extras["table"].set_index("group")
    assert table.loc["R4 sago>=pcgrad", "cases"] == 40
    assert table.loc["R4 sago>=pcgrad", "violation_rate"] == pytest.approx(8 / 40)
    assert np.isnan(table.loc["R1 sago", "violation_rate"])
    assert pooled.extras["texts"][("objective not given", "R1 sago", "tensor")].get_text() == "n/e"
    plt.close(pooled.figure)
    split = gp.violation_rates(frame, objectives={"run-a": "graddiff", "run-b": "simnpo"})
    texts = split.extras["texts"]
    assert texts[("graddiff", "R4 sago>=pcgrad", "tensor")].get_text() == "50"
    assert texts[("simnpo", "R4 sago>=pcgrad", "tensor")].get_text() == "10"
    assert [a.get_title(loc="left") for a in split.axes] == ["graddiff (1 run)", "simnpo (1 run)"]
    plt.close(split.figure)


# --------------------------------------------------------------------------------------------
# Loss dynamics, trade-off
# --------------------------------------------------------------------------------------------


def test_loss_dynamics_mean_over_seeds(runs) -> None:
    result = gp.loss_dynamics(stack(runs))
    assert len(result.axes) == 2
    assert set(result.artists) == {
        (v, ("graddiff", s)) for v in ("retain_loss", "forget_loss") for s in STRATEGIES
    }
    line = result.artists[("retain_loss", ("graddiff", "pcgrad"))]
    pair = [r for r in runs if r.attrs["applied_strategy"] == "pcgrad"]
    np.testing.assert_allclose(line.get_ydata(), (pair[0].retain_loss + pair[1].retain_loss) / 2)
    assert line.get_label() == "PCGrad" and line.axes is result.axes[0]
    # GradDiff's forget loss is -NLL: the forget panel draws the (positive) forget NLL.
    forget = result.artists[("forget_loss", ("graddiff", "pcgrad"))]
    np.testing.assert_allclose(forget.get_ydata(), -(pair[0].forget_loss + pair[1].forget_loss) / 2)
    assert result.axes[1].get_ylabel().startswith("forget NLL (= -forget loss)")
    assert len(result.extras["bands"]) == 2 * len(STRATEGIES)
    assert result.axes[0].get_ylabel() == "retain loss"
    assert result.axes[1].get_xlabel() == "optimizer step"
    legend = [t.get_text() for t in result.extras["legend"].get_texts()]
    assert legend == ["sum", "PCGrad", "SAGO", "band: mean ± 1 sd over seeds"]
    assert result.extras["legend"].get_title().get_text() == "line: mean of 2 seeds"
    plt.close(result.figure)


def test_loss_dynamics_one_row_of_panels_per_objective() -> None:
    runs = [make_run(s, objective=o) for o in ("simnpo", "graddiff") for s in ("sum", "sago")]
    result = gp.loss_dynamics(runs, band=None)
    panels = result.extras["panels"]
    assert list(panels) == [
        (o, v) for o in ("graddiff", "simnpo") for v in ("retain_loss", "forget_loss")
    ]
    assert result.axes == list(panels.values())
    for (variable, (objective, strategy)), line in result.artists.items():
        assert line.axes is panels[(objective, variable)]
        style = gp.strategy_style(strategy)
        assert (line.get_color(), line.get_marker()) == (style.color, style.marker)
    graddiff, simnpo = panels[("graddiff", "forget_loss")], panels[("simnpo", "forget_loss")]
    assert graddiff.get_ylabel().startswith("forget NLL")
    # SimNPO's forget loss is no NLL and is drawn as recorded, labelled as its own loss.
    assert (
        simnpo.get_ylabel().startswith("simnpo forget loss") and "not an NLL" in simnpo.get_ylabel()
    )
    source = next(
        r
        for r in runs
        if r.attrs["objective"] == "simnpo" and r.attrs["applied_strategy"] == "sago"
    )
    line = result.artists[("forget_loss", ("simnpo", "sago"))]
    np.testing.assert_allclose(line.get_ydata(), source.forget_loss)
    assert not result.extras["bands"]
    plt.close(result.figure)


def test_loss_dynamics_missing_variable(ax) -> None:
    with pytest.raises(gp.MissingVariable, match="'retain_loss'"):
        gp.loss_dynamics([make_run("sum").drop_vars("retain_loss")], ax=[ax, ax])


def test_tradeoff_arrows_from_sum(runs, ax) -> None:
    result = gp.tradeoff(stack(runs), y="general_acc", ax=ax)
    points = result.extras["points"]
    assert set(points) == {("graddiff", s) for s in STRATEGIES}
    sago = [r for r in runs if r.attrs["applied_strategy"] == "sago"]
    final = [(float(r.forget_acc[-1]), float(r.general_acc[-1])) for r in sago]
    assert points[("graddiff", "sago")] == pytest.approx(tuple(np.mean(final, axis=0)))
    arrows = result.extras["arrows"]
    assert set(arrows) == {("graddiff", "sum", "pcgrad"), ("graddiff", "sum", "sago")}
    for (_, start, end), arrow in arrows.items():
        assert arrow.xyann == pytest.approx(points[("graddiff", start)])
        assert arrow.xy == pytest.approx(points[("graddiff", end)])
        assert arrow.arrow_patch.get_linestyle() == "--" and arrow.axes is ax
        _assert_arrow_is_no_marker(arrow, result.figure)
    target = result.extras["target"]
    assert target.get_ydata()[0] == pytest.approx(float(runs[0].general_acc[0]))
    assert target.get_linestyle() == "--"
    sago_marker = result.artists[("graddiff", "sago")][0]
    assert sago_marker.get_marker() == "*" and sago_marker.axes is ax
    assert result.artists[("graddiff", "sum")][0].get_marker() == "s"
    assert result.artists[("graddiff", "sago")].has_xerr  # two seeds: error bars
    assert ax.get_xlabel() == "final forget QA accuracy (lower is better)"
    assert ax.get_ylabel().replace("\n", " ") == "final general-probe accuracy (higher is better)"
    assert "final evaluation" in ax.get_title() and "learning rate" in ax.get_title()
    assert result.extras["description"].startswith("final evaluation: equal steps")


def _assert_arrow_is_no_marker(arrow, figure) -> None:
    """An arrow's head is open and grey: it matches no strategy's legend handle."""
    style = arrow.arrow_patch.get_arrowstyle()
    assert not getattr(style, "fillend", False) and not getattr(style, "fillbegin", False)
    colour = matplotlib.colors.to_rgb(arrow.arrow_patch.get_edgecolor())
    handles = [h for a in figure.axes for h in a.get_legend_handles_labels()[0]]
    handles += [h for legend in figure.legends for h in legend.legend_handles]
    for handle in handles:
        line = handle[0] if isinstance(handle, tuple) else handle
        if hasattr(line, "get_marker") and line.get_marker() not in (None, "", "None", "none"):
            assert colour != pytest.approx(matplotlib.colors.to_rgb(line.get_color()), abs=0.02)
    for style in gp.STRATEGY_STYLES.values():
        assert colour != pytest.approx(style.color, abs=0.02)


def test_tradeoff_one_panel_per_objective_and_matched_forgetting() -> None:
    runs = [
        make_run(s, objective=o, seed=seed)
        for o in ("graddiff", "simnpo")
        for s in STRATEGIES
        for seed in (0, 1)
    ]
    result = gp.tradeoff(runs)
    panels = result.extras["panels"]
    assert list(panels) == ["graddiff", "simnpo"] and result.axes == list(panels.values())
    for (objective, strategy), container in result.artists.items():
        marker = container[0]
        assert marker.axes is panels[objective]
        style = gp.strategy_style(strategy)
        assert (marker.get_color(), marker.get_marker()) == (style.color, style.marker)
    assert set(result.extras["arrows"]) == {
        (o, "sum", s) for o in ("graddiff", "simnpo") for s in ("pcgrad", "sago")
    }
    legend = [t.get_text() for t in result.extras["legend"].get_texts()]
    assert legend == ["sum", "PCGrad", "SAGO", "target model"]  # strategies once, no objective
    plt.close(result.figure)

    # Matched forgetting: the first evaluation after step 0 with forget accuracy <= threshold.
    threshold = 0.5
    matched = gp.tradeoff(runs, at="matched", threshold=threshold, arrows=False)
    sago = [
        r
        for r in runs
        if r.attrs["applied_strategy"] == "sago" and r.attrs["objective"] == "simnpo"
    ]
    expected = []
    for r in sago:
        i = next(
            i for i, e in enumerate(r.evaluation.values) if e > 0 and r.forget_acc[i] <= threshold
        )
        expected.append((float(r.forget_acc[i]), float(r.retain_acc[i])))
    assert matched.extras["points"][("simnpo", "sago")] == pytest.approx(
        tuple(np.mean(expected, axis=0))
    )
    assert matched.axes[0].get_xlabel().startswith("matched-forgetting forget QA accuracy")
    assert "matched forgetting" in matched.figure.get_suptitle()
    plt.close(matched.figure)
    with pytest.raises(ValueError, match="invalid at='best'"):
        gp.tradeoff(runs, at="best")
    with pytest.raises(gp.PlotSkipped, match="no run reached forget accuracy <= 0"):
        gp.tradeoff(runs, at="matched", threshold=0.0)


def test_tradeoff_trajectories_start_at_target(runs, ax) -> None:
    result = gp.tradeoff_trajectories(runs, ax=ax)
    line = result.artists[("graddiff", "sum")]
    assert len(line.get_xdata()) == len(EVALUATIONS)
    assert line.get_xdata()[0] == pytest.approx(float(runs[0].forget_acc[0]))
    assert _on(result.artists.values(), ax)


def test_final_evaluation_table(runs) -> None:
    table = gp.final_evaluation(stack(runs))
    assert list(table["run"]) == ["target"] + [r.attrs["run"] for r in runs]
    assert list(table.columns[-3:]) == ["forget_acc", "retain_acc", "general_acc"]
    last = table.set_index("run").loc[runs[1].attrs["run"]]
    assert last["evaluation"] == EVALUATIONS[-1]
    assert last["retain_acc"] == pytest.approx(float(runs[1].retain_acc[-1]))
    assert table.loc[0, "forget_acc"] == pytest.approx(float(runs[0].forget_acc[0]))


def test_tradeoff_skips_without_evaluations(ax) -> None:
    with pytest.raises(gp.MissingVariable, match="'forget_acc'"):
        gp.tradeoff([make_run("sum", evaluations=None)], ax=ax)
    only_target = make_run("sum", evaluations=(0,))
    with pytest.raises(gp.PlotSkipped, match="after step 0"):
        gp.tradeoff(only_target, ax=ax)
    empty = make_run("sum", evaluations=None).assign(
        forget_acc=("evaluation", np.zeros(0)), retain_acc=("evaluation", np.zeros(0))
    )
    with pytest.raises(gp.PlotSkipped, match="no data"):
        gp.tradeoff(empty, ax=ax)


# --------------------------------------------------------------------------------------------
# Geometry table
# --------------------------------------------------------------------------------------------


def test_geometry_table_means_over_steps(runs) -> None:
    table = gp.geometry_table(runs, view="own")
    assert list(table["strategy"]) == list(STRATEGIES)
    pcgrad = [r for r in runs if r.attrs["applied_strategy"] == "pcgrad"]
    cos = [float(r.geom.metrics()["cos_dr"].sel(strategy="pcgrad").mean()) for r in pcgrad]
    row = table.set_index("strategy").loc["pcgrad"]
    assert row["cos_dr"] == pytest.approx(np.mean(cos))
    assert row["cos_dr_sd"] == pytest.approx(np.std(cos, ddof=1))
    assert row["runs"] == 2 and row["applied"]
    markdown = gp.geometry_table_markdown(table)
    assert "Forget-Retain cos(f, r)" in markdown and "| PCGrad | 2 | 12 |" in markdown
    with pytest.warns(GeomkitDeprecationWarning, match="shadows="):
        shadows = gp.geometry_table(runs, shadows=True)
    assert len(shadows) == len(STRATEGIES) ** 2 and (~shadows["applied"]).sum() == 6


# --------------------------------------------------------------------------------------------
# Inputs, the figure set
# --------------------------------------------------------------------------------------------


def test_several_runs_need_a_choice(runs) -> None:
    stacked = stack(runs)
    with pytest.raises(
        ValueError, match=r"invalid run=None: expected one of graddiff-sum-seed0, .*shows one run"
    ):
        gp.cos_fr_heatmap(stacked)
    result = gp.cos_fr_heatmap(stacked, run="graddiff-pcgrad-seed1")
    expected = runs[3].geom.metrics(by="layer")["cos_fr"].transpose("layer", "record")
    np.testing.assert_allclose(result.artists["heatmap"].get_array(), expected.values)
    plt.close(result.figure)


def test_write_figures_writes_every_figure(tmp_path, runs) -> None:
    audit = pd.DataFrame(
        {"claim": ["R4"], "granularity": ["tensor"], "violation_rate": [0.4], "status": ["fails"]}
    )
    results = gp.write_figures(runs[0], tmp_path, audit=audit, dpi=40)
    skipped = {k: v for k, v in results.items() if isinstance(v, str)}
    assert not skipped
    assert set(results) == {
        *("cos_fr_heatmap", "conflict_heatmap", "alignment"),
        *("alignment_layers_cos_dr", "alignment_layers_cos_df"),
        *("distribution_cos_dr", "distribution_cos_df", "loss_dynamics"),
        *("tradeoff_retain", "tradeoff_general"),
        *("tradeoff_trajectories_retain", "tradeoff_trajectories_general"),
        *("sago_vs_pcgrad", "violation_rates", "geometry_table", "geometry_table_own"),
        *("attribution", "step_alignment", "predicted_vs_realized"),
    }
    for name, paths in results.items():
        if not name.startswith("geometry_table"):
            assert [p.suffix for p in paths] == [".pdf", ".png"], name
            assert paths[0].read_bytes().startswith(b"%PDF")
            assert paths[1].read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "alignment.pdf").exists()
    assert (tmp_path / "geometry_table.md").read_text().startswith("| Method")
    same = pd.read_csv(tmp_path / "geometry_table.csv")  # the default: same gradients
    assert list(same["strategy"]) == list(STRATEGIES) and set(same["view"]) == {"same gradients"}
    assert pd.read_csv(tmp_path / "geometry_table_own.csv").shape[0] == 1
    assert plt.get_fignums() == []


# --------------------------------------------------------------------------------------------
# Every figure of the set: strategy styles, text sizes, widths, arrows
# --------------------------------------------------------------------------------------------


def _base_label(label: str) -> str:
    """A legend label without the ``(shadow)`` / ``(n=2)`` suffixes."""
    for suffix in (" (shadow)",):
        label = label.removesuffix(suffix)
    return label.split(" (n=")[0]


def _legend_entries(figure) -> list[tuple[str, object]]:
    entries = []
    for legend in [*figure.legends, *(a.get_legend() for a in figure.axes)]:
        if legend is not None:
            texts = [t.get_text() for t in legend.get_texts()]
            entries += zip(texts, legend.legend_handles, strict=True)
    for ax in figure.axes:
        entries += [(lab, h) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)]
    return entries


def _style_of(handle) -> tuple[tuple[float, float, float], str | None]:
    """(colour, marker) of a legend handle or data artist (marker None for patches)."""
    from matplotlib.colors import to_rgb
    from matplotlib.container import ErrorbarContainer
    from matplotlib.patches import Patch

    if isinstance(handle, ErrorbarContainer):
        handle = handle[0]
    if isinstance(handle, Patch):
        return to_rgb(handle.get_facecolor()), None
    if hasattr(handle, "get_marker"):
        marker = handle.get_marker()
        if marker in (None, "", "None", "none"):  # no marker (a legend's error-bar line)
            return to_rgb(handle.get_color()), None
        return to_rgb(handle.get_markerfacecolor()), marker
    faces = handle.get_facecolor()  # a collection: a violin body, or error-bar lines
    return to_rgb(faces[0] if len(faces) else handle.get_edgecolor()[0]), None


_TEXT_SIZE_PENDING: set[str] = set()
"""Figures whose text sizes another change of issue 10 fixes (C12: the violation-rate labels,
plot/theorem.py); the lead empties this set when merging it."""


def _inspect(figure, name: str, seen: dict) -> None:
    """Assert what every saved figure must satisfy; record strategy styles in ``seen``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from geomkit.plot.style import DOUBLE_COLUMN, MIN_FONT_SIZE, SINGLE_COLUMN

    labels = {style.label: key for key, style in gp.STRATEGY_STYLES.items()}
    width = figure.get_figwidth()
    assert width in (SINGLE_COLUMN, DOUBLE_COLUMN), (name, width)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # the layout at the figure's own dpi
    printed = figure.get_tightbbox(canvas.get_renderer()).width  # inches, saved (tight bbox)
    shrink = min(1.0, width / printed)  # a wider saved figure is scaled down to the width
    for text in figure.findobj(Text):
        axes = text.axes
        hidden = not text.get_visible() or (axes is not None and not axes.get_visible())
        if hidden or not text.get_text().strip() or name in _TEXT_SIZE_PENDING:
            continue
        size = text.get_fontsize() * shrink
        assert size >= MIN_FONT_SIZE - 1e-9, (name, text.get_text(), size)
    for label, handle in _legend_entries(figure):
        strategy = labels.get(_base_label(label))
        if strategy is None:
            continue
        colour, marker = _style_of(handle)
        expected = gp.strategy_style(strategy)
        assert colour == pytest.approx(expected.color, abs=1e-6), (name, label, colour)
        if marker is not None:
            assert marker == expected.marker, (name, label, marker)
        seen.setdefault(strategy, set()).add(name)
    for ax in figure.axes:  # arrows (trade-off): open grey heads, never a strategy's marker
        for child in ax.get_children():
            if isinstance(child, matplotlib.text.Annotation) and child.arrow_patch is not None:
                _assert_arrow_is_no_marker(child, figure)


def _walk_figure_set(monkeypatch, source, out, **kwargs) -> tuple[dict, dict]:
    """write_figures on ``source`` with every figure inspected just after it is saved."""
    import geomkit.plot.figureset as figureset

    seen: dict[str, set[str]] = {}
    inspected: list[str] = []
    real_save = figureset.save

    def save(fig, stem, formats, *, dpi):
        paths = real_save(fig, stem, formats, dpi=dpi)
        name = f"{stem.parent.name}/{stem.name}" if stem.parent != out else stem.name
        _inspect(fig, name, seen)
        inspected.append(name)
        return paths

    monkeypatch.setattr(figureset, "save", save)
    results = gp.write_figures(source, out, formats=("png",), dpi=30, **kwargs)
    tables = ("geometry_table", "geometry_table_own")
    written = [k for k, v in results.items() if not isinstance(v, str) and k not in tables]
    assert len(inspected) == len(written) > 0
    return results, seen


def test_every_figure_one_style_per_strategy_and_readable_text(monkeypatch, tmp_path) -> None:
    runs = [
        make_run(s, objective=o, seed=seed)
        for o in ("graddiff", "simnpo")
        for s in STRATEGIES
        for seed in (0, 1)
    ]
    audit = pd.DataFrame(
        {"claim": ["R4"], "granularity": ["tensor"], "violation_rate": [0.4], "status": ["fails"]}
    )
    first = runs[0].attrs["run"]
    results, seen = _walk_figure_set(monkeypatch, runs, tmp_path, audit=audit, per_run=[first])
    assert not {k: v for k, v in results.items() if isinstance(v, str)}
    # Every strategy appears, styled alike, in the per-run and in the set figures.
    for strategy in STRATEGIES:
        assert f"{first}/alignment" in seen[strategy]
        assert {"loss_dynamics", "tradeoff_retain", "tradeoff_trajectories_retain"} <= seen[
            strategy
        ]
    assert plt.get_fignums() == []


def test_palette_has_distinct_hues() -> None:
    """Chromatic strategy colours differ in CIELAB hue by >= 20 degrees (the old sum and
    prefer-retain blues differed by 14); achromatic ones differ in lightness by >= 30."""

    def lab(rgb) -> np.ndarray:
        c = np.asarray(rgb, dtype=np.float64)
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
        xyz = m @ c / np.array([0.95047, 1.0, 1.08883])
        f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
        return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])

    colours = {name: lab(style.color) for name, style in gp.STRATEGY_STYLES.items()}
    markers = [style.marker for style in gp.STRATEGY_STYLES.values()]
    assert len(set(markers)) == len(markers)
    names = list(colours)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (_, aa, ba), (_, ab, bb) = colours[a], colours[b]
            if np.hypot(aa, ba) > 20 and np.hypot(ab, bb) > 20:
                gap = abs(np.degrees(np.arctan2(ba, aa) - np.arctan2(bb, ab)))
                assert min(gap, 360 - gap) >= 20, (a, b)
            else:
                assert np.linalg.norm(colours[a] - colours[b]) >= 30, (a, b)


def test_write_figures_skips_with_a_message(tmp_path, caplog) -> None:
    single = make_run("sum", evaluations=None, shadows=("sum", "sago"))
    with caplog.at_level(logging.WARNING, logger="geomkit.plot"):
        results = gp.write_figures(single, tmp_path, formats=("png",), dpi=40)
    assert results["tradeoff_retain"].startswith("skipped:")
    assert "'forget_acc'" in results["tradeoff_retain"]
    assert "'pcgrad'" in results["sago_vs_pcgrad"]
    assert results["violation_rates"].startswith("skipped: no audit frame")
    assert [p.name for p in results["cos_fr_heatmap"]] == ["cos_fr_heatmap.png"]
    assert any("tradeoff_retain" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "tradeoff_retain.png").exists()


# --------------------------------------------------------------------------------------------
# A real recorded run (the smoke preset: tiny model, 4 steps)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plot_smoke_runs(smoke_runs):
    status, out = smoke_runs  # the session's smoke `geomkit run` (tests/conftest.py)
    assert status == 0
    return out


def test_real_run_figure_set(plot_smoke_runs, tmp_path, monkeypatch) -> None:
    import geomkit

    stacked = geomkit.open_runs(plot_smoke_runs)
    # Every figure inspected: strategy styles, widths, text sizes, arrows (as above).
    results, seen = _walk_figure_set(monkeypatch, plot_smoke_runs, tmp_path)
    assert {"sum", "pcgrad", "sago"} <= set(seen)
    skipped = {k for k, v in results.items() if isinstance(v, str)}
    evaluated = "forget_acc" in stacked and stacked.sizes.get("evaluation", 0) > 0
    allowed = {"violation_rates"} | (set() if evaluated else {n for n in results if "trade" in n})
    # the smoke runs record the step but not the losses after it (no --record-realized)
    allowed.add("predicted_vs_realized")
    assert "record_realized" in results["predicted_vs_realized"]
    assert skipped <= allowed, {k: results[k] for k in skipped - allowed}
    assert {"step_alignment", f"{stacked['run'].values[0]}/attribution"} <= set(results)
    for run_label in stacked["run"].values:
        assert (tmp_path / str(run_label) / "cos_fr_heatmap.png").exists()
        assert f"{run_label}/alignment" in results
    table = gp.geometry_table(stacked, view="own")
    assert sorted(table["strategy"]) == ["pcgrad", "sago", "sum"]
    assert table[["cos_fr", "cos_dr", "cos_df"]].abs().le(1).all().all()
    assert (table.set_index("strategy")["cos_dr"] >= -1e-9).loc[["pcgrad", "sago"]].all()
    assert plt.get_fignums() == []


def test_real_audit_frame(plot_smoke_runs, ax) -> None:
    import geomkit
    from geomkit import theory

    stacked = geomkit.open_runs(plot_smoke_runs)
    frame = theory.audit(stacked).to_frame()
    result = gp.violation_rates(frame, objectives=stacked, ax=ax)
    table = result.extras["table"]
    assert len(result.artists) == len(table) > 0
    assert set(table["claim"]) == set(frame["claim"])
    rates = table["violation_rate"].dropna()
    assert ((rates >= 0) & (rates <= 1)).all()


def test_layer_heatmap_names_a_bad_grouping() -> None:
    from geomkit.plot import layer_heatmap

    with pytest.raises(ValueError, match=r"layer_heatmap: invalid by='model': expected one of"):
        layer_heatmap(xr.Dataset(), by="model")


def test_gallery_shows_every_figure() -> None:
    """docs/figures.md embeds every figure write_figures draws, from the paths `geomkit
    figures` writes (set figures in figures/, per-run ones in figures/<run>/)."""
    from pathlib import Path

    from geomkit.plot.figureset import RUN_FIGURES, SET_FIGURES

    text = (Path(__file__).resolve().parents[1] / "docs" / "figures.md").read_text()
    for name in [*SET_FIGURES, "violation_rates"]:
        assert f"](../figures/{name}.png)" in text, name
    for name in RUN_FIGURES:
        assert f"](../figures/graddiff-sago-seed0/{name}.png)" in text, name


# --------------------------------------------------------------------------------------------
# The step the optimizer took (schema version 3): step_alignment, attribution,
# predicted_vs_realized, on tiny engine runs and on synthetic and old stores
# --------------------------------------------------------------------------------------------

STEP_RECORDS = 3


def _step_run(out, strategy: str, **config) -> xr.Dataset:
    """A tiny GradDiff run of the engine (AdamW), every step recorded; opened."""
    import torch
    from tiny import VOCAB, tiny_llama

    import geomkit
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    def batches(seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, VOCAB, (4, 12), generator=g) for _ in range(2)]
        return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]

    settings = dict(
        strategy=strategy, steps=STEP_RECORDS, lr=1e-3, warmup_ratio=0.0, record_every=1
    )
    settings.update(config)
    Unlearner(
        tiny_llama(0),
        build_objective("graddiff"),
        batches(1),
        batches(2),
        EngineConfig(**settings),
        out,
    ).run()
    return geomkit.open_run(out)


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory) -> list[xr.Dataset]:
    """sum, PCGrad and SAGO applied, with the step and the losses after it recorded."""
    root = tmp_path_factory.mktemp("step_runs")
    return [_step_run(root / s, s, record_realized=True) for s in STRATEGIES]


@pytest.fixture(scope="module")
def stepless_run(tmp_path_factory) -> xr.Dataset:
    """A run recorded with record_step=False: the step fields are NaN."""
    return _step_run(tmp_path_factory.mktemp("stepless") / "run", "sago", record_step=False)


def _old_store(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as a store of schema version 2 opens: no step fields, no losses after the step."""
    names = [*STEP_STATISTICS, "forget_loss_after", "retain_loss_after"]
    return ds.drop_vars([n for n in names if n in ds]).assign_attrs(schema_version=2)


STEP_FIGURES = ("step_alignment", "attribution", "predicted_vs_realized")


def test_step_runs_have_the_step_fields(step_runs) -> None:
    for ds in step_runs:
        assert ds.sizes["record"] == STEP_RECORDS
        assert np.isfinite(ds["uu"].values).all() and np.isfinite(ds["forget_loss_after"]).all()


def test_step_alignment_one_point_per_record_and_strategy(step_runs) -> None:
    result = gp.step_alignment(step_runs)
    assert len(result.axes) == 2  # one objective: the r and the f panel
    assert set(result.extras["panels"]) == {("graddiff", "r"), ("graddiff", "f")}
    for ds in step_runs:
        applied = ds.attrs["applied_strategy"]
        model = ds.geom.metrics(by="model")
        for pair, (of_d, of_u) in {"r": ("cos_dr", "cos_ur"), "f": ("cos_df", "cos_uf")}.items():
            line = result.artists[("graddiff", pair, applied)]
            # one point per recorded step: cos(d, .) of the applied strategy, cos(u, .)
            np.testing.assert_allclose(line.get_xdata(), model[of_d].sel(strategy=applied))
            np.testing.assert_allclose(line.get_ydata(), model[of_u])
            assert len(line.get_xdata()) == STEP_RECORDS
            style = gp.strategy_style(applied)
            assert line.get_marker() == style.marker and line.get_linestyle() == "None"
            assert line.get_color() == style.color
            assert (
                line.get_label() == style.label
                and line.axes is result.extras["panels"][("graddiff", pair)]
            )
    for pair in ("r", "f"):
        panel = result.extras["panels"][("graddiff", pair)]
        diagonal = result.artists[("graddiff", pair, "diagonal")]
        assert diagonal.get_label() == "y = x" and diagonal._slope == 1.0
        # square panel with the zero lines (the horizontal and vertical axis lines)
        assert panel.get_xlim() == panel.get_ylim()
        flat = [ln for ln in panel.get_lines() if len(ln.get_xdata()) == 2]
        assert {tuple(ln.get_ydata()) for ln in flat} >= {(0.0, 0.0)}
        assert {tuple(ln.get_xdata()) for ln in flat} >= {(0.0, 0.0)}
        assert panel.get_ylabel() == f"cos(u, {pair}) of the step u"
    points = result.extras["points"]
    assert len(points) == 2 * STEP_RECORDS * len(step_runs) and result.extras["left_out"] == []
    legend = [t.get_text() for t in result.extras["legend"].get_texts()]
    assert legend == ["sum", "PCGrad", "SAGO", "y = x"]
    plt.close(result.figure)


def test_step_alignment_per_layer_points_and_panels_per_objective(step_runs) -> None:
    layered = gp.step_alignment(step_runs[:1], pairs=("r",), layers=True)
    layers = step_runs[0].geom.metrics(by="layer")
    small = layered.artists[("graddiff", "r", "sum", "layers")]
    assert len(small.get_xdata()) == STEP_RECORDS * layers.sizes["layer"]
    np.testing.assert_allclose(np.sort(small.get_ydata()), np.sort(layers["cos_ur"].values.ravel()))
    assert len(layered.axes) == 1
    plt.close(layered.figure)
    runs = [make_run(s, objective=o) for o in ("simnpo", "graddiff") for s in STRATEGIES]
    fig, axes = plt.subplots(2, 2)
    result = gp.step_alignment(runs, ax=axes)
    assert list(result.extras["panels"]) == [
        ("graddiff", "r"),
        ("graddiff", "f"),
        ("simnpo", "r"),
        ("simnpo", "f"),
    ]
    assert result.extras["panels"][("simnpo", "f")] is axes[1, 1]
    assert len(result.artists[("simnpo", "f", "pcgrad")].get_xdata()) == RECORDS
    plt.close(fig)
    with pytest.raises(ValueError, match="invalid pairs='d'"):
        gp.step_alignment(runs, pairs=("d",))


def test_attribution_shares_sum_to_one(step_runs) -> None:
    ds = step_runs[2]  # SAGO applied
    result = gp.attribution(ds)
    shares = result.extras["shares"]
    layers = ds.geom.metrics(by="layer")
    model = ds.geom.metrics(by="model")
    assert shares["forget"].dims == ("layer", "record")
    for loss, metric in (("forget", "pred_forget_change"), ("retain", "pred_retain_change")):
        total = model[metric].values
        assert (np.abs(total) > 0).all()
        # exact and additive: the shares of the layers sum to 1 at every step
        np.testing.assert_allclose(shares[loss].sum("layer").values, 1.0, rtol=1e-9)
        np.testing.assert_allclose(
            shares[loss].values, (layers[metric] / model[metric]).transpose().values
        )
        mesh = result.artists[loss]
        assert mesh.get_array().shape == (layers.sizes["layer"], STEP_RECORDS)
        np.testing.assert_allclose(mesh.get_array(), shares[loss].values)
        # the model's change drawn above, in the applied strategy's style
        line = result.artists[(loss, "total")]
        np.testing.assert_allclose(line.get_ydata(), total)
        assert line.get_marker() == gp.strategy_style("sago").marker
    low, high = result.extras["scale"]
    assert low == -high > -np.inf and result.artists["forget"].norm.vmin == low
    assert result.artists["retain"].norm is result.artists["forget"].norm
    heat = result.axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["outside blocks", "0", "1"]
    label = result.extras["colorbar"].ax.get_xlabel()
    assert "each column sums to 1" in label and "< 0 (blue): against it" in label
    assert len(result.axes) == 4  # two heatmaps, two model-total strips
    plt.close(result.figure)


def test_attribution_nan_where_the_model_change_is_zero_and_hatches_tiny_ones() -> None:
    ds = make_run("sago")
    uf = ds["uf"].values.copy()
    uf[0] = [0.5, -0.5, 0.0, 0.0, 0.0]  # the model's -<u, f> is 0 at record 0
    uf[1] *= 1e-6 / abs(uf[1].sum())  # ... and tiny at record 1
    ds = ds.assign(uf=(("record", "tensor"), uf))
    shares = gp.step_shares(ds)
    assert np.isnan(shares["forget"].sel(record=0)).all()
    finite = shares["forget"].isel(record=slice(1, None))
    np.testing.assert_allclose(finite.sum("layer"), 1.0, rtol=1e-9)
    np.testing.assert_allclose(shares["retain"].sum("layer"), 1.0, rtol=1e-9)
    fig, axes = plt.subplots(1, 2)
    result = gp.attribution(ds, ax=axes, vmax=0.5)
    assert result.extras["scale"] == (-0.5, 0.5)
    assert list(result.extras["unstable"]["forget"]) == [1]
    assert list(result.extras["unstable"]["retain"]) == []
    hatched = [p for p in axes[0].patches if p.get_hatch()]
    assert len(hatched) == 1 and "hatched" in result.extras["colorbar"].ax.get_xlabel()
    assert result.axes == list(axes)  # given axes: no model-total strips
    plt.close(fig)


def test_predicted_vs_realized_points(step_runs) -> None:
    result = gp.predicted_vs_realized(step_runs)
    assert len(result.axes) == 2
    for ds in step_runs:
        applied = ds.attrs["applied_strategy"]
        model = ds.geom.metrics(by="model")
        steps = ds["record"].values
        for loss in ("forget", "retain"):
            line = result.artists[("graddiff", loss, applied)]
            realised = (ds[f"{loss}_loss_after"] - ds[f"{loss}_loss"]).sel(step=steps)
            np.testing.assert_allclose(line.get_xdata(), model[f"pred_{loss}_change"])
            np.testing.assert_allclose(line.get_ydata(), realised)
            assert len(line.get_xdata()) == STEP_RECORDS
            assert line.get_marker() == gp.strategy_style(applied).marker
            # first order: the same sign, close to the prediction at lr 1e-3
            assert (np.sign(line.get_xdata()) == np.sign(line.get_ydata())).all()
        assert result.artists[("graddiff", "forget", "diagonal")].get_label() == "y = x"
    panel = result.extras["panels"][("graddiff", "forget")]
    assert panel.get_xlim() == panel.get_ylim()
    assert "-<u, f>" in panel.get_xlabel() and "after - before" in panel.get_ylabel()
    plt.close(result.figure)


@pytest.mark.parametrize("figure", STEP_FIGURES)
def test_step_figures_skip_old_stores_with_a_reason(figure, stepless_run) -> None:
    old = _old_store(make_run("sago"))
    with pytest.raises(gp.MissingVariable, match=r"schema version < 3") as missing:
        getattr(gp, figure)(old)
    assert missing.value.variable == "uu"
    with pytest.raises(gp.PlotSkipped, match=r"record_step=False") as nan:
        getattr(gp, figure)(stepless_run)
    assert not isinstance(nan.value, gp.MissingVariable)  # present, all NaN
    assert plt.get_fignums() == []


def test_predicted_vs_realized_skips_without_realised_losses(step_runs) -> None:
    without = make_run("sum", realized=False)
    reason = r"no losses evaluated after the steps of run 'graddiff-sum-seed0'"
    with pytest.raises(gp.PlotSkipped, match=reason):
        gp.predicted_vs_realized(without)
    # a run without them is left out beside runs with them
    result = gp.predicted_vs_realized([*step_runs, without])
    assert result.extras["left_out"] == [without.attrs["run"]]
    assert len(result.extras["points"]) == 2 * STEP_RECORDS * len(step_runs)
    plt.close(result.figure)


def test_write_figures_skips_the_step_figures_of_old_stores(tmp_path) -> None:
    results = gp.write_figures(_old_store(make_run("sago")), tmp_path, formats=("png",), dpi=30)
    for name in STEP_FIGURES:
        assert results[name].startswith(f"skipped: {name}: no step statistics"), results[name]
        assert not (tmp_path / f"{name}.png").exists()
    assert [p.name for p in results["alignment"]] == ["alignment.png"]


def test_write_figures_draws_the_step_figures(tmp_path, step_runs) -> None:
    results = gp.write_figures(step_runs, tmp_path, formats=("png",), dpi=30, per_run=["sago"])
    for name in ("step_alignment", "predicted_vs_realized"):  # the whole set, in the top folder
        assert [p.name for p in results[name]] == [f"{name}.png"]
    # per run, in the run's folder (the run's label is its directory's name)
    assert results["sago/attribution"] == [tmp_path / "sago" / "attribution.png"]


@pytest.mark.parametrize("method", STEP_FIGURES)
def test_geom_plot_step_shortcuts(method, step_runs) -> None:
    ds = step_runs[0]
    result = getattr(ds.geom.plot, method)()
    direct = getattr(gp, method)(ds)
    assert list(result.artists) == list(direct.artists) and result.artists
    assert method in repr(ds.geom.plot)
    plt.close("all")
