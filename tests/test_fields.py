"""The field table (geomkit.fields) is the one place statistics and metrics are declared.

1. what derives from it: the store's geometry variables and the ``numel`` coordinate, the
   recorder's pair/update split, ``ds.geom``'s labels and pair metrics;
2. the table's own checks (roles, metric inputs);
3. no code matches statistics by column position: with the table's field order reversed (in a
   fresh process), the statistics, metrics, recorded store and ``ds.geom`` of the same gradients
   are bit-identical field by field.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from geomkit import analysis, metrics, store
from geomkit.fields import (
    FIELD_TABLE,
    FIELDS,
    INDEX,
    METRIC_TABLE,
    PAIR_FIELDS,
    ROLES,
    SIZE_FIELDS,
    STEP_FIELDS,
    STORED_FIELDS,
    UPDATE_FIELDS,
    Field,
    Metric,
)

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# 1. Derived from the table
# ----------------------------------------------------------------------------------------------


def test_store_geometry_variables_are_generated_from_the_table() -> None:
    geometry = {n: v for n, v in store.VARIABLES.items() if "record" in v["dims"]}
    assert list(geometry) == list(STORED_FIELDS)
    for name, spec in geometry.items():
        field = FIELD_TABLE[name]
        assert spec == field.spec()
        assert spec["dims"] == ROLES[field.role]
    assert store.COORDINATES["numel"] == FIELD_TABLE["numel"].attrs


def test_every_field_has_one_role_and_index() -> None:
    assert FIELDS == metrics.FIELDS == tuple(FIELD_TABLE)
    assert sorted(PAIR_FIELDS + UPDATE_FIELDS + STEP_FIELDS + SIZE_FIELDS) == sorted(FIELDS)
    assert [FIELDS[INDEX[n]] for n in FIELDS] == list(FIELDS)
    # size fields: the tensor's numel (a coordinate, summed over shards) or a constant
    assert FIELD_TABLE["numel"].dims == ("tensor",) and FIELD_TABLE["numel"].constant is None
    assert FIELD_TABLE["n_tensors"].dims == () and FIELD_TABLE["n_tensors"].constant == 1.0


def test_geom_labels_come_from_the_metric_table() -> None:
    assert analysis.LONG_NAMES == {n: m.long_name for n, m in METRIC_TABLE.items()}
    no_strategy = {n for n, m in METRIC_TABLE.items() if m.role in ("pair", "step")}
    assert set(analysis._PAIR_METRICS) == no_strategy
    assert metrics.METRICS == {n: m.description for n, m in METRIC_TABLE.items()}
    # a pair metric reads no update or step field; an update (step) metric reads at least one
    # update (step) field
    for metric in METRIC_TABLE.values():
        roles = {FIELD_TABLE[n].role for n in metric.inputs}
        assert ("update" in roles) == (metric.role == "update"), metric.name
        assert ("step" in roles) == (metric.role == "step"), metric.name


def test_derive_evaluates_each_formula_on_its_named_fields() -> None:
    rng = np.random.default_rng(0)
    stats = rng.uniform(0.5, 2.0, size=(3, 4, len(FIELDS)))
    stats[..., INDEX["fr"]] *= -1
    got = metrics.derive(stats)
    assert list(got) == list(METRIC_TABLE)
    for name, metric in METRIC_TABLE.items():
        want = metric.formula(*(stats[..., INDEX[n]] for n in metric.inputs))
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    ff, rr, fr = (stats[..., INDEX[n]] for n in ("ff", "rr", "fr"))
    np.testing.assert_array_equal(got["cos_fr"], np.clip(fr / (np.sqrt(ff) * np.sqrt(rr)), -1, 1))


# ----------------------------------------------------------------------------------------------
# 2. The table's own checks
# ----------------------------------------------------------------------------------------------


def test_field_rejects_an_unknown_role_and_a_stored_constant() -> None:
    with pytest.raises(ValueError, match="invalid role='tensor' of field 'x'"):
        Field("x", "tensor", "float64", "x", "1", "x")
    with pytest.raises(ValueError, match="only size fields"):
        Field("x", "pair", "float64", "x", "1", "x", constant=1.0)


def test_metric_rejects_unknown_inputs_and_a_wrong_role() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['gg'\]"):
        Metric("m", "pair", "m", "1", "m", ("gg",), np.sqrt)
    with pytest.raises(ValueError, match="invalid role='pair' of metric 'm': it reads update"):
        Metric("m", "pair", "m", "1", "m", ("dd",), np.sqrt)
    with pytest.raises(ValueError, match="invalid role='update' of metric 'm': no update"):
        Metric("m", "update", "m", "1", "m", ("ff",), np.sqrt)
    with pytest.raises(ValueError, match="invalid role='model'"):
        Metric("m", "model", "m", "1", "m", ("ff",), np.sqrt)
    with pytest.raises(ValueError, match="invalid role='update' of metric 'm': it reads step"):
        Metric("m", "update", "m", "1", "m", ("dd", "uu"), np.add)
    with pytest.raises(ValueError, match="invalid role='step' of metric 'm': no step"):
        Metric("m", "step", "m", "1", "m", ("ff",), np.sqrt)


def test_a_field_of_a_later_schema_version_must_be_optional() -> None:
    with pytest.raises(ValueError, match="invalid since=3 of field 'x'"):
        Field("x", "step", "float64", "x", "1", "x", since=3)
    assert all(FIELD_TABLE[n].optional and FIELD_TABLE[n].since == 3 for n in STEP_FIELDS)


# ----------------------------------------------------------------------------------------------
# 3. Nothing depends on the column order
# ----------------------------------------------------------------------------------------------

_SCRIPT = r"""
import importlib.util, sys
from pathlib import Path

