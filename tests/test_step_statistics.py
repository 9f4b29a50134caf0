"""The recorded statistics of the step the optimizer took (issue 12, geomkit.step.StepModel).

1. SGD without clipping or weight decay: u = lr d, so cos(u, d) = 1 and cos(u, r) = cos(d, r) at
   every grouping, and |u| = lr |d|;
2. AdamW: the recorded <u, u> and cos(u, d) equal those of the parameter change the optimizer
   made (measured around ``optimizer.step()``), within float32 rounding;
3. clipping scales u: with SGD and an active clip, |u| = lr max_grad_norm;
4. the attribution adds up: per-layer (component, tensor) predicted changes sum to the model's;
5. predicted and realised loss changes agree to first order: the gap shrinks like lr^2;
6. records without a step model (and the recorder's own API) carry NaN step fields; errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_llama

import geomkit
from geomkit.engine import EngineConfig, Unlearner
from geomkit.fields import STEP_FIELDS
from geomkit.objectives import build_objective
from geomkit.recorder import Recorder
from geomkit.step import STEP_STATISTICS, StepModel

GROUPINGS = ("tensor", "layer", "component", "module", "model")


def _batches(seed: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 12), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _engine(out: Path | None, dtype=torch.float32, objective="graddiff", **config) -> Unlearner:
    settings = dict(strategy="sago", steps=3, lr=1e-3, warmup_ratio=0.0, verify_every=2)
    settings.update(config)
    return Unlearner(
        tiny_llama(0).to(dtype),
        build_objective(objective),
        _batches(1),
        _batches(2),
        EngineConfig(**settings),
        out,
    )


def _run(tmp_path: Path, **config):
    unlearner = _engine(tmp_path / "run", **config)
    unlearner.run()
    return unlearner, geomkit.open_run(tmp_path / "run")


@pytest.mark.parametrize("strategy", ["sago", "pcgrad", "sum"])
def test_sgd_step_is_lr_times_d_at_every_grouping(tmp_path: Path, strategy: str) -> None:
    _, ds = _run(
        tmp_path, strategy=strategy, optimizer="sgd", max_grad_norm=None, lr=0.1, record_every=1
    )
    assert set(STEP_FIELDS) <= set(ds.data_vars)
    lr = ds["learning_rate"].sel(step=ds["record"].values).values
    for by in GROUPINGS:
        m = ds.geom.metrics(by=by)
        applied = {k: m[k].isel(strategy=0) for k in ("cos_dr", "cos_df", "norm_d")}
        # the only roundings: d and f, r in float32 -> float64 products (u = lr d exactly)
        np.testing.assert_allclose(m["cos_ud"], 1.0, rtol=0, atol=1e-12, err_msg=by)
        np.testing.assert_allclose(m["cos_ur"], applied["cos_dr"], rtol=0, atol=1e-6, err_msg=by)
        np.testing.assert_allclose(m["cos_uf"], applied["cos_df"], rtol=0, atol=1e-6, err_msg=by)
        shape = (-1,) + (1,) * (m["norm_u"].ndim - 1)
        np.testing.assert_allclose(
            m["norm_u"], lr.reshape(shape) * applied["norm_d"], rtol=1e-6, err_msg=by
        )
    # u opposes r exactly where d does (the same vector, scaled): the applied row's count
    np.testing.assert_array_equal(ds["n_u_opposed_r"].values, ds["n_opposed"].values[:, 0])


def test_adamw_statistics_are_those_of_the_parameter_change(tmp_path: Path) -> None:
    unlearner = _engine(
        tmp_path / "run", lr=1e-3, weight_decay=0.01, max_grad_norm=1.0, record_every=1
    )
    changes, updates = [], []

    def before(optimizer, args, kwargs):
        updates.append([p.grad.detach().double().clone() for p in unlearner.params])
        changes.append([p.detach().double().clone() for p in unlearner.params])

    def after(optimizer, args, kwargs):
        changes[-1] = [
            o - p.detach().double() for o, p in zip(changes[-1], unlearner.params, strict=True)
        ]

    unlearner.optimizer.register_step_pre_hook(before)
    unlearner.optimizer.register_step_post_hook(after)
    unlearner.run()
    ds = geomkit.open_run(tmp_path / "run")
    eps = torch.finfo(torch.float32).eps
    for k, (delta, clipped) in enumerate(zip(changes, updates, strict=True)):
        uu = np.array([float((u * u).sum()) for u in delta])
        # theta_new = round(theta_old - u): each coordinate is off by up to one float32 unit of
        # theta, next to the float64 model of u
        theta = np.array([float(p.detach().double().abs().sum()) for p in unlearner.params])
        norm_u = np.sqrt(ds["uu"].values[k])
        assert (np.abs(np.sqrt(uu) - norm_u) <= 4 * eps * theta + 1e-3 * norm_u).all()
        cos = np.array(
            [
                float((u * g).sum() / (u.norm() * g.norm()))
                for u, g in zip(delta, clipped, strict=True)
            ]
        )
        recorded = ds["ud"].values[k] / np.sqrt(ds["uu"].values[k] * ds["dd_step"].values[k])
        np.testing.assert_allclose(recorded, cos, rtol=0, atol=1e-3)
    # AdamW turns the step: cos(u, d) is well below 1 somewhere
    assert ds.geom.metrics(by="tensor")["cos_ud"].min() < 0.9


def test_clipping_scales_u(tmp_path: Path) -> None:
    _, ds = _run(tmp_path, optimizer="sgd", max_grad_norm=1e-3, lr=0.5, record_every=1)
    m = ds.geom.metrics(by="model")
    lr = ds["learning_rate"].sel(step=ds["record"].values).values
    assert (m["norm_d"].isel(strategy=0) > 1e-2).all()  # the clip is active
    # |u| = lr * max_grad_norm / (1 + 1e-6 / |d|), as clip_grad_norm_ scales
    want = lr * 1e-3 / (1 + 1e-6 / m["norm_d"].isel(strategy=0).values)
    np.testing.assert_allclose(m["norm_u"], want, rtol=1e-6)
    np.testing.assert_allclose(m["cos_ud"], 1.0, atol=1e-12)


def test_attribution_adds_up_over_every_grouping(tmp_path: Path) -> None:
    _, ds = _run(tmp_path, record_every=1)
    model = ds.geom.metrics(by="model")
    for by in ("tensor", "layer", "component", "module"):
        m = ds.geom.metrics(by=by)
        for name in ("pred_forget_change", "pred_retain_change"):
            parts = m[name].sum(by).values
            np.testing.assert_allclose(parts, model[name].values, rtol=1e-12, err_msg=by)
            assert np.isfinite(parts).all()
    # signs: -<u, f>, -<u, r>
    np.testing.assert_array_equal(
        ds.geom.metrics(by="tensor")["pred_forget_change"].values, -ds["uf"].values
    )


def _realised_gap(tmp_path: Path, lr: float) -> tuple[np.ndarray, np.ndarray]:
    _, ds = _run(
        tmp_path / f"lr{lr}",
        dtype=torch.float64,
        optimizer="sgd",
        max_grad_norm=None,
        lr=lr,
        record_every=1,
        record_realized=True,
        steps=2,
    )
    m = ds.geom.metrics(by="model")
    steps = ds["record"].values
    realised = (ds["forget_loss_after"] - ds["forget_loss"]).sel(step=steps).values
    realised_r = (ds["retain_loss_after"] - ds["retain_loss"]).sel(step=steps).values
    predicted = np.stack([m["pred_forget_change"].values, m["pred_retain_change"].values])
    return predicted, np.stack([realised, realised_r])


def test_predicted_and_realised_changes_agree_to_first_order(tmp_path: Path) -> None:
    """SGD on a float64 model: realised - predicted is the second-order term, O(lr^2), over a
    floor from the losses themselves, which the objectives compute from float32 logits."""
    eps32 = float(torch.finfo(torch.float32).eps)
    gaps = {}
    for lr in (0.2, 0.05):
        predicted, realised = _realised_gap(tmp_path, lr)
        assert np.isfinite(realised).all()
        assert (np.sign(predicted) == np.sign(realised)).all()
        gaps[lr] = np.abs(realised - predicted)
        floor = 64 * eps32 * 5.0  # losses of about 4 nats, rounded to float32 a few times
        assert (gaps[lr] <= 1.0 * lr**2 + floor).all(), (lr, gaps[lr])
        assert (gaps[lr] <= 0.1 * np.abs(predicted)).all(), (lr, gaps[lr], predicted)
    # the gap shrinks like lr^2 (16x from 0.2 to 0.05; at least 4x asked)
    assert (gaps[0.05] < 0.25 * gaps[0.2]).all(), gaps


def test_runs_without_the_step_model_record_nan_step_fields(tmp_path: Path) -> None:
    _, ds = _run(tmp_path, record_step=False, record_every=1)
    for name in STEP_FIELDS:
        assert np.isnan(ds[name].values).all(), name
    assert np.isnan(ds["forget_loss_after"].values).all()
    assert np.isnan(ds.geom.metrics(by="model")["cos_ur"].values).all()


def test_recorder_takes_the_step_from_a_hand_written_loop(tmp_path: Path) -> None:
    """A loop that forms d itself passes it as ``combined``; one that does not lets the
    recorder form it (closed forms): both give the step of SGD, u = lr d."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(9))]
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    optimizer = torch.optim.SGD(params, lr=0.25)
    for combined in (True, False):
        rec = Recorder(tmp_path / f"{combined}.zarr", names, [30, 9], "pcgrad")
        model = StepModel(optimizer, params)
        for step in range(3):
            f = [torch.randn_like(p) for p in params]
            r = [torch.randn_like(p) for p in params]
            d = rec.applied(f, r)
            rec.record(step, f, r, d if combined else None, step_model=model)
            for p, g in zip(params, d, strict=True):
                p.grad = g
            optimizer.step()
        rec.close()
        ds = geomkit.open_run(tmp_path / f"{combined}.zarr")
        m = ds.geom.metrics(by="tensor")
        np.testing.assert_allclose(m["cos_ud"], 1.0, atol=1e-12)
        np.testing.assert_allclose(m["norm_u"], 0.25 * m["norm_d"].isel(strategy=0), rtol=1e-6)


