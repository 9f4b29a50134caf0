"""Tests for geomkit.objectives: the forget and retain losses of docs/method.md#objectives.

Layout:

1. every loss against a hand computation: logits (or hidden states) from one forward pass of
   a tiny Llama, then plain Python loops over sequences, tokens and vocabulary in float64, on a
   batch with a masked prompt, right padding, left padding and three different lengths;
2. special values: NPO with an identical reference is (2/beta) log 2, KL and RMURetain are 0
   for identical models, sequences without loss tokens drop out of the NPO/SimNPO means;
3. gradients reach the model and never the reference; bfloat16 agrees with float32;
4. input and parameter errors, with their messages;
5. build_objective, Objective, repr and equality.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import transformers

from geomkit.objectives import (
    GA,
    IGNORE_INDEX,
    KL,
    NLL,
    NPO,
    OBJECTIVES,
    RMU,
    ForgetLoss,
    Objective,
    RetainLoss,
    RMURetain,
    SimNPO,
    build_objective,
    rmu_trainable,
)

VOCAB = 50
HIDDEN = 16
N_LAYERS = 2
X = IGNORE_INDEX


def tiny_model(seed: int = 0, layers: int = N_LAYERS) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every parameter shifted by ``scale`` times Gaussian noise."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))
    return other


@pytest.fixture
def model() -> transformers.LlamaForCausalLM:
    return tiny_model()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three sequences: a masked two-token prompt (7 tokens), right padding (5 tokens) and left
    padding (4 tokens). Padded positions have attention_mask 0 and label -100; so has the first
    real token after left padding (it would be predicted from a pad position)."""
    ids = torch.tensor(
        [
            [3, 17, 9, 41, 5, 22, 30],
            [8, 12, 44, 1, 19, 0, 0],
            [0, 0, 0, 27, 6, 33, 15],
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 1],
        ]
    )
    labels = torch.tensor(
        [
            [X, X, 9, 41, 5, 22, 30],
            [8, 12, 44, 1, 19, X, X],
            [X, X, X, X, 6, 33, 15],
        ]
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# Hand computations (plain Python float64 loops, independent of the vectorised code)
# --------------------------------------------------------------------------------------------


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list:
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.double().tolist()


def hidden_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], layer: int) -> list:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
    return out.hidden_states[layer + 1].double().tolist()


def log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand_token_nll(logits: list, labels: torch.Tensor) -> list[list[float]]:
    """Per sequence, the NLL of each loss-carrying token (position t predicted at t - 1)."""
    out = []
    for b, row in enumerate(labels.tolist()):
        seq = []
        for t in range(1, len(row)):
            if row[t] != X:
                seq.append(-log_softmax(logits[b][t - 1])[row[t]])
        out.append(seq)
    return out


