"""Deprecated spellings (geomkit._deprecation): each old name warns and still does the same."""

from __future__ import annotations

import inspect
import json
import warnings

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import geomkit
from geomkit import theory
from geomkit._deprecation import GeomkitDeprecationWarning, renamed
from geomkit.cli import _parser, main
from geomkit.config import ConfigError, RunConfig, load_config
from geomkit.objectives import build_objective
from geomkit.recorder import Recorder

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def _deprecated(old: str):
    """Expect one GeomkitDeprecationWarning (a FutureWarning) naming ``old``."""
    return pytest.warns(GeomkitDeprecationWarning, match=f"'{old}' is deprecated")


# -- the helper ---------------------------------------------------------------------------------


def test_renamed_maps_warns_and_refuses_both_spellings() -> None:
    @renamed(old="new")
    def f(*, new: int = 0) -> int:
        return new

    assert issubclass(GeomkitDeprecationWarning, FutureWarning)
    with _deprecated("old="):
        assert f(old=3) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=4) == 4
    with pytest.raises(TypeError, match="both 'new' and its deprecated spelling 'old'"):
        f(old=1, new=2)
    assert list(inspect.signature(f).parameters) == ["new"]


def test_the_warning_points_at_the_caller() -> None:
    with pytest.warns(GeomkitDeprecationWarning) as record:
        build_objective("graddiff", retain="kl")
    assert record[0].filename == __file__


# -- configuration and command line -------------------------------------------------------------


def test_build_objective_retain_is_retain_loss() -> None:
    with _deprecated("retain="):
        old = build_objective("npo", retain="kl")
    assert repr(old) == repr(build_objective("npo", retain_loss="kl"))


def test_old_config_keys_warn_and_map(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"retain": "kl", "steps": 3}))
    with _deprecated("retain"):
        config = load_config(path)
    assert config.retain_loss == "kl" and config.steps == 3
    with _deprecated("retain"):
        assert load_config(overrides={"retain": "none", "objective": "npo"}).retain_loss == "none"
    with (
        _deprecated("forget"),
        pytest.raises(ConfigError, match=r"invalid model=None.*given: forget_data"),
    ):
        load_config(overrides={"forget": str(path)})  # forget is forget_data now
    with pytest.raises(ConfigError, match="both 'retain_loss' and its deprecated spelling"):
        load_config(overrides={"retain": "kl", "retain_loss": "nll"})


def test_saved_config_of_an_old_run_still_loads(tmp_path) -> None:
    old = RunConfig().to_dict()
    old["retain"] = old.pop("retain_loss")
    old["forget"] = old.pop("forget_data")
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.warns(GeomkitDeprecationWarning):
        assert load_config(tmp_path / "config.json") == RunConfig()


def test_run_config_takes_old_keywords() -> None:
    with _deprecated("retain="):
        assert RunConfig(retain="kl") == RunConfig(retain_loss="kl")
    with _deprecated("forget="):
        assert RunConfig(forget="f").forget_data == "f"


def test_old_cli_flags_warn_and_set_the_new_fields(capsys) -> None:
    with _deprecated("--retain"):
        args = _parser().parse_args(["run", "--retain", "r.jsonl"])
    assert args.retain_data == "r.jsonl"
    with _deprecated("--forget"):
        args = _parser().parse_args(["run", "--forget", "f.jsonl"])
    assert args.forget_data == "f.jsonl"
    args = _parser().parse_args(["run", "--retain-data", "r", "--forget-data", "f"])
    assert (args.retain_data, args.forget_data) == ("r", "f")
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    shown = capsys.readouterr().out
    assert "--retain-data FILE" in shown and "--retain FILE" not in shown  # old flags hidden


def test_old_cli_flag_reaches_the_configuration(tmp_path, capsys) -> None:
    corpus = tmp_path / "f.txt"
    corpus.write_text("a b c")
    with _deprecated("--forget"):
        status = main(["run", "--out", str(tmp_path / "o"), "--forget", str(corpus)])
    assert status == 2  # forget_data given, model and retain_data missing
    assert "invalid model=None" in capsys.readouterr().err


