"""Tests for geomkit.engine: the two-pass unlearning loop on a tiny ``transformers`` Llama.

Layout:

1. one step against a brute-force reference: the forget and retain gradients recomputed with
   ``torch.autograd.grad`` on a copy of the initial model, the update in ``.grad`` right before
   ``optimizer.step`` equals the float64 reference combination of them, and the recorded
   statistics and per-layer cosines equal a float64 NumPy recomputation;
2. accumulation: two micro-batches of B/2 record the same statistics and take the same step as
   one batch of B;
3. resume: a checkpoint at step 3 resumed in a new Unlearner ends where an uninterrupted run
   ends, with every step in the store exactly once;
4. non-finite gradients: an error naming the step and the tensors, or a skipped step;
5. invalid settings fail with ``ValueError`` before any work.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
import transformers
from tiny import tiny_llama

import geomkit
from geomkit.engine import EngineConfig, NonFiniteGradientError, Unlearner
from geomkit.objectives import GA, NLL, ForgetLoss, Objective, build_objective
from geomkit.strategies import BLUR, SAGO, PerTensor, Strategy, names

SEQ = 12
VOCAB = 64


def tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_llama(seed)


def make_batch(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` equal-length sequences without padding (every label after the first counts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def split(batch: dict, parts: int) -> list[dict]:
    n = batch["input_ids"].shape[0] // parts
    return [{k: v[i * n : (i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def autograd_gradients(model, objective, forget_batch, retain_batch):
    """f and r of every parameter from two separate autograd passes (float32 tensors)."""
    model = copy.deepcopy(model)
    model.train()
    params = [p for _, p in model.named_parameters()]
    f = torch.autograd.grad(objective.forget(model, forget_batch), params)
    r = torch.autograd.grad(objective.retain(model, retain_batch), params)
    return list(f), list(r)


def hand_losses(model, forget_batch, retain_batch) -> tuple[float, float]:
    """GA and NLL of GradDiff by hand: the token mean of next-token cross-entropy."""
    with torch.no_grad():
        out = []
        for batch in (forget_batch, retain_batch):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB).double(), batch["labels"][:, 1:].reshape(-1)
            )
            out.append(float(nll))
    return -out[0], out[1]


def layer_of(name: str) -> int:
    match = re.search(r"\blayers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


# ----------------------------------------------------------------------------------------------
# 1. One step against autograd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["sago", "pcgrad"])
def test_one_step_matches_autograd_reference(tmp_path: Path, strategy: str) -> None:
    alpha, gamma = 0.7, 1.2
    model = tiny_model(0)
    initial = copy.deepcopy(model)
    objective = build_objective("graddiff")
    forget, retain = make_batch(4, 1), make_batch(4, 2)
    config = EngineConfig(
        strategy=strategy, alpha=alpha, gamma=gamma, lr=1e-3, steps=1, max_grad_norm=None
    )
    unlearner = Unlearner(model, objective, [forget], [retain], config, out=tmp_path / "run")

    captured: list[list[torch.Tensor]] = []
    unlearner.optimizer.register_step_pre_hook(  # .grad as optimizer.step receives it
        lambda opt, args, kwargs: captured.append(
            [p.grad.detach().clone() for p in unlearner.params]
        )
    )
    result = unlearner.step()
    unlearner.recorder.close()
    assert len(captured) == 1
    update = captured[0]

    f, r = autograd_gradients(initial, objective, forget, retain)
    fs = [t.double().numpy() for t in f]
    rs = [t.double().numpy() for t in r]
    d_ref = ref.combine(strategy, fs, rs, alpha=alpha, gamma=gamma)
    names_ = unlearner.names
    assert names_ == [n for n, _ in initial.named_parameters()]

    # (a) the update in .grad right before the optimizer step
    for name, got, want in zip(names_, update, d_ref, strict=True):
        torch.testing.assert_close(
            got,
            torch.from_numpy(want).float(),
            rtol=1e-5,
            atol=1e-7,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    norm = np.sqrt(sum(float(np.sum(d * d)) for d in d_ref))
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    assert not result.skipped and result.recorded
    assert result.learning_rate == pytest.approx(1e-3)
    forget_loss, retain_loss = hand_losses(initial, forget, retain)
    assert result.forget_loss == pytest.approx(forget_loss, rel=1e-5)
    assert result.retain_loss == pytest.approx(retain_loss, rel=1e-5)

    # (b) the recorded statistics, recomputed in float64 from the autograd gradients
    ds = geomkit.open_run(tmp_path / "run").load()
    assert ds.attrs["applied_strategy"] == strategy
    assert ds.attrs["objective"] == "graddiff"
    assert list(ds["tensor"].values) == names_
    np.testing.assert_array_equal(ds["record"].values, [0])
    assert float(ds["forget_loss"][0]) == result.forget_loss
    assert float(ds["retain_loss"][0]) == result.retain_loss
    assert float(ds["grad_norm"][0]) == result.grad_norm
    row = ds.isel(record=0)
    assert str(ds["strategy"].values[0]) == strategy
    applied = row.isel(strategy=0)  # the applied strategy comes first
    assert bool(applied["measured"])
    d_applied = [t.double().numpy() for t in update]  # the float32 update actually applied

    def per_tensor(a, b):
        return np.array([float(np.sum(x * y)) for x, y in zip(a, b, strict=True)])

    def scale(a, b):
        return max(float(np.sum(np.abs(x * y))) for x, y in zip(a, b, strict=True))

    checks = {
        "ff": (row["ff"], fs, fs),
        "rr": (row["rr"], rs, rs),
        "fr": (row["fr"], fs, rs),
        "dd": (applied["dd"], d_ref, d_ref),
        "df": (applied["df"], d_ref, fs),
        "dr": (applied["dr"], d_ref, rs),
    }
    for key, (got, a, b) in checks.items():
        np.testing.assert_allclose(
            got.values, per_tensor(a, b), rtol=1e-5, atol=1e-6 * scale(a, b), err_msg=key
        )
    conflict = [ref.conflict(a, b).sum() for a, b in zip(fs, rs, strict=True)]
    np.testing.assert_array_equal(row["n_conflict"].values, conflict)
    both = [((a != 0) & (b != 0)).sum() for a, b in zip(fs, rs, strict=True)]
    np.testing.assert_array_equal(row["n_both_nonzero"].values, both)
    opposed = [(d * b < 0).sum() for d, b in zip(d_applied, rs, strict=True)]
    np.testing.assert_array_equal(applied["n_opposed"].values, opposed)
    if strategy == "sago":
        assert (applied["n_opposed"].values == 0).all()
    else:
        fired = [float(np.sum(a * b)) < 0 for a, b in zip(fs, rs, strict=True)]
        np.testing.assert_array_equal(applied["n_projected"].values, fired)

    # per-layer cosines of ds.geom against NumPy on the concatenated gradients
    metrics = ds.geom.metrics(by="layer").isel(record=0)
    layers = [layer_of(n) for n in names_]
    assert sorted(metrics["layer"].values.tolist()) == [-1, 0, 1]
    for layer in (-1, 0, 1):
        idx = [j for j, x in enumerate(layers) if x == layer]
        fv = np.concatenate([fs[j].ravel() for j in idx])
        rv = np.concatenate([rs[j].ravel() for j in idx])
        dv = np.concatenate([d_ref[j].ravel() for j in idx])
        m = metrics.sel(layer=layer)
        cos_fr = fv @ rv / (np.linalg.norm(fv) * np.linalg.norm(rv))
        cos_dr = dv @ rv / (np.linalg.norm(dv) * np.linalg.norm(rv))
        cos_df = dv @ fv / (np.linalg.norm(dv) * np.linalg.norm(fv))
        assert float(m["cos_fr"]) == pytest.approx(cos_fr, rel=1e-5, abs=1e-7)
        assert float(m["cos_dr"].isel(strategy=0)) == pytest.approx(cos_dr, rel=1e-5)
        assert float(m["cos_df"].isel(strategy=0)) == pytest.approx(cos_df, rel=1e-5)


@pytest.mark.parametrize("alpha, gamma", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0)])
def test_shadows_are_the_named_strategies_with_the_run_weights(
    tmp_path: Path, alpha: float, gamma: float
) -> None:
    """Every shadow row holds the moments of the update its strategy would form from the same
    autograd gradients with the run's alpha and gamma (a paired comparison), and the applied
    strategy appears once in ``strategy``."""
    model = tiny_model(0)
    initial = copy.deepcopy(model)
    objective = build_objective("graddiff")
    forget, retain = make_batch(2, 1), make_batch(2, 2)
    config = EngineConfig(strategy="pcgrad", alpha=alpha, gamma=gamma, steps=1, lr=1e-3)
    Unlearner(model, objective, [forget], [retain], config, out=tmp_path / "run").run()
    ds = geomkit.open_run(tmp_path / "run").load()
    labels = [str(x) for x in ds["strategy"].values]
    assert labels[0] == "pcgrad"

    f, r = autograd_gradients(initial, objective, forget, retain)
    fs = [t.double().numpy() for t in f]
    rs = [t.double().numpy() for t in r]
    for i, label in enumerate(labels):
        if i == 0:
            continue  # the applied row is measured on the float32 update (tested above)
        d = ref.combine(label, fs, rs, alpha=alpha, gamma=gamma)
        row = ds.isel(record=0, strategy=i)
        for key, other in (("dd", d), ("df", fs), ("dr", rs)):
            want = np.array([float(np.sum(a * b)) for a, b in zip(d, other, strict=True)])
            scale = max(float(np.sum(np.abs(a * b))) for a, b in zip(d, other, strict=True))
            np.testing.assert_allclose(
                row[key].values, want, rtol=1e-5, atol=1e-7 * scale, err_msg=f"{label} {key}"
            )
    assert sorted(labels) == sorted(names()), labels  # each strategy exactly once


def test_update_is_clipped_after_recording(tmp_path: Path) -> None:
    """The store records the update as formed; the optimizer sees it clipped to max norm."""
    model = tiny_model(0)
    config = EngineConfig(strategy="sum", steps=1, lr=1e-3, max_grad_norm=0.01)
    unlearner = Unlearner(
        model,
        build_objective("graddiff"),
        [make_batch(2, 1)],
        [make_batch(2, 2)],
        config,
        out=tmp_path / "run",
    )
    seen = []
    unlearner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(
            float(torch.nn.utils.get_total_norm([p.grad for p in unlearner.params]))
        )
    )
    result = unlearner.run()[0]
    ds = geomkit.open_run(tmp_path / "run")
    recorded = float(np.sqrt(ds["dd"].isel(record=0).sel(strategy="sum").sum()))
    assert recorded == pytest.approx(result.grad_norm, rel=1e-5)
    assert float(ds["grad_norm"][0]) == pytest.approx(result.grad_norm, rel=1e-12)
    assert result.grad_norm > 0.01
    assert seen[0] == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("record_every, want", [(1, [0, 1, 2, 3]), (3, [0, 3]), (0, [])])
def test_record_every(tmp_path: Path, record_every: int, want: list[int]) -> None:
    """Geometry every ``record_every`` steps; 0 means never (EngineConfig docs)."""
    config = EngineConfig(steps=4, lr=1e-3, record_every=record_every)
    unlearner = Unlearner(
        tiny_model(0),
        build_objective("graddiff"),
        [make_batch(2, 1)],
        [make_batch(2, 2)],
        config,
        out=tmp_path / "run",
    )
    results = unlearner.run()
    assert [r.step for r in results if r.recorded] == want
    ds = geomkit.open_run(tmp_path / "run")
    np.testing.assert_array_equal(ds["step"].values, np.arange(4))
    np.testing.assert_array_equal(ds["record"].values, want)


# ----------------------------------------------------------------------------------------------
# 2. Accumulation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["sago", "pcgrad"])
def test_accumulation_equals_one_large_batch(tmp_path: Path, strategy: str) -> None:
    forget, retain = make_batch(4, 10), make_batch(4, 20)
    objective = build_objective("graddiff")
    runs = {}
    for accumulation in (1, 2):
        model = tiny_model(3)
        config = EngineConfig(
            strategy=strategy, steps=1, lr=1e-2, accumulation=accumulation, warmup_ratio=0.0
        )
        unlearner = Unlearner(
            model,
            objective,
            split(forget, accumulation),
            split(retain, accumulation),
            config,
            out=tmp_path / f"acc{accumulation}",
        )
        results = unlearner.run()
        runs[accumulation] = (results, params_of(model), geomkit.open_run(unlearner.out).load())

    (res1, p1, ds1), (res2, p2, ds2) = runs[1], runs[2]
    assert res1[0].forget_loss == pytest.approx(res2[0].forget_loss, rel=1e-5)
    assert res1[0].retain_loss == pytest.approx(res2[0].retain_loss, rel=1e-5)
    assert res1[0].grad_norm == pytest.approx(res2[0].grad_norm, rel=1e-5)
    for name in ("forget_loss", "retain_loss", "grad_norm", "learning_rate"):
        np.testing.assert_allclose(ds2[name].values, ds1[name].values, rtol=1e-5, err_msg=name)
    for name in ("ff", "rr", "fr", "dd", "df", "dr"):
        a, b = ds1[name].values, ds2[name].values
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=name)
    for name in ("n_conflict", "n_both_nonzero", "n_opposed", "n_projected"):
        # counts may differ where a coordinate's gradient is at rounding level
        a, b = ds1[name].values, ds2[name].values
        assert np.abs(a - b).max() <= max(2, 1e-3 * a.max()), name
    assert ds2.attrs["accumulation_steps"] == 2
    for name in p1:
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------
# 3. Resume
# ----------------------------------------------------------------------------------------------


RESUME_FORGET = [make_batch(2, 100 + i) for i in range(3)]
RESUME_RETAIN = [make_batch(2, 200 + i) for i in range(2)]
RESUME_CONFIG = EngineConfig(
    strategy="sago", steps=6, lr=5e-3, warmup_ratio=0.34, flush_every=4, record_every=2
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, object]:
    """Parameters and store of an uninterrupted 6-step run (shared by the resume tests)."""
    model = tiny_model(0)
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    unlearner = Unlearner(
        model,
        build_objective("graddiff"),
        RESUME_FORGET,
        RESUME_RETAIN,
        copy.deepcopy(RESUME_CONFIG),
        out=out,
    )
    unlearner.run()
    return params_of(model), geomkit.open_run(out).load()


@pytest.mark.parametrize("crash_after", [3, 5, 6], ids=["at-save", "mid-run", "completed"])
def test_resume_from_checkpoint_equals_uninterrupted_run(
    tmp_path: Path, crash_after: int, uninterrupted
) -> None:
    objective = build_objective("graddiff")
    forget, retain, config = RESUME_FORGET, RESUME_RETAIN, RESUME_CONFIG
    want_params, want = uninterrupted

    # the interrupted run: checkpoint after 3 steps, then more steps, then a "crash"
    out = tmp_path / "run"
    first = Unlearner(tiny_model(0), objective, forget, retain, copy.deepcopy(config), out=out)
    for _ in range(3):
        first.step()
    first.save(tmp_path / "ckpt.pt")
    while first.step_index < crash_after:
        first.step()
    if crash_after == 6:
        first.recorder.close()
    else:
        first.recorder.flush(wait=True)  # what was written before the crash stays on disk
    del first

    # resume in a new Unlearner (from a differently initialised model: load restores it)
    model = tiny_model(99)
    resumed = Unlearner(
        model, objective, forget, retain, copy.deepcopy(config), out=out, resume_step=3
    )
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.step_index == 3
    results = resumed.run()
    assert [r.step for r in results] == [3, 4, 5]

    ds = geomkit.open_run(out).load()
    np.testing.assert_array_equal(ds["step"].values, np.arange(6))
    np.testing.assert_array_equal(ds["record"].values, [0, 2, 4])
    for name, value in want_params.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].detach(), value, rtol=1e-5, atol=1e-7, msg=name
        )
    for name in ("forget_loss", "retain_loss", "learning_rate", "grad_norm"):
        np.testing.assert_allclose(ds[name].values, want[name].values, rtol=1e-5, err_msg=name)
    for name in ("ff", "fr", "dd", "dr", "uu", "dd_step"):  # the step after a resume too
        np.testing.assert_allclose(ds[name].values, want[name].values, rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------
# 4. Non-finite gradients
# ----------------------------------------------------------------------------------------------


class NaNForgetAt(ForgetLoss):
    """Gradient ascent, except that the loss is NaN at one call (one call per step here)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0

    def compute(self, model, batch, reference):
        loss = GA()(model, batch)
        call, self.calls = self.calls, self.calls + 1
        return loss * float("nan") if call == self.at else loss


