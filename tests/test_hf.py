"""TwoTaskTrainer: the two-task step inside transformers.Trainer."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tiny import tiny_llama

import geomkit
from geomkit.hf import TwoTaskTrainer, pair_collator
from geomkit.objectives import build_objective
from geomkit.strategies import BLUR, PerTensor, Strategy, as_strategy


def _model() -> transformers.LlamaForCausalLM:
    return tiny_llama(0)


def _pairs(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        x = torch.randint(0, 64, (12,), generator=g)
        y = torch.randint(0, 64, (12,), generator=g)
        items.append(
            {
                "forget": {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x},
                "retain": {"input_ids": y, "attention_mask": torch.ones_like(y), "labels": y},
            }
        )
    return items


def _args(tmp_path: Path, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class _Capturing(TwoTaskTrainer):
    """Keeps each window's micro-batches and the gradients at the combination."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.windows: list[dict] = []
        self._batches: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._batches.append(copy.deepcopy(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def _combine(self) -> None:
        super()._combine()
        self.windows.append(
            {
                "batches": self._batches,
                "f": [t.clone() for t in self._f],
                "r": [t.clone() for t in self._r],
                "grad": [p.grad.clone() for p in self._params],
            }
        )
        self._batches = []


@pytest.mark.parametrize(
    "strategy",
    ["sago", "pcgrad", Strategy(BLUR(), PerTensor(), alpha=0.5)],
    ids=["sago", "pcgrad", "blur-per-tensor-object"],
)
def test_trainer_writes_strategy_of_separately_accumulated_gradients(tmp_path, strategy):
    model = _model()
    initial = copy.deepcopy(model)
    objective = build_objective("graddiff")
    trainer = _Capturing(
        model=model,
        args=_args(tmp_path),
        train_dataset=_pairs(8),
        data_collator=pair_collator,
        objective=objective,
        strategy=strategy,
        out=tmp_path / "geometry.zarr",
    )
    trainer.train()
    first = trainer.windows[0]
    # .grad at the window's end is exactly strategy(f, r)
    expected = as_strategy(strategy)(first["f"], first["r"])
    for got, want in zip(first["grad"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # f and r are the window's gradients of each loss, each accumulated separately
    params = [p for p in initial.parameters() if p.requires_grad]
    for task, loss_fn in (("f", objective.forget), ("r", objective.retain)):
        reference = [torch.zeros_like(p) for p in params]
        for batch in first["batches"]:
            sub = batch["forget" if task == "f" else "retain"]
            loss = loss_fn(initial, sub) / len(first["batches"])
            for acc, g in zip(reference, torch.autograd.grad(loss, params), strict=True):
                acc += g
        for got, want in zip(first[task], reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    ds = geomkit.open_run(tmp_path / "geometry.zarr")
    assert list(ds.record.values) == [0, 1]
    label = str(as_strategy(strategy))  # "blur/per_tensor" for the composed object
    assert ds.attrs["applied_strategy"] == label
    assert str(ds.strategy.values[0]) == label
    assert ds.attrs["alpha"] == as_strategy(strategy).alpha
    # the step of the Trainer's AdamW is recorded too (the inner optimizer of accelerate's wrapper)
    m = ds.geom.metrics(by="model")
    assert (m["norm_u"] > 0).all() and np.isfinite(m["cos_ur"]).all()
    assert ((m["cos_ud"] > 0) & (m["cos_ud"] <= 1)).all()


def test_trainer_rejects_batches_without_forget_part(tmp_path):
    trainer = TwoTaskTrainer(
        model=_model(),
        args=_args(tmp_path),
        train_dataset=[{"input_ids": torch.zeros(4, dtype=torch.long)}] * 4,
        objective=build_objective("graddiff"),
    )
    with pytest.raises(ValueError, match="'forget'"):
        trainer.train()
