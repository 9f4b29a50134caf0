"""Exact-match evaluation of a causal LM on the embedded benchmark.

See docs/method.md#embedded-benchmark.

A model answers a question by greedy decoding from :func:`geomkit.bench.data.qa_prompt` until
it emits ``<eos>``; the answer is right when it equals ``qa.answer`` word for word.
:func:`evaluate` scores the forget, retain and general splits, :func:`recovery` compares two
such scores, and :func:`matched_forgetting` reads a run's evaluation history at the first
step where forgetting reaches a threshold.

>>> from geomkit.bench.evaluate import matched_forgetting, recovery
>>> recovery({"forget_acc": 0.1, "retain_acc": 0.9, "general_acc": 0.5},
...          {"forget_acc": 1.0, "retain_acc": 1.0, "general_acc": 0.5})
{'forget_recovery': 0.1, 'retain_recovery': 0.9, 'general_recovery': 1.0}
>>> history = [(0, {"forget_acc": 1.0, "retain_acc": 1.0, "general_acc": 0.4}),
...            (10, {"forget_acc": 0.05, "retain_acc": 0.8, "general_acc": 0.3})]
>>> matched_forgetting(history, threshold=0.1)
{'step': 10, 'retain_acc': 0.8, 'general_acc': 0.3}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from geomkit._validation import check_integer, check_real, invalid
from geomkit.bench.data import QA, BenchmarkData, qa_prompt
from geomkit.bench.tokenizer import WordTokenizer

__all__ = [
    "METRICS",
    "evaluate",
    "exact_match",
    "greedy_answers",
    "matched_forgetting",
    "recovery",
]

QUESTION_SETS: dict[str, str] = {
    "forget_acc": "forget_qa",
    "forget_heldout_acc": "forget_heldout_qa",
    "retain_acc": "retain_qa",
    "retain_heldout_acc": "retain_heldout_qa",
    "general_acc": "general_qa",
}
"""Each metric of :func:`evaluate` and the :class:`~geomkit.bench.data.BenchmarkData` field
of the questions it scores (``*_heldout_*``: a phrasing no training ever sees)."""

METRICS: tuple[str, ...] = tuple(QUESTION_SETS)
"""The keys of :func:`evaluate`'s result."""