def nan_unlearner(tmp_path: Path, nonfinite: str, model=None) -> Unlearner:
    objective = Objective("graddiff-nan", NaNForgetAt(1), NLL())
    config = EngineConfig(steps=3, lr=1e-3, nonfinite=nonfinite, flush_every=10)
    return Unlearner(
        model if model is not None else tiny_model(0),
        objective,
        [make_batch(2, 1)],
        [make_batch(2, 2)],
        config,
        out=tmp_path / "run",
    )


def test_nonfinite_gradient_raises_naming_step_and_tensors(tmp_path: Path) -> None:
    model = tiny_model(0)
    unlearner = nan_unlearner(tmp_path, "error", model)
    after_step0 = {}
    with pytest.raises(NonFiniteGradientError) as info:
        unlearner.run(callback=lambda result: after_step0.update(params_of(model)))
    message = str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert "step 1" in message
    assert "forget" in message
    assert "model.embed_tokens.weight" in message
    assert "model.layers.1.mlp.down_proj.weight" in message
    assert "retain:" not in message  # the retain gradient was finite
    assert "nonfinite='skip'" in message
    # the failed step changed nothing, and what was recorded before it is on disk
    for name, value in params_of(model).items():
        torch.testing.assert_close(value, after_step0[name], rtol=0, atol=0)
    ds = geomkit.open_run(tmp_path / "run")
    np.testing.assert_array_equal(ds["step"].values, [0])
    np.testing.assert_array_equal(ds["record"].values, [0])


