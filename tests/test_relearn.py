"""Relearning after unlearning (geomkit.bench.relearn, ``--relearn``)."""

from __future__ import annotations

import json

import pytest
import torch

from geomkit.bench.data import make_benchmark
from geomkit.bench.model import ModelConfig, build_model
from geomkit.bench.relearn import RELEARN_METRICS, relearn
from geomkit.bench.tokenizer import WordTokenizer
from geomkit.cli import main


@pytest.fixture(scope="module")
def setup():
    data = make_benchmark(n_entities=20, forget_fraction=0.4, seed=1)
    tokenizer = WordTokenizer.from_texts(data.texts())
    model = build_model(ModelConfig(hidden_size=32, layers=1, heads=2), len(tokenizer), 0)
    return model, tokenizer, data


def test_relearning_fine_tunes_a_copy_on_half_the_forget_entities(setup):
    model, tokenizer, data = setup
    weights = [p.detach().clone() for p in model.parameters()]
    result = relearn(model, tokenizer, data, 30, lr=1e-2, batch_size=8, seed=0)
    assert set(result) == set(RELEARN_METRICS)
    assert all(0.0 <= v <= 1.0 for v in result.values())
    # the model itself is untouched
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    # 30 steps at 1e-2 on 4 entities' texts: the relearned half is learnt, at least partly
    assert result["relearn_seen_after"] > result["relearn_unseen_before"]
    assert relearn(model, tokenizer, data, 30, lr=1e-2, batch_size=8, seed=0) == result


def test_relearn_rejects_bad_settings(setup):
    model, tokenizer, data = setup
    with pytest.raises(ValueError, match="steps"):
        relearn(model, tokenizer, data, 0)
    with pytest.raises(ValueError, match="lr"):
        relearn(model, tokenizer, data, 1, lr=0.0)


def test_geomkit_run_relearn_reports_it(smoke_runs, tmp_path):
    cache = str(smoke_runs[1].parent / "cache")
    out = tmp_path / "runs"
    argv = ["run", "--preset", "smoke", "--strategy", "sago", "--out", str(out)]
    assert main([*argv, "--cache-dir", cache, "--relearn", "3", "--no-report"]) == 0
    metrics = json.loads((out / "graddiff-sago-seed0" / "metrics.json").read_text())
    assert set(metrics["relearn"]) == set(RELEARN_METRICS)
    assert all(metrics["summary"][k] == metrics["relearn"][k] for k in RELEARN_METRICS)