def hand_kl(ref_logits: list, logits: list, labels: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b, row in enumerate(labels.tolist()):
        for t in range(1, len(row)):
            if row[t] == X:
                continue
            log_q = log_softmax(ref_logits[b][t - 1])
            log_p = log_softmax(logits[b][t - 1])
            total += sum(math.exp(q) * (q - p) for q, p in zip(log_q, log_p, strict=True))
            count += 1
    return total / count


def hand_mse(h: list, target, mask: torch.Tensor) -> float:
    """Mean over non-padded tokens and hidden dims of (h - target)^2; ``target(b, t, i)``."""
    total, count = 0.0, 0
    for b, row in enumerate(mask.tolist()):
        for t, m in enumerate(row):
            if not m:
                continue
            for i, v in enumerate(h[b][t]):
                total += (v - target(b, t, i)) ** 2
                count += 1
    return total / count


# --------------------------------------------------------------------------------------------
# 1. Losses against hand computations
# --------------------------------------------------------------------------------------------


def test_batch_fixture_has_sequences_of_different_lengths(batch) -> None:
    counts = (batch["labels"][:, 1:] != X).sum(-1).tolist()
    assert counts == [5, 4, 3]
    assert batch["attention_mask"].sum(-1).tolist() == [7, 5, 4]


def test_ga_and_nll_are_token_means(model, batch) -> None:
    per_seq = hand_token_nll(logits_of(model, batch), batch["labels"])
    tokens = [v for seq in per_seq for v in seq]
    expected = sum(tokens) / len(tokens)  # token mean over the batch, 12 tokens
    assert NLL()(model, batch).item() == pytest.approx(expected, rel=1e-5)
    assert GA()(model, batch).item() == pytest.approx(-expected, rel=1e-5)
    # a mean of per-sequence means would differ on sequences of different lengths
    seq_means = sum(sum(s) / len(s) for s in per_seq) / len(per_seq)
    assert abs(seq_means - expected) > 1e-4


def test_ga_gradient_is_negated_nll_gradient(model, batch) -> None:
    GA()(model, batch).backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    NLL()(model, batch).backward()
    for g, p in zip(ga, model.parameters(), strict=True):
        torch.testing.assert_close(g, -p.grad)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_with_identical_reference_is_two_log_two_over_beta(model, batch, beta) -> None:
    loss = NPO(beta)(model, batch, reference=copy.deepcopy(model))
    assert loss.item() == pytest.approx(2.0 / beta * math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_npo_matches_hand(model, batch, beta) -> None:
    reference = perturbed(model, scale=0.2)
    nll = hand_token_nll(logits_of(model, batch), batch["labels"])
    ref_nll = hand_token_nll(logits_of(reference, batch), batch["labels"])
    terms = []
    for seq, ref_seq in zip(nll, ref_nll, strict=True):
        log_ratio = -sum(seq) + sum(ref_seq)  # log pi_theta(y) - log pi_ref(y)
        terms.append(log_sigmoid(-beta * log_ratio))
    expected = -(2.0 / beta) * sum(terms) / len(terms)
    assert expected != pytest.approx(2.0 / beta * math.log(2.0), rel=1e-3)
    assert NPO(beta)(model, batch, reference=reference).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("beta", "delta"), [(2.5, 0.0), (0.7, 0.1), (5.0, 4.0)])
def test_simnpo_matches_hand(model, batch, beta, delta) -> None:
    nll = hand_token_nll(logits_of(model, batch), batch["labels"])
    terms = [log_sigmoid(beta * (sum(seq) / len(seq) - delta)) for seq in nll]
    expected = -(2.0 / beta) * sum(terms) / len(terms)
    assert SimNPO(beta, delta)(model, batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "make", [lambda: NPO(0.5), lambda: SimNPO(0.7, 0.1)], ids=["npo", "simnpo"]
)
def test_sequences_without_loss_tokens_leave_the_mean(model, batch, make) -> None:
    """A fourth row whose labels are all -100 changes nothing (rows are independent)."""
    reference = perturbed(model)
    extra = {
        "input_ids": torch.cat([batch["input_ids"], torch.tensor([[4, 5, 6, 7, 8, 9, 10]])]),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(1, 7, dtype=int)]),
        "labels": torch.cat([batch["labels"], torch.full((1, 7), X)]),
    }
    loss = make()
    torch.testing.assert_close(
        loss(model, extra, reference=reference), loss(model, batch, reference=reference)
    )


def test_kl_is_zero_for_identical_models(model, batch) -> None:
    assert KL()(model, batch, reference=copy.deepcopy(model)).item() == pytest.approx(0, abs=1e-7)


def test_kl_matches_hand_and_is_positive(model, batch) -> None:
    reference = perturbed(model, scale=0.2)
    expected = hand_kl(logits_of(reference, batch), logits_of(model, batch), batch["labels"])
    loss = KL()(model, batch, reference=reference).item()
    assert expected > 1e-4
    assert loss == pytest.approx(expected, rel=1e-4)