def test_step_model_errors_name_the_problem() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="invalid optimizer RMSprop"):
        StepModel(torch.optim.RMSprop([p]), [p])
    with pytest.raises(ValueError, match=r"invalid params\[0\] of shape \(2,\)"):
        StepModel(torch.optim.SGD([p], lr=0.1), [torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="invalid max_grad_norm=-1"):
        StepModel(torch.optim.SGD([p], lr=0.1), [p], max_grad_norm=-1)
    model = StepModel(torch.optim.SGD([p], lr=0.1), [p])
    with pytest.raises(RuntimeError, match="before begin"):
        model.statistics(0, p.detach(), p.detach(), p.detach())
    model.begin(dd=1.0)
    with pytest.raises(ValueError, match="forget, retain and update have 3, 3, 2"):
        model.statistics(0, torch.zeros(3), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="record_realized"):
        EngineConfig(record_realized="yes").validate()


def test_step_statistics_of_pieces_equal_the_whole(monkeypatch) -> None:
    """Chunking the tensor (STEP_CHUNK) does not change the sums beyond float64 rounding."""
    import geomkit.step as gstep

    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(1000, generator=g))
    optimizer = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    p.grad = torch.randn(1000, generator=g)
    optimizer.step()  # a state to read
    f, r, d = (torch.randn(1000, generator=g) for _ in range(3))
    model = StepModel(optimizer, [p], max_grad_norm=0.5)
    model.begin(dd=float((d.double() ** 2).sum()))
    whole = model.statistics(0, f, r, d)
    monkeypatch.setattr(gstep, "STEP_CHUNK", 7)
    pieces = dict(zip(STEP_STATISTICS, model.statistics(0, f, r, d).tolist(), strict=True))
    # float64 sums in another order: within a few units of the Cauchy-Schwarz scale
    norms = {"uu": "uu", "uf": f, "ur": r, "ud": d, "dd_step": d}
    for name, other in norms.items():
        total = float(whole[STEP_STATISTICS.index(name)])
        scale = float(whole[0]) if isinstance(other, str) else float(other.double().norm())
        bound = 1e-13 * (np.sqrt(float(whole[0])) * scale if name != "uu" else scale)
        if name == "dd_step":
            bound = 1e-13 * float(d.double().norm()) ** 2
        assert abs(pieces[name] - total) <= bound, name
    for name in ("n_u_opposed_r", "n_u_opposed_f"):
        assert pieces[name] == float(whole[STEP_STATISTICS.index(name)])
    # and against next_step on the whole tensor, clipped by hand
    u = gstep.next_step(optimizer, p, d.double() * model.scale)
    want = dict(zip(STEP_STATISTICS, whole.tolist(), strict=True))
    np.testing.assert_allclose(want["uu"], float((u * u).sum()), rtol=1e-12)
    cs = float(u.norm() * r.double().norm())  # <u, r> may cancel: its Cauchy-Schwarz scale
    assert abs(want["ur"] - float((u * r.double()).sum())) <= 1e-13 * cs
    assert want["n_u_opposed_f"] == float(((u * f.double()) < 0).sum())


