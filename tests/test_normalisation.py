"""The same gradient however the batch is split (docs/method.md#normalisation).

Each task's gradient is that of its global loss over the optimizer step: the totals of every
micro-batch of the accumulation window on every process divided by their summed count. Checked

1. per objective, at the loss level: ``total / count`` is the loss, and the engine's gradient over
   two micro-batches of 8 (different token counts, sequence counts and padding) equals the
   gradient over the one batch of 16, while the old mean of per-micro-batch means is measurably
   different on the same data;
2. through the command line: 2 gloo processes x batch 8, 1 process x batch 16 and 1 process x
   batch 8 with ``--accumulation 2`` record the same losses (1e-6 relative) and the same
   model-level cosines (1e-5) for GradDiff and SimNPO;
3. ``TwoTaskTrainer``: the same over its accumulation window and its processes.

The two-process runs of 2 and 3 share one pair of gloo processes (one start-up for both). The
engine's FSDP2 path is checked on padded data of unequal token counts in tests/test_distributed.py.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import VOCAB, tiny_llama

import geomkit
from geomkit.engine import EngineConfig, Unlearner
from geomkit.objectives import (
    GA,
    KL,
    NLL,
    NPO,
    RMU,
    ForgetLoss,
    Objective,
    RMURetain,
    SimNPO,
)

SEQ = 12

# ----------------------------------------------------------------------------------------------
# Data: rows of different lengths, prompts without loss, one row without any loss token
# ----------------------------------------------------------------------------------------------


def _rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of 2 to 12 tokens sorted by length, each with a prompt of 0 to 2 tokens
    that carries no loss; row 1 has no loss-carrying token at all."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(2, SEQ + 1, (), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(0, 3, (), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    rows = sorted(rows, key=lambda row: len(row["input_ids"]))
    rows[1]["labels"][:] = -100
    return rows


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad ``rows`` to their own longest row."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        k = len(row["input_ids"])
        ids[i, :k], mask[i, :k], labels[i, :k] = row["input_ids"], 1, row["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LOSSES = {
    "ga": GA(),
    "npo": NPO(beta=0.5),
    "simnpo": SimNPO(beta=2.5, delta=0.1),
    "rmu": RMU(layer=1),
    "nll": NLL(),
    "kl": KL(),
    "rmu_retain": RMURetain(layer=1),
}


def _grad(model, loss, batches, reference, weights) -> list[torch.Tensor]:
    params = list(model.parameters())
    value = sum(w * loss(model, b, reference) for w, b in zip(weights, batches, strict=True))
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_total_over_count(name: str) -> None:
    loss = LOSSES[name]
    model, reference = tiny_llama(0), tiny_llama(1)
    batch = _collate(_rows(16, 0))
    count = loss.count(batch)
    assert count.dtype == torch.int64 and count.dim() == 0
    keep = batch["labels"][:, 1:] != -100
    want = {
        "token": keep.sum(),
        "sequence": keep.any(-1).sum(),
        "activation": batch["attention_mask"].sum(),
    }[loss.normalisation]
    assert int(count) == int(want)
    assert int(loss.count(_collate(_rows(16, 0)[:2]))) < int(count)
    total = loss.total(model, batch, reference)
    torch.testing.assert_close(total / count, loss(model, batch, reference), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_engine_gradient_is_the_same_however_the_batch_is_split(name: str) -> None:
    """One batch of 16 = two micro-batches of 8 in the engine; the mean of means differs."""
    loss = LOSSES[name]
    rows = _rows(16, 0)
    whole, halves = _collate(rows), [_collate(rows[:8]), _collate(rows[8:])]
    assert halves[0]["input_ids"].shape[1] < whole["input_ids"].shape[1]  # its own padding
    model, reference = tiny_llama(0), tiny_llama(1)
    exact = _grad(model, loss, [whole], reference, [1.0])
    old = _grad(model, loss, halves, reference, [0.5, 0.5])
    gap = float((_flat(exact) - _flat(old)).norm() / _flat(exact).norm())
    assert gap > 1e-2, f"the split must matter on these data (relative gap {gap:.2g})"

    forget = isinstance(loss, ForgetLoss)
    objective = Objective(name, loss, None) if forget else Objective(name, GA(), loss)
    other = _rows(16, 1)  # GA's data where the loss under test is the retain loss
    splits = {
        2: (halves, [_collate(other[:8]), _collate(other[8:])]),
        1: ([whole], [_collate(other)]),
    }
    if not forget:  # d = f + r
        ga = _grad(model, GA(), [_collate(other)], None, [1.0])
        exact = [f + r for f, r in zip(ga, exact, strict=True)]
    updates = []
    for accumulation, (data, ga_data) in splits.items():
        engine = Unlearner(
            copy.deepcopy(model),
            objective,
            data if forget else ga_data,
            None if forget else data,
            EngineConfig(strategy="sum", steps=1, accumulation=accumulation, max_grad_norm=None),
            reference=reference,
        )
        captured: list[torch.Tensor] = []
        names: list[str] = []

        def capture(*_, engine=engine, captured=captured, names=names) -> None:
            captured.extend(p.grad.detach().clone() for p in engine.params)
            names.extend(engine.names)

        engine.optimizer.register_step_pre_hook(capture)
        engine.run()
        updates.append((names, captured))
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    for names, got in updates:  # the update the optimizer receives: d = f (+ r), global loss
        want = _flat([exact[index[n]] for n in names])  # RMU trains a few tensors only
        error = float((_flat(got) - want).norm() / want.norm())
        assert error < 1e-5, f"relative error {error:.2g} (the old mean of means: {gap:.2g})"


# ----------------------------------------------------------------------------------------------
# Two gloo processes: the command line and TwoTaskTrainer
# ----------------------------------------------------------------------------------------------

OBJECTIVES = ("graddiff", "simnpo")
# the smoke preset, with a target model pretrained for 2 epochs only (1 s) and 3 steps
SETTINGS = {"pretrain_epochs": 2, "steps": 3, "eval_every": 3, "verify_every": 0}
SPLITS = {  # name: (processes, batch size, accumulation)
    "one_x16": (1, 16, 1),
    "one_x8_acc2": (1, 8, 2),
    "two_x8": (2, 8, 1),
}


def _cli(root: Path, split: str, objective: str) -> None:
    from geomkit.cli import main

    _, batch, accumulation = SPLITS[split]
    status = main(
        [
            *("run", "--preset", "smoke", "--config", str(root / "settings.json")),
            *("--objective", objective, "--strategy", "sago", "--no-report"),
            *(("--beta", "0.5") if objective == "simnpo" else ()),  # an untrained target
            *("--batch-size", str(batch), "--accumulation", str(accumulation)),
            *("--out", str(root / split), "--cache-dir", str(root / "cache")),
        ]
    )
    assert status == 0


def _pad_pairs(items: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    return {task: _collate([item[task] for item in items]) for task in ("forget", "retain")}


def _trainer(root: Path, split: str) -> None:
    """TwoTaskTrainer, GradDiff + SAGO, 2 steps over 16 (forget, retain) pairs in order."""
    import transformers

    from geomkit.hf import TwoTaskTrainer
    from geomkit.objectives import build_objective

    class InOrder(TwoTaskTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    processes, batch, accumulation = SPLITS[split]
    forget, retain = _rows(16, 2), _rows(16, 3)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [{"forget": forget[i], "retain": retain[j]} for i, j in enumerate(order)]
    args = transformers.TrainingArguments(
        output_dir=str(root / "hf" / split),
        max_steps=2,
        per_device_train_batch_size=batch // 4,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo" if processes > 1 else None,
        seed=0,
    )
    trainer = InOrder(
        model=tiny_llama(0),
        args=args,
        train_dataset=pairs,
        data_collator=_pad_pairs,
        objective=build_objective("graddiff"),
        strategy="sago",
        out=root / "hf" / split / "geometry.zarr",
    )
    trainer.train()


def _two_process_worker(rank: int, root: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for objective in OBJECTIVES:
        _cli(Path(root), "two_x8", objective)
    _trainer(Path(root), "two_x8")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every split of :data:`SPLITS`, through the CLI (both objectives) and TwoTaskTrainer."""
    root = tmp_path_factory.mktemp("splits")
    (root / "settings.json").write_text(json.dumps(SETTINGS))
    for split, (processes, _, _) in SPLITS.items():
        if processes == 1:  # the first one pretrains the target into root/cache
            for objective in OBJECTIVES:
                _cli(root, split, objective)
            _trainer(root, split)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(str(root), port), nprocs=2)
    return root