def test_rmu_direction_is_a_deterministic_unit_vector() -> None:
    u = RMU(seed=3).steering_vector(HIDDEN)
    assert u.shape == (HIDDEN,)
    assert u.dtype == torch.float32
    assert torch.linalg.vector_norm(u.double()).item() == pytest.approx(1.0, abs=1e-6)
    assert bool((u >= 0).all())  # uniform on [0, 1)^d before normalising, as in the WMDP code
    torch.testing.assert_close(RMU(seed=3).steering_vector(HIDDEN), u, rtol=0, atol=0)
    assert not torch.equal(RMU(seed=4).steering_vector(HIDDEN), u)
    # the global RNG is neither used nor advanced
    state = torch.random.get_rng_state()
    RMU(seed=5).steering_vector(HIDDEN)
    assert torch.equal(torch.random.get_rng_state(), state)
    bf16 = RMU(seed=3).steering_vector(HIDDEN, device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, u.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("coefficient", [2.0, 6.5])
def test_rmu_matches_hand(model, batch, layer, coefficient) -> None:
    rmu = RMU(layer=layer, coefficient=coefficient, seed=7)
    u = rmu.steering_vector(HIDDEN).double().tolist()
    h = hidden_of(model, batch, layer)
    expected = hand_mse(h, lambda b, t, i: coefficient * u[i], batch["attention_mask"])
    assert rmu(model, batch).item() == pytest.approx(expected, rel=1e-5)


def test_rmu_activation_is_the_decoder_block_output(model, batch) -> None:
    """``hidden_states[layer + 1]`` is what decoder block ``layer`` returns (non-last block)."""
    captured = []
    handle = model.model.layers[0].register_forward_hook(
        lambda module, args, output: captured.append(
            output[0] if isinstance(output, tuple) else output
        )
    )
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    u = RMU(layer=0).steering_vector(HIDDEN).double().tolist()
    h = captured[0].double().tolist()
    expected = hand_mse(h, lambda b, t, i: 2.0 * u[i], batch["attention_mask"])
    assert RMU(layer=0)(model, batch).item() == pytest.approx(expected, rel=1e-5)


def test_rmu_ignores_padded_positions(model, batch) -> None:
    """Changing the token under a padded position changes no counted activation."""
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 5:] = 49  # right padding of sequence 1
    rmu = RMU(layer=1)
    torch.testing.assert_close(rmu(model, other), rmu(model, batch))


def test_rmu_retain_is_zero_for_identical_models_and_matches_hand(model, batch) -> None:
    assert RMURetain(1)(model, batch, reference=copy.deepcopy(model)).item() == 0.0
    reference = perturbed(model)
    for layer in (0, 1):
        h, h_ref = hidden_of(model, batch, layer), hidden_of(reference, batch, layer)
        expected = hand_mse(h, lambda b, t, i, h_ref=h_ref: h_ref[b][t][i], batch["attention_mask"])
        loss = RMURetain(layer)(model, batch, reference=reference).item()
        assert expected > 0
        assert loss == pytest.approx(expected, rel=1e-5)


def test_rmu_default_layer_is_seven_or_the_last(model, batch) -> None:
    assert RMU().resolve_layer(32) == 7
    assert RMU().resolve_layer(8) == 7
    assert RMU().resolve_layer(4) == 3
    assert RMURetain().resolve_layer(2) == 1
    torch.testing.assert_close(RMU()(model, batch), RMU(layer=N_LAYERS - 1)(model, batch))
    reference = perturbed(model)
    torch.testing.assert_close(
        RMURetain()(model, batch, reference=reference),
        RMURetain(N_LAYERS - 1)(model, batch, reference=reference),
    )


# --------------------------------------------------------------------------------------------
# 2. Gradients and dtypes
# --------------------------------------------------------------------------------------------

