"""Tests for geomkit.recorder: schedules, the per-step hook and what it writes.

Layout:

1. schedules: which steps :class:`Every` and :class:`LogSpaced` pick, and their errors;
2. statistics: what :meth:`Recorder.record` stores for the applied strategy and every shadow
   equals :func:`geomkit.statistics.sufficient` / :func:`~geomkit.statistics.shadow` on the
   same gradients, and the metrics of ``ds.geom`` at model, layer and component level equal an
   independent NumPy computation on the concatenated gradients (with layers and components of
   a tiny ``transformers`` Llama's parameter names worked out by hand);
3. the ``strategy`` axis: the applied strategy first, never duplicated, ``measured`` only for
   it; an update formed by the recorder itself equals the one passed in;
4. the hook's contract: increasing steps, gradients on scheduled steps, skipped steps, and
   calls that fail leave nothing behind.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from tiny import tiny_llama

import geomkit
from geomkit import statistics as gstats
from geomkit.metrics import FIELDS
from geomkit.recorder import Every, LogSpaced, Recorder
from geomkit.store import VERIFIED_FIELDS
from geomkit.strategies import build, names

F = {name: i for i, name in enumerate(FIELDS)}
PAIR = ("ff", "rr", "fr", "n_conflict", "n_both_nonzero")
UPDATE = ("dd", "df", "dr", "n_opposed", "n_projected")


# ----------------------------------------------------------------------------------------------
# 1. Schedules
# ----------------------------------------------------------------------------------------------


def test_every_picks_multiples() -> None:
    picked = [s for s in range(20) if Every(3)(s)]
    assert picked == [0, 3, 6, 9, 12, 15, 18]
    assert all(Every(1)(s) for s in range(10))
    assert Every() == Every(1)


def test_logspaced_is_dense_early_then_ten_per_decade() -> None:
    schedule = LogSpaced(10)
    picked = [s for s in range(10_000) if schedule(s)]
    # every step below 10, then the first step s with s + 1 >= 10 ** (j / 10), j = 11, 12, ...
    # (12.59 -> 12, 15.85 -> 15, 19.95 -> 19, 25.12 -> 25, 31.62 -> 31, 39.81 -> 39,
    #  50.12 -> 50, 63.10 -> 63, 79.43 -> 79, 100 -> 99)
    assert picked[:20] == [*range(10), 12, 15, 19, 25, 31, 39, 50, 63, 79, 99]
    expected = list(range(10)) + [math.ceil(10 ** (j / 10)) - 1 for j in range(11, 41)]
    assert picked == expected
    # exactly ten recorded steps per decade [10^k - 1, 10^(k+1) - 1) after the first
    for k in (1, 2, 3):
        lo, hi = 10**k - 1, 10 ** (k + 1) - 1
        assert sum(lo <= s < hi for s in picked) == 10
    # per_decade = 1 records 0, then 9, 99, 999
    assert [s for s in range(2000) if LogSpaced(1)(s)] == [0, 9, 99, 999]


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "3", None])
def test_every_rejects_invalid_k(k) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(k))):
        Every(k)


@pytest.mark.parametrize("k", [0, -1, 1.5, False, "10"])
def test_logspaced_rejects_invalid_per_decade(k) -> None:
    with pytest.raises(ValueError, match=re.escape(str(k))):
        LogSpaced(k)


def test_recorder_schedule_argument(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "a.zarr", ["w"], [3], "sum", schedule=4)
    assert rec.schedule == Every(4)
    assert [s for s in range(10) if rec.wants(s)] == [0, 4, 8]
    with pytest.raises(TypeError, match="schedule"):
        Recorder(tmp_path / "b.zarr", ["w"], [3], "sum", schedule="often")
    with pytest.raises(ValueError, match="flush_every"):
        Recorder(tmp_path / "c.zarr", ["w"], [3], "sum", flush_every=0)


# ----------------------------------------------------------------------------------------------
# Helpers: a tiny Llama's parameter names, random gradients, hand-made layer/component maps
# ----------------------------------------------------------------------------------------------


def llama_parameters() -> list[tuple[str, torch.Size]]:
    model = tiny_llama(0)
    return [(n, p.shape) for n, p in model.named_parameters()]


PARAMS = llama_parameters()
PARAM_NAMES = [n for n, _ in PARAMS]
PARAM_NUMEL = [math.prod(s) for _, s in PARAMS]

_COMPONENT_BY_SUFFIX = {
    "embed_tokens": "embed",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_o",
    "gate_proj": "mlp_gate",
    "up_proj": "mlp_up",
    "down_proj": "mlp_down",
    "input_layernorm": "norm",
    "post_attention_layernorm": "norm",
    "norm": "norm",
    "lm_head": "lm_head",
}


def hand_layer(name: str) -> int:
    match = re.search(r"\blayers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def hand_component(name: str) -> str:
    return _COMPONENT_BY_SUFFIX[name.split(".")[-2]]


def random_gradients(seed: int, dtype=torch.float32) -> tuple[list, list]:
    """Forget/retain gradients shaped like the tiny Llama's parameters, with exact zeros
    (both signs) in some coordinates so that the sign test sees them."""
    g = torch.Generator().manual_seed(seed)
    forget, retain = [], []
    for j, (_, shape) in enumerate(PARAMS):
        f = torch.randn(shape, generator=g, dtype=dtype) * 10 ** (j % 3 - 1)
        r = torch.randn(shape, generator=g, dtype=dtype) + 0.3 * f  # mildly correlated
        if j % 4 == 1:  # a correlated-against tensor, so the projections fire
            r = -r
        flat_f, flat_r = f.view(-1), r.view(-1)
        flat_f[::7] = 0.0
        flat_r[3::11] = -0.0
        forget.append(f)
        retain.append(r)
    return forget, retain


def as64(tensors) -> list[np.ndarray]:
    return [t.detach().double().numpy() for t in tensors]


def np_metrics(fs, rs, ds, groups: list) -> dict:
    """cos_fr, cos_dr, cos_df and the conflict rate per group label, from concatenated
    float64 vectors (nothing from geomkit)."""
    out = {}
    for label in dict.fromkeys(groups):
        idx = [j for j, g in enumerate(groups) if g == label]
        f = np.concatenate([fs[j].ravel() for j in idx])
        r = np.concatenate([rs[j].ravel() for j in idx])
        d = np.concatenate([ds[j].ravel() for j in idx])
        conflict = ((f > 0) & (r < 0)) | ((f < 0) & (r > 0))
        out[label] = {
            "cos_fr": f @ r / (np.linalg.norm(f) * np.linalg.norm(r)),
            "cos_dr": d @ r / (np.linalg.norm(d) * np.linalg.norm(r)),
            "cos_df": d @ f / (np.linalg.norm(d) * np.linalg.norm(f)),
            "conflict_rate": conflict.sum() / f.size,
        }
    return out


# ----------------------------------------------------------------------------------------------
# 2. Stored statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("applied", ["sago", "pcgrad", "blur"])
def test_recorded_statistics_equal_statistics_module_and_numpy(
    tmp_path: Path, applied: str
) -> None:
    path = tmp_path / "run.zarr"
    alpha, gamma = 0.8, 1.3
    rec = Recorder(
        path,
        PARAM_NAMES,
        PARAM_NUMEL,
        applied,
        alpha=alpha,
        gamma=gamma,
        flush_every=2,
        attrs={"model": "tiny"},
    )
    strategy = build(applied, alpha=alpha, gamma=gamma)
    shadows = [build(n, alpha=alpha, gamma=gamma) for n in names() if n != applied]
    assert rec.strategy_labels == [applied] + [s.name for s in shadows]

    inputs = [random_gradients(seed) for seed in range(2)]
    for step, (f, r) in enumerate(inputs):
        rec.record(step, f, r, strategy(f, r), forget_loss=float(step), learning_rate=1e-3)
    rec.close()

    ds = geomkit.open_run(path).load()
    np.testing.assert_array_equal(ds["record"].values, [0, 1])
    assert ds.attrs["alpha"] == alpha and ds.attrs["gamma"] == gamma
    assert ds.attrs["applied_strategy"] == applied
    # coordinates of a Llama's parameters, worked out by hand
    assert list(ds["tensor"].values) == PARAM_NAMES
    assert list(ds["layer"].values) == [hand_layer(n) for n in PARAM_NAMES]
    assert list(ds["component"].values) == [hand_component(n) for n in PARAM_NAMES]
    np.testing.assert_array_equal(ds["numel"].values, PARAM_NUMEL)

    derived = {by: ds.geom.metrics(by=by) for by in ("model", "layer", "component")}
    for i, (f, r) in enumerate(inputs):
        d = strategy(f, r)
        want = gstats.to_numpy(gstats.sufficient(f, r, d, strategy=strategy))  # [T, F]
        want_shadow = gstats.to_numpy(gstats.shadow(f, r, shadows))  # [S-1, T, F]
        for name in PAIR:
            np.testing.assert_array_equal(ds[name].values[i], want[:, F[name]], err_msg=name)
        for name in UPDATE:
            got = ds[name].values[i]
            np.testing.assert_array_equal(got[0], want[:, F[name]], err_msg=name)
            np.testing.assert_array_equal(got[1:], want_shadow[..., F[name]], err_msg=name)

        # independent NumPy: model, layer and component metrics of the applied update
        fs, rs = as64(f), as64(r)
        d_ref = ref.combine(applied, fs, rs, alpha=alpha, gamma=gamma)
        for by, groups in (
            ("model", ["all"] * len(PARAM_NAMES)),
            ("layer", [hand_layer(n) for n in PARAM_NAMES]),
            ("component", [hand_component(n) for n in PARAM_NAMES]),
        ):
            metrics = derived[by].isel(record=i).sel(strategy=applied)
            for label, want_m in np_metrics(fs, rs, d_ref, groups).items():
                got_m = metrics if by == "model" else metrics.sel({by: label})
                for key, value in want_m.items():
                    np.testing.assert_allclose(
                        float(got_m[key]), value, rtol=1e-6, atol=1e-9, err_msg=(by, label, key)
                    )


def test_shadow_updates_match_materialised_reference(tmp_path: Path) -> None:
    """Every shadow strategy's <d,d>, <d,f>, <d,r> equal those of the update the float64
    reference forms explicitly (so the stored shadows are the strategies they are named)."""
    path = tmp_path / "run.zarr"
    rec = Recorder(path, PARAM_NAMES, PARAM_NUMEL, "sum", alpha=0.5, gamma=2.0)
    f, r = random_gradients(11)
    rec.record(0, f, r)
    rec.close()
    ds = geomkit.open_run(path)
    fs, rs = as64(f), as64(r)
    for label in ds["strategy"].values:
        d_ref = ref.combine(str(label), fs, rs, alpha=0.5, gamma=2.0)
        row = ds.sel(strategy=label).isel(record=0)
        # shadows are exact float64 moments; the applied row measures the float32 update
        rtol = 1e-6 if bool(row["measured"]) else 1e-9
        for key, other in (("dd", d_ref), ("df", fs), ("dr", rs)):
            want = [float(np.sum(a * b)) for a, b in zip(d_ref, other, strict=True)]
            scale = [float(np.sum(np.abs(a * b))) for a, b in zip(d_ref, other, strict=True)]
            np.testing.assert_allclose(
                row[key].values, want, rtol=rtol, atol=rtol * max(scale), err_msg=(label, key)
            )


# ----------------------------------------------------------------------------------------------
# 3. The strategy axis
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("applied", ["pcgrad", "sago_prefer_retain"])
def test_recorder_without_the_update_records_closed_forms(tmp_path: Path, applied: str) -> None:
    f, r = random_gradients(5)
    strategy = build(applied, alpha=0.5)
    with Recorder(tmp_path / "own.zarr", PARAM_NAMES, PARAM_NUMEL, applied, alpha=0.5) as rec:
        rec.record(0, f, r)  # combined=None: closed forms; the update is materialised once
    with Recorder(
        tmp_path / "given.zarr", PARAM_NAMES, PARAM_NUMEL, applied, alpha=0.5
    ) as rec_given:
        rec_given.record(0, f, r, strategy(f, r))
    own, given = geomkit.open_run(tmp_path / "own.zarr"), geomkit.open_run(tmp_path / "given.zarr")
    assert own.attrs["applied_statistics"] == "closed_form"
    assert given.attrs["applied_statistics"] == "measured"
    for name in (*PAIR, "n_projected"):  # float64 sums in another order
        np.testing.assert_allclose(own[name].values, given[name].values, rtol=1e-12, err_msg=name)
    # the applied row: closed form (float64, d never rounded) vs the float32 update measured
    for name in ("dd", "df", "dr"):
        np.testing.assert_allclose(
            own[name].values[:, 0], given[name].values[:, 0], rtol=1e-5, err_msg=name
        )
        np.testing.assert_allclose(  # the shadows are closed forms in both
            own[name].values[:, 1:], given[name].values[:, 1:], rtol=1e-12, err_msg=name
        )
    # at the verified first record, the materialised applied update is the measured one
    for name in VERIFIED_FIELDS:
        np.testing.assert_array_equal(
            own[f"verified_{name}"].values[:, 0], given[name].values[:, 0], err_msg=name
        )

    labels = list(own["strategy"].values)
    assert labels[0] == applied
    assert labels.count(applied) == 1
    assert sorted(labels) == sorted(names())
    assert list(own["measured"].values) == [True] + [False] * (len(labels) - 1)
    assert list(own["measured"].sel(strategy=applied).values.ravel()) == [True]


def test_measured_row_is_the_update_passed_in(tmp_path: Path) -> None:
    """The applied row measures the update actually passed, even when it is not what the
    strategy would form (e.g. an update modified by a hand-written loop)."""
    f, r = random_gradients(6)
    d = [2.0 * x for x in f]
    with Recorder(tmp_path / "r.zarr", PARAM_NAMES, PARAM_NUMEL, "sago", shadows=[]) as rec:
        rec.record(0, f, r, d)
    ds = geomkit.open_run(tmp_path / "r.zarr")
    assert list(ds["strategy"].values) == ["sago"]
    want_dd = [4.0 * float(np.sum(x * x)) for x in as64(f)]
    np.testing.assert_allclose(ds["dd"].values[0, 0], want_dd, rtol=1e-12)


def test_explicit_shadow_list_drops_the_applied_strategy(tmp_path: Path) -> None:
    rec = Recorder(
        tmp_path / "r.zarr", ["w"], [4], "sago", shadows=["pcgrad", "sago", "sum", "sago"]
    )
    assert rec.strategy_labels == ["sago", "pcgrad", "sum"]


@pytest.mark.parametrize("alpha, gamma", [(0.5, 1.0), (1.0, 2.0)])
def test_applied_strategy_object_is_not_duplicated_among_default_shadows(
    tmp_path: Path, alpha: float, gamma: float
) -> None:
    """Given as a Strategy object with its own weights, the applied strategy still appears
    once, and the shadows are evaluated with the applied weights (paired comparisons)."""
    applied = build("sago", alpha=alpha, gamma=gamma)
    rec = Recorder(tmp_path / "r.zarr", PARAM_NAMES, PARAM_NUMEL, applied)
    assert rec.strategy_labels.count("sago") == 1, rec.strategy_labels
    assert len(set(rec.strategy_labels)) == len(rec.strategy_labels)
    assert all((s.alpha, s.gamma) == (alpha, gamma) for s in rec.strategies)


# ----------------------------------------------------------------------------------------------
# 4. The hook's contract
# ----------------------------------------------------------------------------------------------


def small_recorder(path: Path, **kwargs) -> Recorder:
    return Recorder(path, ["a.weight", "b.weight"], [6, 4], "sago", **kwargs)


def small_grads(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(2, 3, generator=g), torch.randn(4, generator=g)],
        [torch.randn(2, 3, generator=g), torch.randn(4, generator=g)],
    )


@pytest.mark.parametrize("flush_every", [1, 2, 100])
def test_steps_must_increase(tmp_path: Path, flush_every: int) -> None:
    """Also across flushes: a step already written may not be recorded again."""
    f, r = small_grads()
    rec = small_recorder(tmp_path / "r.zarr", flush_every=flush_every)
    rec.record(0, f, r)
    rec.record(1, f, r)
    for bad in (1, 0):
        with pytest.raises(ValueError, match=f"invalid step={bad}: expected a step after step 1"):
            rec.record(bad, f, r)
    rec.record(3, f, r)
    rec.close()
    np.testing.assert_array_equal(geomkit.open_run(tmp_path / "r.zarr")["step"].values, [0, 1, 3])


def test_missing_gradients_on_a_scheduled_step(tmp_path: Path) -> None:
    f, r = small_grads()
    rec = small_recorder(tmp_path / "r.zarr", schedule=2)
    rec.record(0, f, r)
    rec.record(1)  # not scheduled: no gradients needed
    with pytest.raises(ValueError, match="step 2"):
        rec.record(2)
    with pytest.raises(ValueError, match="step 4"):
        rec.record(4, forget=f)


@pytest.mark.parametrize(
    "bad_call, message",
    [
        (lambda rec, f, r: rec.record(1, forget_loss=2.0), "step 1"),  # gradients forgotten
        (lambda rec, f, r: rec.record(1, f[:1], r[:1]), "gradient tensors"),  # too few
    ],
    ids=["no-gradients", "wrong-count"],
)
def test_a_rejected_record_call_records_nothing(tmp_path: Path, bad_call, message) -> None:
    """A call that raises leaves no half-recorded step behind: the corrected call for the same
    step succeeds and the store never shows the step without its geometry."""
    f, r = small_grads()
    rec = small_recorder(tmp_path / "r.zarr")
    rec.record(0, f, r)
    with pytest.raises(ValueError, match=message):
        bad_call(rec, f, r)
    rec.record(1, f, r, forget_loss=3.0)  # the corrected call
    rec.close()
    ds = geomkit.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds["step"].values, [0, 1])
    np.testing.assert_array_equal(ds["record"].values, [0, 1])
    assert ds["forget_loss"].values[1] == 3.0


def test_skipped_steps_are_stored_without_a_record(tmp_path: Path) -> None:
    f, r = small_grads()
    rec = small_recorder(tmp_path / "r.zarr", flush_every=2)
    rec.record(0, f, r, forget_loss=1.0, grad_norm=2.0)
    rec.record(1, skipped=True, forget_loss=float("nan"), learning_rate=1e-3)
    rec.record(2, f, r, skipped=True)  # gradients given but the step was skipped
    rec.record(3, f, r, forget_loss=4.0)
    rec.close()
    ds = geomkit.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds["step"].values, [0, 1, 2, 3])
    np.testing.assert_array_equal(ds["skipped"].values, [False, True, True, False])
    np.testing.assert_array_equal(ds["record"].values, [0, 3])
    assert np.isnan(ds["forget_loss"].values[1]) and ds["forget_loss"].values[3] == 4.0
    assert ds["learning_rate"].values[1] == 1e-3
    assert np.isnan(ds["grad_norm"].values[1:]).all()  # defaults: NaN, not 0
    assert (np.diff(ds["wall_time"].values) >= 0).all()


def test_flush_every_and_close(tmp_path: Path) -> None:
    f, r = small_grads()
    path = tmp_path / "r.zarr"
    rec = small_recorder(path, flush_every=3)
    for step in range(4):
        rec.record(step, f, r)
        rec.wait()  # appends run on a background thread
        committed = geomkit.open_run(path).sizes["step"]
        assert committed == (3 if step >= 2 else 0)
    rec.close()
    assert geomkit.open_run(path).sizes["step"] == 4
    rec.close()  # idempotent
    assert geomkit.open_run(path).sizes["step"] == 4


def test_write_false_computes_but_writes_nothing(tmp_path: Path) -> None:
    f, r = small_grads()
    rec = small_recorder(tmp_path / "r.zarr", write=False, flush_every=1)
    stats = rec.measure(f, r)
    assert stats.shape == (len(names()), 2, len(FIELDS))
    rec.record(0, f, r)
    rec.close()
    assert not (tmp_path / "r.zarr").exists()


def test_for_model_uses_trainable_parameters_in_order(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    rec = Recorder.for_model(tmp_path / "r.zarr", model, "sum", shadows=[])
    assert [t.name for t in rec.tensors] == ["0.weight", "1.weight", "1.bias"]
    assert rec.numel == [12, 8, 2]


def test_recorder_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="numel"):
        Recorder(tmp_path / "a", ["a", "b"], [1], "sum")
    with pytest.raises(ValueError, match=r"invalid tensors=\[\]: expected at least one"):
        Recorder(tmp_path / "b", [], [], "sum")
    with pytest.raises(ValueError, match="invalid strategy='nope'"):
        Recorder(tmp_path / "c", ["a"], [1], "nope")
    with pytest.raises(TypeError, match="strategy"):
        Recorder(tmp_path / "d", ["a"], [1], 3)
