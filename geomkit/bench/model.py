"""A tiny Llama trained from scratch on the embedded benchmark, and its on-disk cache.

:func:`build_model` makes a ``transformers`` Llama from a :class:`ModelConfig` (nothing is
downloaded), :func:`pretrain` trains it on every training text of a
:class:`~geomkit.bench.data.BenchmarkData` until it knows the forget and retain facts, and
:func:`load_or_pretrain` keeps the result in a cache directory keyed by :func:`cache_key`, so
that later runs start from the same model in seconds (docs/method.md#embedded-benchmark).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from geomkit._validation import check_integer, check_real, invalid
from geomkit.bench.data import BenchmarkData, make_benchmark, qa_text
from geomkit.bench.evaluate import evaluate
from geomkit.bench.tokenizer import WordTokenizer

__all__ = [
    "CACHE_FORMAT_VERSION",
    "PRETRAIN_FILE",
    "ModelConfig",
    "TrainConfig",
    "build_model",
    "cache_key",
    "load_or_pretrain",
    "pretrain",
    "training_texts",
    "unlearning_texts",
]

CACHE_FORMAT_VERSION: int = 2
"""Part of every :func:`cache_key`; bump it when training or saving changes (2: the second,
trained phrasing of every question joined the training texts)."""

PRETRAIN_FILE: str = "geomkit_pretrain.json"
"""File of a cached model directory with the key's inputs, the history and final accuracies."""

Progress = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the tiny Llama.

    Attributes
    ----------
    hidden_size : int
        Width of the residual stream (a multiple of ``heads``).
    layers : int
        Decoder layers.
    heads : int
        Attention heads (as many key-value heads).
    intermediate_size : int or None
        Width of the MLP; None: ``4 * hidden_size`` (the defaults give about 1.1M parameters
        with the 200-entity vocabulary).
    max_length : int
        Position limit of the model and largest training text in tokens.
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int | None = None
    max_length: int = 32

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "max_length"):
            check_integer(name, getattr(self, name), 1, owner="ModelConfig")
        if self.intermediate_size is not None:
            check_integer("intermediate_size", self.intermediate_size, 1, owner="ModelConfig")
        if self.hidden_size % self.heads:
            raise invalid(
                "hidden_size",
                self.hidden_size,
                f"a multiple of heads={self.heads}",
                owner="ModelConfig",
            )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`pretrain`.

    Attributes
    ----------
    lr : float
        Peak AdamW learning rate.
    batch_size : int
        Texts per optimizer step.
    max_epochs : int
        Stop after this many passes over the training texts at the latest.
    min_epochs : int
        Train at least this many epochs, even once the facts are known: the general probe
        and the held-out phrasings keep improving after the trained questions are answered
        (on the default benchmark, 0.375 and 0.29 when the target is reached at epoch 15,
        0.5 and 0.31 at epoch 30).
    target_acc : float
        Stop once forget and retain exact match both reach it, in [0, 1].
    eval_every : int
        Evaluate every this many epochs (and after the last one).
    seed : int
        Seeds the initialisation and the shuffling (the global random state is left alone).
    warmup_steps : int
        Linear warm-up of the learning rate over this many steps, then constant.
    weight_decay : float
        AdamW weight decay.
    max_grad_norm : float
        Gradient-norm clipping (0: none).
    general_repeats : int
        How many times each training example of the general probe appears per epoch. They are
        about a tenth of the texts; seen once per epoch, the probe stays near chance (0.15)
        when the facts are learnt, so an unlearning run could hardly show it falling.
    """

    lr: float = 3e-3
    batch_size: int = 64
    max_epochs: int = 300
    min_epochs: int = 30
    target_acc: float = 0.95
    eval_every: int = 5
    seed: int = 0
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    general_repeats: int = 4

    def __post_init__(self) -> None:
        check_real("lr", self.lr, 0.0, strict=True, owner="TrainConfig")
        check_integer("batch_size", self.batch_size, 1, owner="TrainConfig")
        check_integer("max_epochs", self.max_epochs, 1, owner="TrainConfig")
        check_integer("min_epochs", self.min_epochs, 0, owner="TrainConfig")
        check_real("target_acc", self.target_acc, 0.0, 1.0, owner="TrainConfig")
        check_integer("eval_every", self.eval_every, 1, owner="TrainConfig")
        check_integer("seed", self.seed, 0, owner="TrainConfig")
        check_integer("warmup_steps", self.warmup_steps, 0, owner="TrainConfig")
        check_real("weight_decay", self.weight_decay, 0.0, owner="TrainConfig")
        check_real("max_grad_norm", self.max_grad_norm, 0.0, owner="TrainConfig")
        check_integer("general_repeats", self.general_repeats, 1, owner="TrainConfig")


def build_model(config: ModelConfig, vocab_size: int, seed: int) -> transformers.LlamaForCausalLM:
    """A freshly initialised Llama of ``config`` over ``vocab_size`` tokens.

    The special-token ids follow :class:`~geomkit.bench.tokenizer.WordTokenizer` (pad 0,
    bos 1, eos 2); input and output embeddings are not tied. Initialisation is drawn from
    ``seed`` without touching the global random state.
    """
    check_integer("vocab_size", vocab_size, len(WordTokenizer.SPECIALS), owner="build_model")
    check_integer("seed", seed, 0, owner="build_model")
    llama_config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size or 4 * config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_length,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(llama_config)
    return model


def training_texts(data: BenchmarkData, general_repeats: int = 1) -> tuple[str, ...]:
    """What :func:`pretrain` trains on: the sentences of both splits, their QA texts in the two
    trained phrasings and the general probe's training examples, ``general_repeats`` times
    (never the held-out phrasing, never the held-out probe itself)."""
    return (
        data.forget_text
        + data.retain_text
        + tuple(qa_text(qa) for qa in data.trained_qa("forget") + data.trained_qa("retain"))
        + data.general_train_text * general_repeats
    )


def unlearning_texts(data: BenchmarkData) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What unlearning trains on: the forget and the retain texts, each the sentences of its
    split and its QA texts in the two trained phrasings (never the held-out phrasing)."""
    return tuple(
        getattr(data, f"{split}_text") + tuple(qa_text(qa) for qa in data.trained_qa(split))
        for split in ("forget", "retain")
    )