def _compare(runs: dict) -> None:
    """The same losses (1e-6 relative) and model-level cosines (1e-5) in every run."""
    (first, want), *others = runs.items()
    cosines = want.geom.metrics(by="model")
    for name, ds in others:
        for var in ("forget_loss", "retain_loss"):
            np.testing.assert_allclose(
                ds[var].values, want[var].values, rtol=1e-6, err_msg=f"{var}: {name} vs {first}"
            )
        metrics = ds.geom.metrics(by="model")
        for var in ("cos_fr", "cos_df", "cos_dr"):
            np.testing.assert_allclose(
                metrics[var].values, cosines[var].values, rtol=0, atol=1e-5, err_msg=var
            )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cli_records_the_same_run_however_the_batch_is_split(splits: Path, objective) -> None:
    runs = {
        split: geomkit.open_run(splits / split / f"{objective}-sago-seed0" / "geometry.zarr")
        for split in SPLITS
    }
    assert [int(ds.attrs["world_size"]) for ds in runs.values()] == [1, 1, 2]
    assert len(runs["two_x8"].step) == SETTINGS["steps"]
    _compare(runs)


def test_two_task_trainer_records_the_same_run_however_the_batch_is_split(splits: Path) -> None:
    runs = {split: geomkit.open_run(splits / "hf" / split / "geometry.zarr") for split in SPLITS}
    assert [int(ds.attrs["world_size"]) for ds in runs.values()] == [1, 1, 2]
    assert list(runs["two_x8"].record.values) == [0, 1]
    _compare(runs)