def test_realised_losses_keep_the_trajectory_and_the_dropout_masks(tmp_path: Path) -> None:
    """With dropout, the passes after the step draw the masks the step's own forwards drew
    (so realised - predicted has no dropout noise), and training's random state is untouched."""

    def run(out, **config):
        model = tiny_llama(0)
        model.config.attention_dropout = 0.3
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.3
        settings = dict(strategy="pcgrad", steps=3, lr=1e-3, warmup_ratio=0.0)
        settings.update(config)
        unlearner = Unlearner(
            model,
            build_objective("graddiff"),
            _batches(1),
            _batches(2),
            EngineConfig(**settings),
            out,
        )
        unlearner.run()
        return unlearner

    plain = run(None)
    realised = run(tmp_path / "run", record_realized=True, optimizer="sgd", lr=1e-6)
    reference = run(None, optimizer="sgd", lr=1e-6)
    for a, b in zip(plain.params, run(tmp_path / "r2", record_realized=True).params, strict=True):
        assert torch.equal(a, b)  # the recorded run took the very same steps
    ds = geomkit.open_run(tmp_path / "run")
    steps = ds["record"].values
    change = (ds["forget_loss_after"] - ds["forget_loss"]).sel(step=steps).values
    predicted = ds.geom.metrics(by="model")["pred_forget_change"].values
    # lr 1e-6: the change is first order and tiny; with other masks it would be dropout noise
    # of the size of the loss differences between masks (~1e-2)
    assert np.all(np.abs(change - predicted) <= 1e-5), (change, predicted)
    for a, b in zip(realised.params, reference.params, strict=True):
        assert torch.equal(a, b)


