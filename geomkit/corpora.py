"""Training data of a run: corpora read from local files, and the micro-batches of each step.

See docs/method.md#normalisation (the same examples per optimizer step however the batch is
split over processes and micro-batches).

:func:`documents` reads a JSONL (``text`` field) or plain text file, :func:`chunks` tokenizes
and cuts it into equal-length chunks, :func:`lm_batch` pads chunks into a language-modelling
batch, and :func:`step_batches` deals a seed's shuffled examples into each process's
micro-batches.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from geomkit.config import ConfigError

__all__ = ["chunks", "documents", "jsonl_records", "lm_batch", "step_batches"]


def jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``("path:line", object)`` for every non-blank line of a JSONL file; ConfigError naming
    the line of one that is not a JSON object."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"{where}: not JSON ({error})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def documents(path: Path) -> list[str]:
    """The texts of a JSONL file (``text`` field of each line) or a plain text file."""
    if path.suffix not in (".jsonl", ".json"):
        return [path.read_text(encoding="utf-8")]
    texts = []
    for where, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise ConfigError(f"{where}: expected a JSON object with a 'text' string")
        texts.append(record["text"])
    return texts


def chunks(tokenizer: Any, path: Path, length: int) -> list[list[int]]:
    """The documents tokenized, joined with "\\n\\n" and cut into ``length``-token chunks."""
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, document in enumerate(documents(path)):
        if i:
            ids.extend(separator)
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise ConfigError(f"{path} holds fewer than 2 tokens")
    pieces = [ids[i : i + length] for i in range(0, len(ids), length)]
    if len(pieces) > 1 and len(pieces[-1]) < length:
        pieces.pop()  # equal lengths: no padding needed
    return pieces


def lm_batch(pieces: list[list[int]]) -> dict:
    """Token chunks as a padded causal-LM batch (``input_ids``, ``attention_mask``, ``labels``
    with -100 on padding)."""
    import torch

    width = max(len(c) for c in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.long)
    for row, chunk in enumerate(pieces):
        ids[row, : len(chunk)] = torch.tensor(chunk)
        mask[row, : len(chunk)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step_batches(
    items: list,
    batch_size: int,
    accumulation: int,
    seed: int,
    make: Callable,
    rank: int = 0,
    world: int = 1,
) -> list[dict]:
    """This process's micro-batches, such that every optimizer step sees the same examples
    however its batch is split over processes and micro-batches.

    The items, shuffled with ``seed``, are cut into steps of ``batch_size x accumulation x
    world`` examples; each step into ``accumulation x world`` consecutive micro-batches (of
    ``batch_size`` examples; the last, shorter step's as equal as possible), of which process
    ``rank`` takes numbers ``rank, rank + world, ...``. So 2 processes x batch 8, 1 x batch 16
    and 1 x batch 8 with accumulation 2 see the very same 16 examples per step. A last step with
    fewer examples than micro-batches is dropped.
    """
    order = list(items)
    random.Random(seed).shuffle(order)
    parts = accumulation * world
    size = batch_size * parts
    steps = [order[i : i + size] for i in range(0, len(order), size)]
    if steps and len(steps[-1]) < parts:
        steps.pop()
    if not steps:
        raise ConfigError(
            f"{world} process(es) x accumulation={accumulation} need at least {parts} examples "
            f"per step; the data hold {len(order)}"
        )
    mine = []
    for step in steps:
        cut, extra = divmod(len(step), parts)
        bounds = [j * cut + min(j, extra) for j in range(parts + 1)]
        mine += [make(step[bounds[j] : bounds[j + 1]]) for j in range(rank, parts, world)]
    return mine
