"""Multiple-choice evaluation of a local causal LM, scored by log-likelihood (WMDP, MMLU style).

See docs/study.md#evaluation.

A question file is JSONL, one question per line::

    {"question": "Which gas do plants take up?", "choices": ["oxygen", "CO2"], "answer": 1}

``answer`` is the index of the right choice. The model picks the choice whose tokens, after the
prompt ``"{question}\\nAnswer:"`` and a space, have the highest total log-likelihood (as the
evaluation harnesses score WMDP and MMLU); accuracy is the share of questions where that is the
right one. ``geomkit run --eval-data NAME=FILE`` scores each file at every evaluation as
``NAME_acc`` (``forget=FILE`` gives ``forget_acc``, so a sweep can match forgetting on it).

>>> q = Question("2 + 2 =", ("3", "4"), 1)
>>> q.prompt()
'2 + 2 =\\nAnswer:'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geomkit._validation import ConfigError

__all__ = ["PROMPT", "Question", "accuracy", "read_questions"]

PROMPT = "{question}\nAnswer:"
"""How a question is put to the model; each choice follows after one space."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: its text, its choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int

    def prompt(self) -> str:
        """The text the choices are scored after."""
        return PROMPT.format(question=self.question)


def read_questions(path: str | os.PathLike) -> list[Question]:
    """The questions of a JSONL file; ConfigError naming the line of any malformed one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"invalid eval_data file {str(path)!r}: expected an existing JSONL file")
    from geomkit.corpora import jsonl_records

    questions = []
    for where, record in jsonl_records(path):
        question, choices, answer = (record.get(k) for k in ("question", "choices", "answer"))
        if not isinstance(question, str):
            raise ConfigError(f"{where}: invalid question={question!r}: expected a string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ConfigError(
                f"{where}: invalid choices={choices!r}: expected a list of >= 2 non-empty strings"
            )
        if (
            isinstance(answer, bool)
            or not isinstance(answer, int)
            or not 0 <= answer < len(choices)
        ):
            raise ConfigError(
                f"{where}: invalid answer={answer!r}: expected an index in [0, {len(choices) - 1}]"
            )
        questions.append(Question(question, tuple(choices), answer))
    if not questions:
        raise ConfigError(f"invalid eval_data file {str(path)!r}: it holds no question")
    return questions


def _log_likelihoods(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int
) -> list[float]:
    """Total log-probability of each continuation given its context."""
    import torch

    device = next(model.parameters()).device
    rows = []
    for context, continuation in pairs:
        left = tokenizer(context, add_special_tokens=True)["input_ids"]
        right = tokenizer(" " + continuation, add_special_tokens=False)["input_ids"]
        rows.append((left + right, len(left)))
    scores = []
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (row, _) in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, (row, start) in enumerate(batch):
            targets = torch.tensor(row[start:])
            predicted = logp[i, start - 1 : len(row) - 1]
            scores.append(float(predicted.gather(1, targets[:, None]).sum()))
    return scores


def accuracy(
    model: Any, tokenizer: Any, questions: Sequence[Question], *, batch_size: int = 8
) -> float:
    """Share of ``questions`` whose most likely choice is the right one (ties: the first).

    ``model`` is a causal LM returning ``.logits``; ``tokenizer`` a Hugging Face tokenizer.
    Scored in eval mode (the model's mode is restored after); no gradient is tracked.
    """
    if not questions:
        raise ValueError("accuracy: questions is empty")
    pairs = [(q.prompt(), choice) for q in questions for choice in q.choices]
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        scores = iter(_log_likelihoods(model, tokenizer, pairs, batch_size))
    finally:
        model.train(was_training)
    right = 0
    for q in questions:
        values = [next(scores) for _ in q.choices]
        right += max(range(len(values)), key=values.__getitem__) == q.answer
    return right / len(questions)