root, out, permute = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
# load the table before anything imports it, and reverse its field order
spec = importlib.util.spec_from_file_location("geomkit.fields", root / "geomkit" / "fields.py")
F = importlib.util.module_from_spec(spec)
sys.modules["geomkit.fields"] = F
spec.loader.exec_module(F)
if permute:
    order = list(reversed(F.FIELDS))
    F.FIELD_TABLE = {n: F.FIELD_TABLE[n] for n in order}
    F.FIELDS = tuple(order)
    F.INDEX = {n: i for i, n in enumerate(order)}

import numpy as np
import torch

import geomkit
from geomkit import metrics, statistics
from geomkit.recorder import Recorder
from geomkit.strategies import build, names

assert geomkit.metrics.FIELDS == F.FIELDS and statistics.FIELDS == F.FIELDS
result = {"layout": np.array(F.FIELDS)}


def named(prefix, array):
    for name in F.FIELDS:
        result[f"{prefix}/{name}"] = np.asarray(array)[..., F.INDEX[name]]


g = torch.Generator().manual_seed(3)
shapes = [(5, 7), (4099,), (0,), (3,)]
fs = [torch.randn(s, generator=g) for s in shapes]
rs = [torch.randn(s, generator=g) for s in shapes]
strategies = [build(n) for n in names()]
twice = lambda t: t + t  # two identical shards
for s in strategies:
    d = s(fs, rs)
    named(f"sufficient-{s.name}", statistics.to_numpy(statistics.sufficient(fs, rs, d, strategy=s)))
    suf = statistics.sufficient(fs, rs, d, strategy=s, shard_sum=twice)
    named(f"sufficient-sharded-{s.name}", statistics.to_numpy(suf))
sh = statistics.to_numpy(statistics.shadow(fs, rs, strategies))
named("shadow", sh)
named("shadow-sharded", statistics.to_numpy(statistics.shadow(fs, rs, strategies, shard_sum=twice)))
for key, value in metrics.derive(sh).items():
    result[f"derive/{key}"] = value
path = Path(out).with_suffix(".zarr")
tensors = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(len(shapes))]
numel = [int(np.prod(s)) for s in shapes]
with Recorder(path, tensors, numel, strategy="pcgrad", shadows=["sago", "blur"]) as rec:
    for step in range(2):
        rec.record(step, [torch.randn(s, generator=g) for s in shapes],
                   [torch.randn(s, generator=g) for s in shapes])
ds = geomkit.open_run(path)
for name in F.STORED_FIELDS:
    result[f"store/{name}"] = ds[name].values
for by in ("tensor", "layer", "model"):
    stats = ds.geom.statistics(by)
    for name in F.FIELDS:
        result[f"geom-{by}/{name}"] = stats.sel(field=name).values
    for key, value in ds.geom.metrics(by).items():
        result[f"geom-metrics-{by}/{key}"] = value.values
np.savez(out, **result)
"""


def test_reversed_field_order_gives_bit_identical_results(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    results = {}
    for permute in ("0", "1"):
        out = tmp_path / f"layout{permute}.npz"
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(ROOT), str(out), permute],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[permute] = dict(np.load(out))
    plain, reversed_ = results["0"], results["1"]
    assert tuple(plain.pop("layout")) == FIELDS
    assert tuple(reversed_.pop("layout")) == tuple(reversed(FIELDS))
    assert set(plain) == set(reversed_)
    for key, want in plain.items():
        got = reversed_[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.tobytes() == want.tobytes(), key  # bit for bit (signed zeros, NaN payloads)
    # the doubled shard sum doubles every sharded field but not the constant per tensor
    name = "sufficient-sharded-sum"
    np.testing.assert_array_equal(plain[f"{name}/numel"], 2 * plain["sufficient-sum/numel"])
    np.testing.assert_array_equal(plain[f"{name}/n_tensors"], plain["sufficient-sum/n_tensors"])