def test_engine_config_comes_from_the_run_config() -> None:
    config = RunConfig(alpha=0.5, gamma=2.0, lr=1e-4, steps=7, accumulation=2, record_every=3)
    config.shadows = ["sum"]
    engine = config.engine_config("pcgrad", 4)
    assert (engine.strategy, engine.seed) == ("pcgrad", 4)
    for name in ("shadows", "alpha", "gamma", "lr", "steps", "accumulation", "record_every"):
        assert getattr(engine, name) == getattr(config, name), name
    small = RunConfig(hidden_size=32, layers=2, heads=2, pretrain_lr=1e-2, pretrain_epochs=9)
    model = small.model_config()
    assert (model.hidden_size, model.layers, model.heads) == (32, 2, 2)
    train = small.train_config()
    assert (train.lr, train.max_epochs, train.seed) == (1e-2, 9, small.data_seed)


# -- output location ----------------------------------------------------------------------------


def _record(recorder: Recorder, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        f = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
        r = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
        recorder.record(step, f, r)
    recorder.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("rec") / "geometry.zarr"
    with _deprecated("path="):
        recorder = Recorder(path=path, tensors=NAMES, numel=[12, 5], strategy="sago")
    _record(recorder)
    return path


def test_recorder_path_is_out(recorded, tmp_path) -> None:
    ds = geomkit.open_run(recorded)
    assert ds.sizes["step"] == 3
    model = torch.nn.Linear(3, 2)
    with _deprecated("path="):
        recorder = Recorder.for_model(path=tmp_path / "m.zarr", model=model, strategy="sum")
    assert recorder.writer.path == tmp_path / "m.zarr"
    recorder.close()


def test_run_writer_path_is_out(tmp_path) -> None:
    from geomkit.layers import locate_all
    from geomkit.store import RunWriter

    with _deprecated("path="):
        writer = RunWriter(
            path=tmp_path / "w.zarr", tensors=locate_all(NAMES), numel=[12, 5], strategies=["sum"]
        )
    assert writer.path == tmp_path / "w.zarr"


def test_trainer_record_to_is_out(tmp_path) -> None:
    import transformers
    from tiny import tiny_llama

    from geomkit.hf import TwoTaskTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[])
    with _deprecated("record_to="):
        trainer = TwoTaskTrainer(
            model=tiny_llama(0),
            args=args,
            objective=build_objective("graddiff"),
            record_to=tmp_path / "g.zarr",
        )
    assert trainer.recorder is not None and trainer.recorder.writer.path == tmp_path / "g.zarr"
    trainer.recorder.close()


def test_write_figures_out_dir_is_out(recorded, tmp_path) -> None:
    from geomkit.plot import write_figures

    with _deprecated("out_dir="):
        written = write_figures(
            geomkit.open_run(recorded), out_dir=tmp_path / "f", formats=["png"], dpi=20
        )
    assert any(isinstance(v, list) for v in written.values())
    assert (tmp_path / "f").is_dir() and any((tmp_path / "f").iterdir())


# -- grouping -----------------------------------------------------------------------------------


def test_theory_granularity_is_by() -> None:
    from geomkit.theory import Counterexamples

    with _deprecated("granularity="):
        old = theory.r4_breakdown(Counterexamples(), granularity="model")
    new = theory.r4_breakdown(Counterexamples(), by="model")
    np.testing.assert_array_equal(old["violations"].values, new["violations"].values)
    audit = theory.audit_synthetic(Counterexamples(), claims=["R4"])
    with _deprecated("granularity="):
        old = audit.select(claim="R4", granularity="tensor")
    assert old.results and old.results == audit.select(claim="R4", by="tensor").results
    result = old.results[0]
    with _deprecated("granularity="):
        assert audit.get("R4", granularity="tensor", strategy=result.strategy) == result


def test_plot_granularity_is_by(recorded) -> None:
    import matplotlib.pyplot as plt

    from geomkit import plot as gp

    ds = geomkit.open_run(recorded)
    with _deprecated("granularity="):
        old = gp.sago_vs_pcgrad(ds, granularity="layer")
    assert old.extras["n_points"] == gp.sago_vs_pcgrad(ds, by="layer").extras["n_points"]
    with _deprecated("granularity="):
        old = gp.alignment_distributions(ds, "cos_dr", by="layer", granularity="tensor")
    new = gp.alignment_distributions(ds, "cos_dr", by="tensor", x="layer")
    assert old.extras["data"].equals(new.extras["data"])
    assert len(new.extras["data"]) == 3 * len(NAMES) * ds.sizes["strategy"]
    grouped = gp.alignment_distributions(ds, "cos_dr", by="layer")
    assert len(grouped.extras["data"]) == 3 * 2 * ds.sizes["strategy"]  # two layers
    with pytest.raises(ValueError, match="invalid by='model'"):
        gp.alignment_distributions(ds, "cos_dr", by="model", x="layer")
    plt.close("all")