LOSSES = {
    "ga": GA(),
    "nll": NLL(),
    "npo": NPO(0.5),
    "simnpo": SimNPO(0.7, 0.1),
    "kl": KL(),
    "rmu": RMU(layer=1),
    "rmu_retain": RMURetain(layer=0),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_the_model_and_never_the_reference(model, batch, name) -> None:
    reference = perturbed(model)
    assert all(p.requires_grad for p in reference.parameters())
    loss = LOSSES[name](model, batch, reference=reference)
    assert loss.shape == ()
    assert loss.dtype == torch.float32
    assert loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert any(bool(g.abs().sum() > 0) for g in grads)
    assert all(p.grad is None for p in reference.parameters())


@pytest.mark.parametrize("name", list(LOSSES))
def test_bfloat16_is_finite_and_close_to_float32(model, batch, name) -> None:
    reference = perturbed(model, scale=0.2)
    loss = LOSSES[name]
    expected = loss(model, batch, reference=reference).item()
    low = copy.deepcopy(model).to(torch.bfloat16)
    actual = loss(low, batch, reference=copy.deepcopy(reference).to(torch.bfloat16))
    assert actual.dtype == torch.float32
    assert math.isfinite(actual.item())
    assert actual.item() == pytest.approx(expected, rel=0.05, abs=2e-3)


# --------------------------------------------------------------------------------------------
# 3. Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NPO(0.0), r"NPO: invalid beta=0\.0: expected a finite number > 0"),
        (lambda: NPO(-1), r"NPO: invalid beta=-1: expected a finite number > 0"),
        (lambda: SimNPO(beta=0), r"SimNPO: invalid beta=0: expected a finite number > 0"),
        (lambda: NPO(float("nan")), r"NPO: invalid beta=nan: expected a finite number > 0"),
        (lambda: SimNPO(delta=float("nan")), r"SimNPO: invalid delta=nan: expected a finite num"),
        (lambda: RMU(coefficient=float("nan")), r"invalid coefficient=nan: expected a finite"),
        (lambda: RMU(coefficient=float("inf")), r"invalid coefficient=inf: expected a finite"),
        (lambda: RMU(coefficient=0), r"invalid coefficient=0: expected a finite number > 0"),
        (lambda: RMU(layer=-1), r"RMU: invalid layer=-1: expected an integer >= 0"),
        (lambda: RMURetain(layer=-2), r"RMURetain: invalid layer=-2: expected an integer >= 0"),
        (lambda: RMU(seed=-1), r"RMU: invalid seed=-1: expected an integer >= 0"),
        (lambda: build_objective("npo", beta=0), r"invalid beta=0: expected a finite number > 0"),
        (lambda: build_objective("simnpo", beta=float("nan")), r"invalid beta=nan"),
        (lambda: build_objective("simnpo", delta=float("nan")), r"invalid delta=nan"),
        (lambda: build_objective("rmu", coefficient=float("nan")), r"invalid coefficient=nan"),
    ],
)
def test_bad_parameters_raise_value_error(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make",
    [lambda: NPO("0.1"), lambda: NPO(True), lambda: RMU(layer=1.5), lambda: RMU(seed=None)],
)
def test_parameters_of_the_wrong_type_raise_type_error(make) -> None:
    with pytest.raises(TypeError, match=r"^\w+: invalid \w+=.*: expected "):
        make()


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (RMU(layer=5), r"^RMU: invalid layer=5: "),
        (RMURetain(layer=2), r"^RMURetain: invalid layer=2: "),
    ],
)
def test_rmu_layer_out_of_range(model, batch, loss, match) -> None:
    expected = r"expected an integer in \[0, 1\] \(the model has 2 decoder layers\)$"
    with pytest.raises(ValueError, match=match + expected):
        loss(model, batch, reference=copy.deepcopy(model))


@pytest.mark.parametrize("loss", [NPO(), KL(), RMURetain()], ids=repr)
def test_missing_reference(model, batch, loss) -> None:
    name = type(loss).__name__
    match = rf"^{name}: invalid reference=None: expected a frozen reference model$"
    with pytest.raises(ValueError, match=match):
        loss(model, batch)


