"""The predicted step u of geomkit.step equals the parameter change the optimizer makes.

u is predicted in float64 from the state before the step; the optimizer then steps in float32,
rounding its moments, its quotient and the new parameter. So the tolerance per element is a few
float32 units of the parameter (the subtraction theta_old - u is rounded to theta's grid) plus a
few float32 units of u itself (about ten float32 operations form it).
"""

from __future__ import annotations

import pytest
import torch

from geomkit import step as gstep

EPS32 = torch.finfo(torch.float32).eps


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (33,), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _check_steps(optimizer, params, steps: int = 5, seed: int = 1, scheduler=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) * 0.1 for p in params]
        predicted = [gstep.next_step(optimizer, p, gr) for p, gr in zip(params, grads, strict=True)]
        old = [p.detach().clone() for p in params]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        for p, o, u in zip(params, old, predicted, strict=True):
            realised = (o.double() - p.detach().double()).reshape(-1)
            tol = 4 * EPS32 * o.double().abs().reshape(-1) + 16 * EPS32 * u.abs() + 1e-12
            assert torch.all((realised - u).abs() <= tol), (realised - u).abs().max()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_step_is_predicted(weight_decay):
    params = _params(0)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    _check_steps(optimizer, params, scheduler=schedule)


def test_adam_l2_and_custom_betas_are_predicted():
    params = _params(2)
    optimizer = torch.optim.Adam(params, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    _check_steps(optimizer, params)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.1},
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.3},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ],
    ids=["plain", "wd", "momentum", "dampening", "nesterov"],
)
def test_sgd_step_is_predicted(options):
    params = _params(3)
    optimizer = torch.optim.SGD(params, lr=0.05, **options)
    _check_steps(optimizer, params)


def test_plain_sgd_step_is_lr_times_grad_exactly():
    p = torch.nn.Parameter(torch.randn(100))
    grad = torch.randn(100)
    u = gstep.next_step(torch.optim.SGD([p], lr=0.25), p, grad)
    assert torch.equal(u, 0.25 * grad.double())


def test_pieces_equal_the_whole():
    params = _params(4)
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    _check_steps(optimizer, params, steps=2)  # a state to read
    p = params[0]
    grad = torch.randn(p.shape)
    whole = gstep.next_step(optimizer, p, grad)
    flat = grad.reshape(-1)
    pieces = [gstep.next_step(optimizer, p, flat[a:b], slice(a, b)) for a, b in [(0, 12), (12, 35)]]
    assert torch.equal(torch.cat(pieces), whole)


def test_unsupported_optimizers_and_bad_input_are_named():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="invalid optimizer RMSprop: the step statistics model"):
        gstep.next_step(torch.optim.RMSprop([p]), p, torch.zeros(3))
    with pytest.raises(ValueError, match=r"invalid AdamW\(amsgrad=True\)"):
        gstep.next_step(torch.optim.AdamW([p], amsgrad=True), p, torch.zeros(3))
    with pytest.raises(ValueError, match=r"invalid SGD\(maximize=True\)"):
        gstep.next_step(torch.optim.SGD([p], lr=0.1, maximize=True), p, torch.zeros(3))
    other = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="expected one of the SGD's parameters"):
        gstep.next_step(torch.optim.SGD([p], lr=0.1), other, torch.zeros(3))
    with pytest.raises(ValueError, match="invalid grad of 2 elements: expected 3"):
        gstep.next_step(torch.optim.SGD([p], lr=0.1), p, torch.zeros(2))
    with pytest.raises(ValueError, match="invalid optimizer='adam'"):
        gstep.build_optimizer("adam", [p], 0.1, 0.0)


def test_engine_sgd_step_is_lr_times_the_update(tmp_path):
    """EngineConfig(optimizer="sgd"), no clipping, no weight decay: theta moves by lr * d."""
    from tiny import VOCAB, tiny_llama

    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    def batch(seed: int) -> dict:
        ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    model = tiny_llama(0)
    config = EngineConfig(
        strategy="sago", optimizer="sgd", lr=0.5, steps=1, max_grad_norm=None, record_every=0
    )
    unlearner = Unlearner(model, build_objective("graddiff"), [batch(1)], [batch(2)], config)
    assert type(unlearner.optimizer) is torch.optim.SGD
    captured = []
    unlearner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: captured.append([p.grad.clone() for p in unlearner.params])
    )
    old = [p.detach().clone() for p in unlearner.params]
    unlearner.step()
    for o, p, d in zip(old, unlearner.params, captured[0], strict=True):
        # PyTorch's add_(d, alpha=-lr): one rounding (or none, with a fused multiply-add)
        want = o.double() - 0.5 * d.double()
        assert torch.all((p.detach().double() - want).abs() <= EPS32 * want.abs())


def test_engine_rejects_an_unknown_optimizer():
    from geomkit.config import ConfigError
    from geomkit.engine import EngineConfig

    with pytest.raises(ConfigError, match="invalid optimizer='adam': expected one of adamw, sgd"):
        EngineConfig(optimizer="adam").validate()


def test_engine_sgd_moves_by_the_scheduled_rate_and_resumes_only_as_sgd(tmp_path):
    """With warm-up the step uses the scheduled rate (recorded as learning_rate), not the peak;
    a checkpoint of one optimizer is not resumed by another."""
    from tiny import VOCAB, tiny_llama

    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    def batch(seed: int) -> dict:
        ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def unlearner(optimizer: str, **kw) -> Unlearner:
        config = EngineConfig(
            strategy="sum",
            optimizer=optimizer,
            lr=0.5,
            steps=10,
            warmup_ratio=0.3,
            max_grad_norm=None,
            record_every=0,
        )
        objective = build_objective("graddiff")
        return Unlearner(tiny_llama(0), objective, [batch(1)], [batch(2)], config, **kw)

    sgd = unlearner("sgd")
    captured = []
    sgd.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: captured.append([p.grad.clone() for p in sgd.params])
    )
    old = [p.detach().clone() for p in sgd.params]
    result = sgd.step()
    assert result.learning_rate == pytest.approx(0.5 / 4)  # warm-up: (0 + 1) / (3 + 1)
    for o, p, d in zip(old, sgd.params, captured[0], strict=True):
        want = o.double() - result.learning_rate * d.double()
        assert torch.all((p.detach().double() - want).abs() <= EPS32 * want.abs())
    sgd.save(tmp_path / "sgd.pt")
    with pytest.raises(
        ValueError, match="invalid optimizer='adamw': expected 'sgd', the optimizer"
    ):
        unlearner("adamw", resume_step=1).load(tmp_path / "sgd.pt")


def test_next_step_names_a_bad_piece():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match=r"invalid index=slice\(5, 2, None\): expected a contig"):
        gstep.next_step(opt, p, torch.zeros(0), slice(5, 2))
    with pytest.raises(TypeError, match="invalid index=3: expected a slice"):
        gstep.next_step(opt, p, torch.zeros(1), 3)
    with pytest.raises(ValueError, match=r"invalid param of shape \(2,\) and dtype torch.float32"):
        gstep.next_step(opt, torch.nn.Parameter(torch.zeros(2)), torch.zeros(2))
