"""Relearning: does unlearned knowledge come back after a little fine-tuning?

See docs/study.md#evaluation.

Forgetting that only suppresses answers returns quickly when the model is fine-tuned again,
even on *other* facts of the forget split (Lynch et al., 2024, "Eight methods to evaluate robust
unlearning in LLMs"; Hu et al., ICLR 2025, "Unlearning or obfuscating? Jogging the memory of
unlearned LLMs via benign relearning"). :func:`relearn` splits the
forget entities in two halves (drawn with ``seed``), fine-tunes a copy of the model for
``steps`` AdamW steps on the texts of the first half (its sentences and trained questions), and
scores the forget questions of the second half, which it never saw, before and after.

>>> RELEARN_METRICS
('relearn_unseen_before', 'relearn_unseen_after', 'relearn_seen_after')
"""

from __future__ import annotations

import copy
import random

import torch

from geomkit._validation import check_integer, check_real
from geomkit.bench.data import BenchmarkData, qa_text
from geomkit.bench.evaluate import exact_match
from geomkit.bench.tokenizer import WordTokenizer

__all__ = ["RELEARN_METRICS", "relearn"]

RELEARN_METRICS: tuple[str, ...] = (
    "relearn_unseen_before",
    "relearn_unseen_after",
    "relearn_seen_after",
)
"""The keys of :func:`relearn`'s result: forget accuracy on the half never relearned, before and
after; and on the relearned half, after."""


def relearn(
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    data: BenchmarkData,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune a copy of ``model`` on half the forget entities; score the other half.

    Parameters
    ----------
    model
        The unlearned model (left unchanged).
    tokenizer, data
        The benchmark's tokenizer and data.
    steps
        AdamW steps of fine-tuning (>= 1), cycling through the first half's texts in a
        shuffled order.
    lr, batch_size, seed
        Learning rate, texts per step, and the seed of the split and the order.

    Returns
    -------
    dict
        :data:`RELEARN_METRICS`, each an exact-match accuracy in [0, 1].
    """
    steps = check_integer("steps", steps, 1, owner="relearn")
    lr = check_real("lr", lr, 0.0, strict=True, owner="relearn")
    batch_size = check_integer("batch_size", batch_size, 1, owner="relearn")
    rng = random.Random(seed)
    entities = list(data.forget_entities)
    rng.shuffle(entities)
    seen = set(entities[: len(entities) // 2])
    seen_qa = [q for q in data.forget_qa if q.entity in seen]
    unseen_qa = [q for q in data.forget_qa if q.entity not in seen]
    texts = [t for t in data.forget_text if any(f" {e} " in f" {t} " for e in seen)]
    texts += [qa_text(q) for q in data.trained_qa("forget") if q.entity in seen]
    rng.shuffle(texts)
    before = exact_match(model, tokenizer, unseen_qa)
    student = copy.deepcopy(model)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    device = next(student.parameters()).device
    for step in range(steps):
        first = (step * batch_size) % len(texts)
        rows = (texts + texts)[first : first + min(batch_size, len(texts))]
        batch = {k: v.to(device) for k, v in tokenizer.batch(rows).items()}
        loss = student(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    student.eval()
    return {
        "relearn_unseen_before": before,
        "relearn_unseen_after": exact_match(student, tokenizer, unseen_qa),
        "relearn_seen_after": exact_match(student, tokenizer, seen_qa),
    }