def test_nonfinite_gradient_skip_records_a_skipped_step(tmp_path: Path) -> None:
    model = tiny_model(0)
    unlearner = nan_unlearner(tmp_path, "skip", model)
    snapshots = []
    results = unlearner.run(callback=lambda result: snapshots.append(params_of(model)))
    assert [r.skipped for r in results] == [False, True, False]
    assert [r.recorded for r in results] == [True, False, True]
    assert np.isnan(results[1].grad_norm)
    for name in snapshots[0]:  # the skipped step left the parameters alone
        torch.testing.assert_close(snapshots[1][name], snapshots[0][name], rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])

    ds = geomkit.open_run(tmp_path / "run").load()
    np.testing.assert_array_equal(ds["step"].values, [0, 1, 2])
    np.testing.assert_array_equal(ds["skipped"].values, [False, True, False])
    np.testing.assert_array_equal(ds["record"].values, [0, 2])
    assert np.isfinite(ds["ff"].values).all() and np.isfinite(ds["dd"].values).all()
    assert np.isfinite(ds.geom.metrics()["cos_fr"].values).all()


# ----------------------------------------------------------------------------------------------
# 5. Settings
# ----------------------------------------------------------------------------------------------


def test_composed_strategy_object_runs_in_the_engine(tmp_path: Path) -> None:
    """A Strategy composed in Python (BLUR at per-tensor scope, registered under no name)
    drives a real Unlearner: the update is per-tensor BLUR with the Strategy's own weights,
    the store labels it ``blur/per_tensor``, and Strategy shadows are recorded as given."""
    alpha, gamma = 0.7, 1.2
    strategy = Strategy(BLUR(), PerTensor(), alpha=alpha, gamma=gamma)
    assert str(strategy) == "blur/per_tensor"
    model = tiny_model(0)
    initial = copy.deepcopy(model)
    objective = build_objective("graddiff")
    forget, retain = make_batch(4, 1), make_batch(4, 2)
    half = Strategy(SAGO(), alpha=0.5, gamma=gamma)
    config = EngineConfig(
        strategy=strategy, shadows=["sago", half], steps=1, lr=1e-3, max_grad_norm=None
    )
    config.validate()
    unlearner = Unlearner(model, objective, [forget], [retain], config, out=tmp_path / "run")
    assert unlearner.strategy is strategy
    captured: list[list[torch.Tensor]] = []
    unlearner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: captured.append(
            [p.grad.detach().clone() for p in unlearner.params]
        )
    )
    unlearner.run()

    f, r = autograd_gradients(initial, objective, forget, retain)
    want_d, want_dr = [], []
    for ft, rt in zip(f, r, strict=True):
        fd, rd = ft.double(), rt.double()
        projected = rd - (rd * fd).sum() / ((fd * fd).sum() + 1e-10) * fd  # per tensor
        want_d.append(gamma * fd + alpha * projected)
        want_dr.append(float((want_d[-1] * rd).sum()))
    for name, got, want in zip(unlearner.names, captured[0], want_d, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6, msg=name)
    ds = geomkit.open_run(tmp_path / "run").load()
    labels = [str(x) for x in ds["strategy"].values]
    # "sago" takes the run's weights; the half-weighted object keeps its own, in its label
    assert labels == ["blur/per_tensor", "sago", "sago[alpha=0.5]"]
    assert (ds.attrs["alpha"], ds.attrs["gamma"]) == (alpha, gamma)
    applied = ds.isel(record=0, strategy=0)
    assert (applied["n_projected"].values == 1).all()  # BLUR projects every tensor
    scale = max(abs(x) for x in want_dr)
    np.testing.assert_allclose(applied["dr"].values, want_dr, rtol=1e-4, atol=1e-6 * scale)