@pytest.mark.parametrize("name", list(LOSSES))
def test_missing_batch_keys(model, batch, name) -> None:
    loss = LOSSES[name]
    key = "attention_mask" if name.startswith("rmu") else "labels"
    partial = {k: v for k, v in batch.items() if k != key}
    with pytest.raises(
        ValueError, match=rf"invalid batch with keys .*: expected the keys .*\(missing '{key}'\)"
    ):
        loss(model, partial, reference=model)


def test_batch_must_be_a_mapping_with_matching_shapes(model, batch) -> None:
    with pytest.raises(TypeError, match="invalid batch of type Tensor: expected a mapping"):
        GA()(model, batch["input_ids"])
    bad = dict(batch, labels=batch["labels"][:, :-1])
    with pytest.raises(
        ValueError, match=r"invalid batch\['labels'\] of shape .*: expected the shape"
    ):
        NLL()(model, bad)
    bad = dict(batch, input_ids=batch["input_ids"][0])
    with pytest.raises(
        ValueError,
        match=r"invalid batch\['input_ids'\].*: expected an integer tensor \[batch, tokens\]",
    ):
        NLL()(model, bad)


@pytest.mark.parametrize("name", ["ga", "nll", "npo", "simnpo", "kl"])
def test_no_loss_carrying_token(model, batch, name) -> None:
    labels = torch.full_like(batch["labels"], X)
    labels[:, 0] = 5  # the first position is never predicted, so it carries no loss
    with pytest.raises(ValueError, match="has no loss-carrying token"):
        LOSSES[name](model, dict(batch, labels=labels), reference=model)


@pytest.mark.parametrize("name", ["rmu", "rmu_retain"])
def test_no_non_padded_token(model, batch, name) -> None:
    empty = dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"]))
    with pytest.raises(ValueError, match=r"no non-padded token \(attention_mask is 0"):
        LOSSES[name](model, empty, reference=model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "sago"}, r"invalid objective='sago': expected one of ga, graddiff, npo, simnpo"),
        (
            {"name": "npo", "retain_loss": "mse"},
            r"invalid retain_loss='mse': expected one of nll, kl",
        ),
        ({"name": "ga", "beta": 0.1}, r"invalid beta=0\.1: expected None for objective 'ga'"),
        ({"name": "npo", "delta": 0.1}, r"invalid delta=0\.1: expected None for objective 'npo'"),
        ({"name": "simnpo", "layer": 3}, r"invalid layer=3: expected None for objective 'simnpo'"),
        (
            {"name": "graddiff", "coefficient": 2},
            r"invalid coefficient=2: expected None for objective 'graddiff'",
        ),
        (
            {"name": "ga", "retain_loss": "kl"},
            r"invalid retain_loss='kl': expected 'nll' or 'none' for 'ga' \(use",
        ),
        (
            {"name": "rmu", "retain_loss": "kl"},
            r"invalid retain_loss='kl': expected 'nll' or 'none' for 'rmu'",
        ),
        (
            {"name": "graddiff", "retain_loss": "none"},
            r"invalid retain_loss='none': expected 'nll' or 'kl' for 'graddiff'",
        ),
    ],
)
def test_build_objective_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_objective(**kwargs)


def test_objective_validates_its_fields() -> None:
    with pytest.raises(TypeError, match=r"invalid forget=.*: expected a ForgetLoss, got NLL"):
        Objective("x", NLL(), None)
    with pytest.raises(TypeError, match=r"retain=.*: expected a RetainLoss or None, got GA"):
        Objective("x", GA(), GA())
    with pytest.raises(ValueError, match=r"invalid trainable='\(': expected a valid regex"):
        Objective("x", GA(), None, trainable="(")