def test_pieces_form_the_same_update_and_step(tmp_path: Path, monkeypatch) -> None:
    """Records without verification form the update piece by piece (no tensor-sized
    temporary): the parameters are bit-identical to whole tensors, the sums agree."""
    import geomkit.step as gstep

    whole = _engine(tmp_path / "whole", strategy="pcgrad", verify_every=0, record_every=1)
    whole.run()
    monkeypatch.setattr(gstep, "STEP_CHUNK", 37)
    pieces = _engine(tmp_path / "pieces", strategy="pcgrad", verify_every=0, record_every=1)
    pieces.run()
    for a, b in zip(whole.params, pieces.params, strict=True):
        assert torch.equal(a, b)
    a, b = geomkit.open_run(tmp_path / "whole"), geomkit.open_run(tmp_path / "pieces")
    for name in ("uu", "dd_step"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12)
    for name in ("n_u_opposed_r", "n_u_opposed_f"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_a_rule_without_closed_forms_records_its_step(tmp_path: Path) -> None:
    """A user rule that is neither uniform nor never opposing r: its update is measured, the
    shadows verified, and the step taken from the update formed into ``into``."""
    from geomkit.strategies import SAGO, Strategy

    class Odd(SAGO):
        never_opposes = False

    odd = Strategy(Odd(), name="odd")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(9))]
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    optimizer = torch.optim.SGD(params, lr=0.5)
    rec = Recorder(tmp_path / "g.zarr", names, [30, 9], odd, shadows=["sum"], verify_every=1)
    for step in range(2):
        f = [torch.randn_like(p) for p in params]
        r = [torch.randn_like(p) for p in params]
        want = odd(f, r)
        into = [x.clone() for x in f]
        observation = rec.observe(f, r, into=into, step_model=StepModel(optimizer, params))
        rec.record(step, observation=observation)
        for got, expected in zip(into, want, strict=True):
            assert torch.equal(got, expected)
    rec.close()
    m = geomkit.open_run(tmp_path / "g.zarr").geom.metrics(by="tensor")
    np.testing.assert_allclose(m["cos_ud"], 1.0, atol=1e-12)


def test_unmodelled_options_are_refused_when_the_model_is_built() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"invalid AdamW\(amsgrad=True\)"):
        StepModel(torch.optim.AdamW([p], amsgrad=True), [p])
    with pytest.raises(ValueError, match=r"invalid SGD\(maximize=True\)"):
        StepModel(torch.optim.SGD([p], lr=0.1, maximize=True), [p])
    with pytest.raises(ValueError, match="invalid max_grad_norm=True"):
        StepModel(torch.optim.SGD([p], lr=0.1), [p], max_grad_norm=True)
    model = StepModel(torch.optim.SGD([p], lr=0.1), [p], max_grad_norm=np.float32(1.0))
    assert model.max_grad_norm == 1.0
    model.begin(dd=1.0)
    with pytest.raises(IndexError, match="invalid index=1: expected 0 <= index < 1"):
        model.statistics(1, p.detach(), p.detach(), p.detach())