@pytest.mark.parametrize("n", [32, 20, 37, 33])
def test_geomkit_run_gives_every_split_the_same_examples_per_step(n: int) -> None:
    """2 processes x batch 8, 1 x 16 and 1 x 8 with accumulation 2: the same examples in every
    optimizer step, also in a last, shorter step (split evenly; dropped when it holds fewer
    examples than micro-batches), and as many steps on every process."""
    from geomkit.corpora import step_batches

    def steps(processes: int, batch: int, accumulation: int) -> list[list[int]]:
        shares = [
            step_batches(list(range(n)), batch, accumulation, 0, list, rank, processes)
            for rank in range(processes)
        ]
        assert len({len(share) for share in shares}) == 1  # every process cycles together
        count = len(shares[0]) // accumulation
        return [
            sorted(
                item
                for share in shares
                for micro in share[k * accumulation : (k + 1) * accumulation]
                for item in micro
            )
            for k in range(count)
        ]

    one = steps(1, 16, 1)
    assert sorted(x for step in one for x in step) == list(range(n))  # nothing dropped
    for split in ((1, 8, 2), (2, 8, 1)):
        got = steps(*split)
        assert got == (one[:-1] if n % 16 == 1 else one), split


def test_a_loss_with_compute_only_counts_one_per_batch() -> None:
    class Mean(ForgetLoss):
        def compute(self, model, batch, reference):
            return GA()(model, batch)

    class Nothing(ForgetLoss):
        pass

    model, batch = tiny_llama(0), _collate(_rows(4, 0))
    assert Mean().normalisation is None and int(Mean().count(batch)) == 1
    torch.testing.assert_close(Mean().total(model, batch), GA()(model, batch))
    with pytest.raises(NotImplementedError, match="Nothing implements neither total"):
        Nothing()(model, batch)


def test_a_step_without_any_loss_token_raises() -> None:
    rows = _rows(4, 0)
    for row in rows:
        row["labels"][:] = -100
    empty = [_collate(rows[:2]), _collate(rows[2:])]
    engine = Unlearner(
        tiny_llama(0), Objective("ga", GA(), None), empty, None, EngineConfig(accumulation=2)
    )
    with pytest.raises(ValueError, match=r"GA: the forget data of step 0 \(2 micro-batch"):
        engine.step()
