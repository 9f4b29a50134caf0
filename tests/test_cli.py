"""``geomkit run`` and its configuration (geomkit.cli, geomkit.config)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny import tiny_llama

import geomkit
from geomkit.cli import main
from geomkit.config import PRESETS, ConfigError, RunConfig, load_config


def test_smoke_run_writes_every_run(smoke_runs):
    status, out = smoke_runs
    assert status == 0
    names = ["graddiff-pcgrad-seed0", "graddiff-sago-seed0", "graddiff-sum-seed0"]
    assert sorted(p.name for p in out.iterdir() if (p / "geometry.zarr").exists()) == names
    for name in names:
        for item in ("geometry.zarr", "config.json", "metrics.json"):
            assert (out / name / item).exists()
        config = json.loads((out / name / "config.json").read_text())
        assert config["steps"] == PRESETS["smoke"]["steps"]
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert [h["step"] for h in metrics["history"]] == [2, 4]
        assert set(metrics["final"]) == {
            "forget_acc",
            "forget_heldout_acc",
            "retain_acc",
            "retain_heldout_acc",
            "general_acc",
        }
        assert len(metrics["losses"]) == 4
        ds = geomkit.open_run(out / name)  # the evaluations are in the store too
        assert ds["evaluation"].values.tolist() == [0, 2, 4]
        assert ds["forget_acc"].values[0] == metrics["before"]["forget_acc"]
        assert ds["retain_acc"].values[-1] == metrics["final"]["retain_acc"]
    runs = geomkit.open_runs(out)
    assert runs.sizes["run"] == 3
    assert (out / "summary.csv").read_text().startswith("objective,strategy,seeds,")
    assert "| graddiff | sago | 1 |" in (out / "summary.md").read_text()


def test_flags_override_preset_and_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 7, "lr": 1, "seeds": 3}))
    config = load_config(path, "smoke", {"steps": 9})
    assert config.steps == 9  # override > file
    assert config.lr == 1.0 and isinstance(config.lr, float)  # file > preset
    assert config.seeds == [3]
    assert config.n_entities == PRESETS["smoke"]["n_entities"]  # preset > default
    assert load_config().to_dict() == RunConfig().to_dict()
    toml = tmp_path / "c.toml"
    toml.write_text('strategies = ["sago"]\nalpha = 0.5\n')
    assert load_config(toml).strategies == ["sago"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"strategies": ["nope"]}, "strategies"),
        ({"lr": -1.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"model": "somewhere"}, "forget_data"),
        ({"dtype": "int8"}, "dtype"),
        ({"objective": "ga", "beta": 0.1}, "objective"),
        ({"hidden_size": 30, "heads": 4}, "hidden_size"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"^invalid {field}="):
        load_config(overrides=overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    config = load_config(preset=name)
    if name.startswith("rwku_"):
        assert config.epochs == 2 and config.batch_size * config.accumulation == 32


def test_unknown_key_and_preset(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ConfigError, match=r"invalid key='stepz': expected one of objective"):
        load_config(path)
    with pytest.raises(ConfigError, match="invalid preset='nope'"):
        load_config(preset="nope")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--strategy", "nope"], "invalid strategies="),
        (["--lr", "-1"], "invalid lr=-1.0"),
        (["--steps", "0"], "invalid steps=0"),
        (["--model", "m"], "invalid forget_data=None"),
        (["--accumulation", "0"], "invalid accumulation=0"),
        (
            ["--objective", "simnpo", "--beta", "-1"],
            "invalid beta=-1.0: expected a finite number > 0",
        ),
        (["--retain-loss", "mse"], "invalid retain_loss='mse': expected one of nll, kl, none"),
        (["--delta", "nan"], "invalid delta=nan"),
    ],
)
def test_cli_config_errors_exit_nonzero(tmp_path, capsys, argv, needle):
    assert main(["run", "--out", str(tmp_path / "o"), *argv]) != 0
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_cli_unknown_key_in_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"nope": 1}))
    assert main(["run", "--config", str(path)]) != 0
    assert "'nope'" in capsys.readouterr().err


def _tiny_model_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(40)]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>"
    )
    directory = tmp_path / "model"
    tiny_llama().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_real_model_path(tmp_path):
    directory = _tiny_model_dir(tmp_path)
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.txt"
    forget.write_text(
        "\n".join(
            json.dumps({"text": " ".join(f"w{(i * j) % 40}" for j in range(30))}) for i in range(4)
        )
        + "\n"
    )
    retain.write_text(" ".join(f"w{j % 40}" for j in range(100)))
    out = tmp_path / "runs"
    status = main(
        [
            *("run", "--model", str(directory)),
            *("--forget-data", str(forget), "--retain-data", str(retain)),
            *("--out", str(out), "--strategy", "sago", "--epochs", "2", "--batch-size", "2"),
        ]
    )
    assert status == 0
    # --epochs 2: two passes over the forget data, here one chunk in one batch
    assert json.loads((out / "graddiff-sago-seed0" / "config.json").read_text())["steps"] == 2
    store = geomkit.open_run(out / "graddiff-sago-seed0")
    assert store.sizes["step"] == 2
    assert torch.isfinite(torch.tensor(store["forget_loss"].values)).all()
    config = json.loads((out / "graddiff-sago-seed0" / "config.json").read_text())
    assert config["model"] == str(directory) and config["retain_data"] == str(retain)
    assert config["forget_data"] == str(forget) and config["retain_loss"] == "nll"
    assert (out / "summary.csv").exists()