def test_engine_config_strategy_objects_and_weights() -> None:
    sago = Strategy(SAGO(), alpha=0.5)
    assert EngineConfig(strategy=sago).build_strategy() is sago
    assert EngineConfig(strategy=sago, alpha=0.5).build_strategy() is sago
    built = EngineConfig(strategy="sago", alpha=0.5).build_strategy()
    assert built == sago and str(built) == "sago"
    with pytest.raises(ValueError, match=r"invalid alpha=0.3: the strategy sago carries"):
        EngineConfig(strategy=sago, alpha=0.3).validate()
    with pytest.raises(TypeError, match=r"invalid strategy=3"):
        EngineConfig(strategy=3).validate()
    with pytest.raises(TypeError, match=r"invalid shadows='sago'"):
        EngineConfig(shadows="sago").validate()


def test_engine_config_defaults_validate() -> None:
    config = EngineConfig()
    config.validate()
    assert config.strategy in names()
    assert config.nonfinite in ("error", "skip")
    assert config.accumulation == 1 and config.steps >= 1 and config.lr > 0


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (
            {"strategy": "sgd"},
            r"invalid strategy='sgd': expected one of sum, pcgrad, pcgrad_global, sago",
        ),
        ({"shadows": ["sago", "bogus"]}, r"invalid strategy='bogus'"),
        ({"accumulation": 0}, r"accumulation=0.*>= 1"),
        ({"accumulation": True}, r"accumulation=True"),
        ({"steps": 0}, r"steps=0"),
        ({"flush_every": 0}, r"flush_every=0"),
        ({"record_every": -1}, r"record_every=-1"),
        ({"lr": -1}, r"lr=-1.*> 0"),
        ({"lr": float("nan")}, r"lr=nan"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm=0.0"),
        ({"weight_decay": -0.1}, r"weight_decay=-0.1"),
        ({"nonfinite": "x"}, r"nonfinite='x'.*one of error, skip"),
        ({"trainable": "(unclosed"}, r"trainable='\(unclosed'"),
        ({"alpha": -1.0}, r"alpha"),
    ],
)
def test_engine_config_rejects_invalid_fields(changes: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        EngineConfig(**changes).validate()


def _invalid_cases():
    good = {"objective": "graddiff", "forget": True, "retain": True, "config": {}}
    return [
        pytest.param({**good, "config": {"strategy": "nope"}}, r"invalid strategy='nope': .*sago",
                     id="unknown-strategy"),
        pytest.param({**good, "config": {"accumulation": 0}}, r"accumulation=0", id="accum-0"),
        pytest.param({**good, "config": {"lr": -1}}, r"lr=-1", id="lr-negative"),
        pytest.param({**good, "config": {"nonfinite": "x"}}, r"nonfinite='x'", id="nonfinite-x"),
        pytest.param(
            {**good, "config": {"trainable": "^nosuchtensor"}},
            r"invalid trainable='\^nosuchtensor': expected a pattern selecting",
            id="trainable-empty",
        ),
        pytest.param({**good, "forget": False}, r"forget data is empty", id="empty-forget"),
        pytest.param(
            {**good, "retain": None},
            r"invalid retain=None: expected retain data \(objective 'graddiff'",
            id="retain-missing",
        ),
        pytest.param({**good, "objective": "gradascent"}, r"invalid objective='gradascent': .*ga",
                     id="unknown-objective"),
    ]  # fmt: skip


def _build_invalid(case: dict, model, out: Path) -> Unlearner:
    objective = build_objective(case["objective"])
    forget = [make_batch(2, 1)] if case["forget"] else []
    retain = None if case["retain"] is None else [make_batch(2, 2)]
    config = EngineConfig(**{"steps": 2, "lr": 1e-3, **case["config"]})
    return Unlearner(model, objective, forget, retain, config, out=out)


@pytest.mark.parametrize("case, pattern", _invalid_cases())
def test_invalid_settings_raise_value_error(tmp_path: Path, case: dict, pattern: str) -> None:
    model = tiny_model(0)
    before = params_of(model)
    with pytest.raises(ValueError, match=pattern):
        _build_invalid(case, model, tmp_path / "run").run()
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("case, pattern", _invalid_cases())
def test_invalid_settings_fail_before_any_work(tmp_path: Path, case: dict, pattern: str) -> None:
    """The error comes before any work: no forward pass, no store written (an existing run at
    ``out`` would be overwritten), the model's ``requires_grad`` flags untouched."""
    model = tiny_model(0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern):
        _build_invalid(case, model, out)  # construction alone must raise
    assert calls == []
    assert not out.exists()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