def pretrain(
    data: BenchmarkData,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    progress: Progress | None = None,
) -> tuple[transformers.LlamaForCausalLM, WordTokenizer, list[dict[str, float]]]:
    """Train a fresh model on :func:`training_texts` until it knows the facts.

    Every token of a text (its ``<eos>`` included, padding excluded) carries loss. After
    every ``eval_every`` epochs (and the last) the model is scored with
    :func:`~geomkit.bench.evaluate.evaluate`; training stops once forget and retain exact
    match both reach ``target_acc`` after at least ``min_epochs``, or after ``max_epochs``.
    Deterministic on CPU for a given
    number of threads (which the caller chooses).

    Parameters
    ----------
    data
        The benchmark.
    model_config, train_config
        Model shape and training settings.
    progress
        Called with each history entry as it is made.

    Returns
    -------
    model
        The trained model, in eval mode.
    tokenizer
        ``WordTokenizer.from_texts(data.texts())``.
    history
        One dict per evaluation: ``epoch``, ``step``, ``loss`` (mean over the epoch),
        ``seconds`` (since the start), ``forget_acc``, ``retain_acc``, ``general_acc``.

    Raises
    ------
    ValueError
        If a training text is longer than ``model_config.max_length`` tokens.
    """
    tokenizer = WordTokenizer.from_texts(data.texts())
    texts = training_texts(data, train_config.general_repeats)
    batch = tokenizer.batch(texts, eos=True)
    width = batch["input_ids"].shape[1]
    if width > model_config.max_length:
        raise ValueError(
            f"pretrain: the longest training text has {width} tokens (with <bos> and <eos>), "
            f"more than ModelConfig.max_length = {model_config.max_length}"
        )
    model = build_model(model_config, len(tokenizer), train_config.seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    warmup = train_config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    )
    generator = torch.Generator().manual_seed(train_config.seed)
    lengths = batch["attention_mask"].sum(dim=1)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(1, train_config.max_epochs + 1):
        order = torch.randperm(len(texts), generator=generator)
        total, count = 0.0, 0
        for first in range(0, len(texts), train_config.batch_size):
            rows = order[first : first + train_config.batch_size]
            cut = int(lengths[rows].max())
            ids = batch["input_ids"][rows, :cut]
            loss = model(
                input_ids=ids,
                attention_mask=batch["attention_mask"][rows, :cut],
                labels=batch["labels"][rows, :cut],
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            total += float(loss.detach()) * len(rows)
            count += len(rows)
        if epoch % train_config.eval_every == 0 or epoch == train_config.max_epochs:
            metrics = evaluate(model, tokenizer, data)
            entry = {
                "epoch": epoch,
                "step": step,
                "loss": total / count,
                "seconds": time.perf_counter() - start,
                **metrics,
            }
            history.append(entry)
            if progress is not None:
                progress(entry)
            target = train_config.target_acc
            known = metrics["forget_acc"] >= target and metrics["retain_acc"] >= target
            if known and epoch >= train_config.min_epochs:
                break
    model.eval()
    return model, tokenizer, history


def _benchmark_params(n_entities: int, forget_fraction: float, seed: int) -> dict[str, Any]:
    return {"n_entities": n_entities, "forget_fraction": forget_fraction, "seed": seed}


def _key_inputs(
    benchmark_params: Mapping[str, Any], model_config: ModelConfig, train_config: TrainConfig
) -> dict[str, Any]:
    return {
        "format": "geomkit-bench-pretrain",
        "version": CACHE_FORMAT_VERSION,
        "benchmark": dict(benchmark_params),
        "model": asdict(model_config),
        "train": asdict(train_config),
    }


def cache_key(
    benchmark_params: Mapping[str, Any], model_config: ModelConfig, train_config: TrainConfig
) -> str:
    """SHA-256 (hex) of a canonical JSON of everything that determines the pretrained model:
    the :func:`~geomkit.bench.data.make_benchmark` arguments, both configs and
    :data:`CACHE_FORMAT_VERSION`. Library versions are not part of it."""
    inputs = _key_inputs(benchmark_params, model_config, train_config)
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_complete(directory: Path) -> bool:
    return (directory / PRETRAIN_FILE).is_file() and (directory / "config.json").is_file()


def load_or_pretrain(
    cache_dir: str | os.PathLike,
    n_entities: int,
    forget_fraction: float,
    seed: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    progress: Progress | None = None,
) -> tuple[transformers.LlamaForCausalLM, WordTokenizer, BenchmarkData, dict[str, Any]]:
    """The pretrained model of these arguments, from ``cache_dir`` or trained and saved there.

    The model lives in ``cache_dir/<cache_key>/`` (``save_pretrained`` files, the tokenizer
    and :data:`PRETRAIN_FILE`). A new one is written into a temporary directory inside
    ``cache_dir`` and renamed into place, so a directory under its final name is always
    complete. Nothing is ever downloaded.

    Parameters
    ----------
    cache_dir
        The cache directory (created if needed).
    n_entities, forget_fraction, seed
        Arguments of :func:`~geomkit.bench.data.make_benchmark` (``seed`` seeds the benchmark
        only; ``train_config.seed`` seeds initialisation and shuffling).
    model_config, train_config
        As for :func:`pretrain`.
    progress
        Passed to :func:`pretrain` when training happens.

    Returns
    -------
    model, tokenizer, data
        The model (float32, CPU, eval mode), its tokenizer and the benchmark.
    info
        ``cached`` (whether it was loaded), ``key``, ``path``, ``history`` and ``final`` (the
        last evaluation's accuracies), as well as what :data:`PRETRAIN_FILE` holds.
    """
    data = make_benchmark(n_entities=n_entities, forget_fraction=forget_fraction, seed=seed)
    params = _benchmark_params(n_entities, forget_fraction, seed)
    key = cache_key(params, model_config, train_config)
    root = Path(cache_dir)
    final = root / key
    if not _is_complete(final):
        if final.exists():
            raise FileExistsError(
                f"load_or_pretrain: {str(final)!r} exists but holds no complete model "
                f"(no {PRETRAIN_FILE} or config.json); remove it to retrain"
            )
        model, tokenizer, history = pretrain(data, model_config, train_config, progress=progress)
        last = history[-1]
        record = {
            **_key_inputs(params, model_config, train_config),
            "key": key,
            "history": history,
            "final": {k: last[k] for k in ("forget_acc", "retain_acc", "general_acc")},
            "epochs": last["epoch"],
            "seconds": last["seconds"],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        root.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        try:
            model.save_pretrained(temporary)
            tokenizer.save(temporary)
            (temporary / PRETRAIN_FILE).write_text(
                json.dumps(record, indent=1) + "\n", encoding="utf-8"
            )
            try:
                os.rename(temporary, final)
            except OSError:
                if not _is_complete(final):  # not a concurrent writer of the same model
                    raise
        finally:
            if temporary.exists():
                shutil.rmtree(temporary)
        return model, tokenizer, data, {"cached": False, "path": str(final), **record}

    record = json.loads((final / PRETRAIN_FILE).read_text(encoding="utf-8"))
    if record.get("key") != key:
        raise ValueError(
            f"load_or_pretrain: {str(final / PRETRAIN_FILE)!r} records key "
            f"{record.get('key')!r}, expected {key!r}"
        )
    model = transformers.LlamaForCausalLM.from_pretrained(
        final, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    tokenizer = WordTokenizer.load(final)
    return model, tokenizer, data, {"cached": True, "path": str(final), **record}