# --------------------------------------------------------------------------------------------
# 4. build_objective, Objective, repr
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "retain", "forget_type", "retain_type", "needs_reference"),
    [
        ("ga", "nll", GA, None, False),
        ("ga", "none", GA, None, False),
        ("graddiff", "nll", GA, NLL, False),
        ("graddiff", "kl", GA, KL, True),
        ("npo", "nll", NPO, NLL, True),
        ("npo", "kl", NPO, KL, True),
        ("npo", "none", NPO, None, True),
        ("simnpo", "nll", SimNPO, NLL, False),
        ("simnpo", "kl", SimNPO, KL, True),
        ("simnpo", "none", SimNPO, None, False),
        ("rmu", "nll", RMU, RMURetain, True),
        ("rmu", "none", RMU, None, False),
    ],
)
def test_build_objective_classes(name, retain, forget_type, retain_type, needs_reference) -> None:
    objective = build_objective(name, retain_loss=retain)
    assert objective.name == name
    assert type(objective.forget) is forget_type
    assert (type(objective.retain) if objective.retain else None) is retain_type
    assert objective.needs_reference is needs_reference
    assert isinstance(objective.forget, ForgetLoss)
    assert objective.retain is None or isinstance(objective.retain, RetainLoss)


def test_objectives_constant_and_defaults() -> None:
    assert OBJECTIVES == ("ga", "graddiff", "npo", "simnpo", "rmu")
    assert build_objective("npo").forget == NPO(beta=0.1)
    assert build_objective("simnpo").forget == SimNPO(beta=2.5, delta=0.0)
    assert build_objective("simnpo", beta=0.7, delta=0.1).forget == SimNPO(0.7, 0.1)
    assert build_objective("rmu").forget == RMU(layer=None, coefficient=2.0, seed=0)
    assert build_objective("rmu", layer=7, coefficient=6.5, seed=2).forget == RMU(7, 6.5, 2)
    assert build_objective("rmu", layer=7).retain == RMURetain(7)
    for name in ("ga", "graddiff", "npo", "simnpo"):
        assert build_objective(name).trainable is None
        assert build_objective(name).trainable_for(N_LAYERS) is None


def test_rmu_trainable_patterns(model) -> None:
    assert rmu_trainable(7) == r"layers\.(5|6|7)\.mlp\.down_proj"
    assert rmu_trainable(1) == r"layers\.(0|1)\.mlp\.down_proj"
    assert build_objective("rmu", layer=7).trainable == r"layers\.(5|6|7)\.mlp\.down_proj"
    assert build_objective("rmu", layer=7).trainable_for(32) == r"layers\.(5|6|7)\.mlp\.down_proj"
    unresolved = build_objective("rmu")
    assert unresolved.trainable is None
    assert unresolved.trainable_for(32) == r"layers\.(5|6|7)\.mlp\.down_proj"
    pattern = unresolved.trainable_for(N_LAYERS)
    names = [n for n, _ in model.named_parameters() if re.search(pattern, n)]
    assert names == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    big = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(32)]
    assert [n for n in big if re.search(rmu_trainable(7), n)] == big[5:8]
    with pytest.raises(
        ValueError,
        match=r"invalid layer=7: expected an integer in \[0, 3\] \(the model has 4 decoder",
    ):
        build_objective("rmu", layer=7).trainable_for(4)
    custom = Objective("rmu", RMU(), RMURetain(), trainable=r"mlp")
    assert custom.trainable_for(N_LAYERS) == "mlp"


@pytest.mark.parametrize(
    "loss",
    [GA(), NLL(), KL(), NPO(0.05), SimNPO(0.7, 0.1), RMU(3, 6.5, 1), RMU(), RMURetain(3)],
    ids=repr,
)
def test_repr_is_a_constructor_call(loss) -> None:
    namespace = {c.__name__: c for c in (GA, NLL, KL, NPO, SimNPO, RMU, RMURetain)}
    rebuilt = eval(repr(loss), namespace)
    assert rebuilt == loss
    assert hash(rebuilt) == hash(loss)


def test_objective_repr_and_equality() -> None:
    objective = build_objective("simnpo", beta=0.7, delta=0.1)
    assert repr(objective) == (
        "Objective(name='simnpo', forget=SimNPO(beta=0.7, delta=0.1), retain=NLL(), trainable=None)"
    )
    assert objective == build_objective("simnpo", beta=0.7, delta=0.1)
    assert objective != build_objective("simnpo", beta=0.7, delta=0.2)
