"""Exact-match evaluation, history helpers, pretraining and the pretrained-model cache."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import geomkit.bench.model as bench_model
from geomkit.bench.data import QA, make_benchmark, qa_prompt, qa_text
from geomkit.bench.evaluate import (
    evaluate,
    exact_match,
    greedy_answers,
    matched_forgetting,
    recovery,
)
from geomkit.bench.model import (
    ModelConfig,
    TrainConfig,
    build_model,
    cache_key,
    load_or_pretrain,
    pretrain,
    training_texts,
)
from geomkit.bench.tokenizer import WordTokenizer

TINY = ModelConfig(hidden_size=32, layers=1, heads=2)


class BigramModel(torch.nn.Module):
    """A fake causal LM whose next token depends only on the last one, via a fixed table."""

    def __init__(self, vocab_size: int, table: dict[int, int]) -> None:
        super().__init__()
        logits = torch.zeros(vocab_size, vocab_size)
        for current, following in table.items():
            logits[current, following] = 1.0
        self.register_buffer("table", logits)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])


def _qa(question: str, answer: str) -> QA:
    return QA(question=question, answer=answer, entity="e", attribute="a")


# --------------------------------------------------------------------------------------------
# exact_match
# --------------------------------------------------------------------------------------------


def test_exact_match_on_a_model_that_spells_a_known_answer() -> None:
    right = [_qa("where is it ?", "red  fox"), _qa("what is it now ?", "red fox")]
    wrong = [_qa("where is it ?", "red"), _qa("what is it ?", "red fox jumps"), _qa("x ?", "fox")]
    tok = WordTokenizer.from_texts([qa_prompt(q) + " " + q.answer for q in right + wrong])
    ids = tok.encode(": red fox", bos=False)
    model = BigramModel(len(tok), {ids[0]: ids[1], ids[1]: ids[2], ids[2]: tok.eos_id})
    model.train()
    assert exact_match(model, tok, right) == 1.0
    assert exact_match(model, tok, wrong) == 0.0
    assert exact_match(model, tok, right + wrong, batch_size=2) == pytest.approx(2 / 5)
    assert model.training  # training mode restored
    # An answer cut off by max_new_tokens is what was generated so far.
    assert exact_match(model, tok, right, max_new_tokens=2) == 1.0
    assert greedy_answers(model, tok, ["where is it ? answer :"], max_new_tokens=1) == ["red"]


def test_exact_match_rejects_empty_and_bad_sizes() -> None:
    tok = WordTokenizer.from_texts(["a ?"])
    model = BigramModel(len(tok), {})
    with pytest.raises(ValueError, match="empty"):
        exact_match(model, tok, [])
    with pytest.raises(ValueError, match="batch_size"):
        exact_match(model, tok, [_qa("a ?", "a")], batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        exact_match(model, tok, [_qa("a ?", "a")], max_new_tokens=0)


def test_batched_decoding_equals_one_by_one_on_a_real_model() -> None:
    data = make_benchmark(n_entities=10, seed=1)
    tok = WordTokenizer.from_texts(data.texts())
    model = build_model(ModelConfig(hidden_size=32, layers=2, heads=2), len(tok), seed=3)
    qas = data.forget_qa + data.retain_qa + data.general_qa
    prompts = [qa_prompt(q) for q in qas]
    assert len({len(tok.encode(p)) for p in prompts}) > 1  # mixed prompt lengths
    batched = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=64)
    single = greedy_answers(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert exact_match(model, tok, qas) == exact_match(model, tok, qas, batch_size=1)
    # The reference loop: one prompt, full forward per token.
    ids = torch.tensor([tok.encode(prompts[0])])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    row = ids[0, len(tok.encode(prompts[0])) :].tolist()
    row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
    assert batched[0] == tok.decode(row, skip_special=False)


# --------------------------------------------------------------------------------------------
# recovery, matched_forgetting
# --------------------------------------------------------------------------------------------


def _m(forget: float, retain: float, general: float) -> dict[str, float]:
    return {"forget_acc": forget, "retain_acc": retain, "general_acc": general}


def test_recovery() -> None:
    result = recovery(_m(0.2, 0.45, 0.0), _m(0.8, 0.9, 0.0))
    assert result["forget_recovery"] == pytest.approx(0.25)
    assert result["retain_recovery"] == pytest.approx(0.5)
    assert math.isnan(result["general_recovery"])
    with pytest.raises(ValueError, match="retain_acc"):
        recovery({"forget_acc": 1.0}, _m(1, 1, 1))


def test_matched_forgetting() -> None:
    history = [(0, _m(1.0, 1.0, 0.5)), (5, _m(0.3, 0.9, 0.4)), (10, _m(0.1, 0.8, 0.3))]
    history += [(15, _m(0.0, 0.7, 0.2))]
    # Equal to the threshold counts; the first crossing wins.
    assert matched_forgetting(history, 0.1) == {"step": 10, "retain_acc": 0.8, "general_acc": 0.3}
    assert matched_forgetting(history, 0.5)["step"] == 5
    assert matched_forgetting(history, 1.0)["step"] == 0
    assert matched_forgetting(history[:2], 0.1) is None
    assert matched_forgetting([], 0.1) is None
    for threshold in (-0.01, 1.5, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            matched_forgetting(history, threshold)
    with pytest.raises(ValueError, match="increase"):
        matched_forgetting([history[1], history[0]])


# --------------------------------------------------------------------------------------------
# Pretraining and the cache
# --------------------------------------------------------------------------------------------


def test_pretraining_learns_the_facts() -> None:
    data = make_benchmark(n_entities=10, seed=0)
    config = ModelConfig(hidden_size=64, layers=2, heads=2)
    tok = WordTokenizer.from_texts(data.texts())
    untrained = evaluate(build_model(config, len(tok), seed=0), tok, data)
    seen: list[dict[str, float]] = []
    model, tokenizer, history = pretrain(
        data, config, TrainConfig(max_epochs=40, eval_every=5), progress=seen.append
    )
    assert tokenizer == tok
    assert seen == history
    assert [h["epoch"] for h in history] == list(range(5, 5 * len(history) + 1, 5))
    final = history[-1]
    print("smoke pretraining:", untrained, final)
    assert untrained["forget_acc"] == untrained["retain_acc"] == 0.0
    assert final["retain_acc"] >= 0.9
    assert final["forget_acc"] >= 0.6
    assert final == {**final, **evaluate(model, tokenizer, data)}


def test_cache_reuse(tmp_path, monkeypatch) -> None:
    train = TrainConfig(max_epochs=1, eval_every=1, seed=2)
    first = load_or_pretrain(tmp_path, 10, 0.2, 7, TINY, train)
    model, tok, data, info = first
    assert info["cached"] is False
    assert info["key"] == cache_key(
        {"n_entities": 10, "forget_fraction": 0.2, "seed": 7}, TINY, train
    )
    assert [p.name for p in tmp_path.iterdir()] == [info["key"]]  # no temporary left over

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrain was called for a cached model")

    monkeypatch.setattr(bench_model, "pretrain", refuse)
    model2, tok2, data2, info2 = load_or_pretrain(tmp_path, 10, 0.2, 7, TINY, train)
    assert info2["cached"] is True
    assert (tok2, data2, info2["history"], info2["key"]) == (
        tok,
        data,
        info["history"],
        info["key"],
    )
    state, state2 = model.state_dict(), model2.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert exact_match(model2, tok2, data2.retain_qa) == info2["final"]["retain_acc"]

    params = {"n_entities": 10, "forget_fraction": 0.2, "seed": 8}
    assert cache_key(params, TINY, train) != info["key"]
    with pytest.raises(AssertionError, match="cached"):
        load_or_pretrain(tmp_path, 10, 0.2, 8, TINY, train)


def test_general_probe_examples_are_repeated_never_the_probe_itself() -> None:
    data = make_benchmark(n_entities=10, seed=0)
    once, thrice = training_texts(data), training_texts(data, general_repeats=3)
    assert len(thrice) - len(once) == 2 * len(data.general_train_text)
    for text in data.general_train_text:
        assert thrice.count(text) == 3 * once.count(text)
    probe = {qa_text(q) for q in data.general_qa}
    assert not probe & set(thrice)
    with pytest.raises(ValueError, match="general_repeats"):
        TrainConfig(general_repeats=0)
    assert cache_key({}, TINY, TrainConfig()) != cache_key({}, TINY, TrainConfig(general_repeats=1))