_SPLITS: tuple[str, ...] = ("forget", "retain", "general")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def _decode_group(
    model: torch.nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos_id: int
) -> list[list[int]]:
    """Greedy continuations of equal-length ``prompts`` [B, T], each cut before ``<eos>``."""
    ids = prompts
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[:, -1, :]
        token = logits.argmax(dim=-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == eos_id
        if bool(done.all()):
            break
    answers = []
    for row in ids[:, prompts.shape[1] :].tolist():
        answers.append(row[: row.index(eos_id)] if eos_id in row else row)
    return answers


def greedy_answers(
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts``, each up to (not including) the first ``<eos>``.

    Prompts are encoded with ``<bos>`` and grouped by token count, so batches need no padding
    and the result equals decoding every prompt on its own (up to floating-point ties).
    Special tokens other than the stopping ``<eos>`` are kept in the answer (a stray ``<bos>``
    or ``<pad>`` never passes for a correct answer).

    Parameters
    ----------
    model
        A causal LM whose call ``model(input_ids=...)`` returns an object with ``.logits``
        [B, T, V]; used as it is (no mode switch, no gradient tracking: see
        :func:`exact_match`).
    tokenizer
        The model's :class:`~geomkit.bench.tokenizer.WordTokenizer`.
    prompts
        The prompts, in any order; the answers come back in the same order.
    max_new_tokens
        Largest number of generated tokens, the ``<eos>`` included (>= 1).
    batch_size
        Largest number of prompts per forward pass (>= 1).

    Returns
    -------
    list of str
        The decoded answers, words joined by single spaces.
    """
    caller = "greedy_answers"
    max_new_tokens = check_integer("max_new_tokens", max_new_tokens, 1, owner=caller)
    batch_size = check_integer("batch_size", batch_size, 1, owner=caller)
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(encoded):
        groups.setdefault(len(row), []).append(i)
    device = _device(model)
    answers: list[str] = [""] * len(encoded)
    with torch.no_grad():
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                rows = _decode_group(model, ids, max_new_tokens, tokenizer.eos_id)
                for i, row in zip(chunk, rows, strict=True):
                    answers[i] = tokenizer.decode(row, skip_special=False)
    return answers


def exact_match(
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    qas: Sequence[QA],
    *,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
) -> float:
    """Share of ``qas`` whose greedy answer equals ``qa.answer`` (whitespace-normalised).

    The model is prompted with :func:`~geomkit.bench.data.qa_prompt` and decoded greedily
    (:func:`greedy_answers`) under ``torch.no_grad`` in eval mode; its training mode is
    restored afterwards.

    Parameters
    ----------
    model, tokenizer
        As for :func:`greedy_answers`.
    qas
        The question-answer pairs (at least one).
    batch_size
        Largest number of prompts per forward pass (>= 1).
    max_new_tokens
        Largest number of generated tokens (>= 1); None: the longest answer in tokens plus one
        for ``<eos>``.

    Returns
    -------
    float
        Accuracy in [0, 1].

    Raises
    ------
    ValueError
        If ``qas`` is empty or ``batch_size`` / ``max_new_tokens`` is < 1.
    """
    qas = list(qas)
    if not qas:
        raise ValueError("exact_match: qas is empty")
    if max_new_tokens is None:
        max_new_tokens = max(len(qa.answer.split()) for qa in qas) + 1
    was_training = model.training
    model.eval()
    try:
        answers = greedy_answers(
            model,
            tokenizer,
            [qa_prompt(qa) for qa in qas],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
    finally:
        model.train(was_training)
    right = sum(
        _normalise(answer) == _normalise(qa.answer) for answer, qa in zip(answers, qas, strict=True)
    )
    return right / len(qas)


def evaluate(
    model: torch.nn.Module, tokenizer: WordTokenizer, data: BenchmarkData, *, batch_size: int = 64
) -> dict[str, float]:
    """Exact match on the question sets of ``data`` (:data:`QUESTION_SETS`).

    Returns
    -------
    dict
        One accuracy in [0, 1] per metric of :data:`METRICS` whose questions ``data`` holds:
        ``forget_acc``, ``forget_heldout_acc``, ``retain_acc``, ``retain_heldout_acc``,
        ``general_acc``.
    """
    return {
        metric: exact_match(model, tokenizer, getattr(data, field), batch_size=batch_size)
        for metric, field in QUESTION_SETS.items()
        if getattr(data, field)
    }


def _metric(metrics: Mapping[str, Any], key: str, caller: str, name: str) -> float:
    if key not in metrics:
        raise ValueError(f"{caller}: {name} has no {key!r} (keys: {sorted(metrics)})")
    return float(metrics[key])


def recovery(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    """Accuracies of ``after`` relative to ``before`` (e.g. unlearned / pretrained).

    Returns
    -------
    dict
        ``forget_recovery``, ``retain_recovery`` and ``general_recovery``, each
        ``after[...] / before[...]``, NaN where ``before`` is 0.

    Raises
    ------
    ValueError
        If either mapping lacks one of :data:`METRICS`.
    """
    result = {}
    for split in _SPLITS:
        key = f"{split}_acc"
        a = _metric(after, key, "recovery", "after")
        b = _metric(before, key, "recovery", "before")
        result[f"{split}_recovery"] = a / b if b != 0 else math.nan
    return result


def matched_forgetting(
    history: Sequence[tuple[int, Mapping[str, float]]], threshold: float = 0.1
) -> dict[str, float] | None:
    """The retain and general accuracy at the first evaluation with ``forget_acc <= threshold``.

    Comparing methods at matched forgetting avoids rewarding a method that keeps utility only
    because it forgets less.

    Parameters
    ----------
    history
        ``(step, metrics)`` evaluations in increasing step order; ``metrics`` holds
        ``forget_acc``, ``retain_acc`` and ``general_acc``.
    threshold
        Forget accuracy to reach, in [0, 1]; reaching it exactly counts.

    Returns
    -------
    dict or None
        ``{"step", "retain_acc", "general_acc"}`` of the first such evaluation, or None if
        forgetting never reached ``threshold``.

    Raises
    ------
    ValueError
        If ``threshold`` is outside [0, 1], the steps are not increasing, or an evaluation
        lacks a metric.
    """
    check_real("threshold", threshold, 0.0, 1.0, owner="matched_forgetting")
    previous = None
    for step, _ in history:
        if previous is not None and step <= previous:
            raise invalid(
                "step",
                step,
                f"a step after step {previous} (steps must increase)",
                owner="matched_forgetting",
            )
        previous = step
    for step, metrics in history:
        name = f"the metrics of step {step}"
        if _metric(metrics, "forget_acc", "matched_forgetting", name) <= threshold:
            return {
                "step": step,
                "retain_acc": _metric(metrics, "retain_acc", "matched_forgetting", name),
                "general_acc": _metric(metrics, "general_acc", "matched_forgetting", name),
            }
    return None
