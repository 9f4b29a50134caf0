"""Models from a local directory, and the engine in bfloat16."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from tiny import tiny_llama

import geomkit
from geomkit.engine import EngineConfig, Unlearner, load_model
from geomkit.objectives import build_objective


def _model() -> transformers.LlamaForCausalLM:
    return tiny_llama(0)


def _batches(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (4, 12), generator=g)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}]


def test_load_model_from_local_directory_round_trips(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_model(tmp_path / "tiny", dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name, value in want.items():
        torch.testing.assert_close(value.to(torch.bfloat16), got[name], msg=name)


def test_unlearner_accepts_a_local_model_directory(tmp_path) -> None:
    _model().save_pretrained(tmp_path / "tiny")
    unlearner = Unlearner(
        str(tmp_path / "tiny"),
        build_objective("graddiff"),
        _batches(1),
        _batches(2),
        EngineConfig(steps=1),
    )
    assert isinstance(unlearner.model, transformers.LlamaForCausalLM)
    assert math.isfinite(unlearner.step().forget_loss)


def test_load_model_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)
    _model().save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="invalid dtype='float8': expected one of float32"):
        load_model(tmp_path / "tiny", dtype="float8")


def test_engine_runs_in_bfloat16_and_records_float64_statistics(tmp_path) -> None:
    model = _model().to(torch.bfloat16)
    unlearner = Unlearner(
        model,
        build_objective("graddiff"),
        _batches(1),
        _batches(2),
        EngineConfig(strategy="sago", lr=1e-3, steps=2),
        out=tmp_path / "run",
    )
    results = unlearner.run()
    assert all(math.isfinite(r.forget_loss) and math.isfinite(r.grad_norm) for r in results)
    assert next(model.parameters()).dtype == torch.bfloat16
    ds = geomkit.open_run(tmp_path / "run")
    assert ds.attrs["dtype"] == "bfloat16"
    assert ds.ff.dtype == "float64" and ds.sizes["record"] == 2
    metrics = ds.geom.metrics()
    assert (metrics.opposed_rate.sel(strategy="sago") == 0).all()  # R6 on bfloat16 updates
    assert ((metrics.cos_dr >= -1) & (metrics.cos_dr <= 1)).all()
