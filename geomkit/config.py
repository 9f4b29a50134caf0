"""One typed configuration for ``geomkit run``: presets, a file, command-line overrides.

:func:`load_config` merges, in this order, a named preset (:data:`PRESETS`), a JSON or TOML file
and explicit overrides into a :class:`RunConfig`, and validates it before any work starts. An
invalid value raises :class:`ConfigError` with one message naming the field, the value and what
is allowed. The resolved configuration is saved into every run directory (``config.json``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geomkit._deprecation import rename_keys, renamed
from geomkit._validation import ConfigError, check_choice, check_integer, check_real, invalid
from geomkit.recorder import VERIFY_EVERY

if TYPE_CHECKING:
    from geomkit.bench.model import ModelConfig, TrainConfig
    from geomkit.engine import EngineConfig
    from geomkit.objectives import Objective

__all__ = ["KEY_ALIASES", "PRESETS", "ConfigError", "RunConfig", "load_config"]

KEY_ALIASES: dict[str, str] = {"retain": "retain_loss", "forget": "forget_data"}
"""Deprecated configuration keys and the fields they now name (they warn, then map)."""


def _default_cache_dir() -> str:
    return os.environ.get("GEOMKIT_CACHE") or str(Path("~/.cache/geomkit").expanduser())


@dataclass
class RunConfig:
    """Everything ``geomkit run`` needs; flat so that files and flags map onto it directly.

    Groups: the unlearning run (``objective`` ... ``out``), the objective's parameters
    (``beta`` ... ``coefficient``, None: the objective's default), the embedded benchmark and its
    tiny model (``n_entities`` ... ``cache_dir``), a real run on local files (``model``,
    ``forget_data``, ``retain_data``, ``chunk_length``; all three paths or none) and the
    hardware (``device``, ``dtype``, ``threads``). :meth:`engine_config`,
    :meth:`model_config`, :meth:`train_config` and :meth:`build_objective` give the settings
    of the parts it drives.
    """

    # unlearning
    objective: str = "graddiff"
    retain_loss: str = "nll"  # the kind of retain loss (geomkit.objectives.RETAIN_KINDS)
    strategies: list[str] = field(default_factory=lambda: ["sum", "pcgrad", "sago"])
    shadows: list[str] | None = None  # None: record every strategy as a shadow
    alpha: float = 1.0
    gamma: float = 1.0
    lr: float = 3e-3  # the embedded default: the plain sum visibly hurts retention (README)
    optimizer: str = "adamw"  # or "sgd" (geomkit.step.OPTIMIZERS)
    steps: int = 60
    epochs: int | None = None  # when set: steps = epochs x forget batches / accumulation
    batch_size: int = 16
    accumulation: int = 1
    seeds: list[int] = field(default_factory=lambda: [0])
    vary: bool = False  # a seed also redraws the data and the target model (data_seed + seed)
    record_every: int = 1
    verify_every: int = VERIFY_EVERY  # the first record and every 50th (0: never)
    record_step: bool = True  # statistics of the optimizer's step u at each record
    record_realized: bool = False  # both losses again after each recorded step
    eval_every: int = 5
    relearn: int = 0  # fine-tuning steps on half the forget entities after unlearning (0: none)
    threshold: float = 0.1  # forget accuracy that counts as "forgotten" (matched forgetting)
    out: str = "runs"
    name: str | None = None  # the run directory's name (one strategy, one seed: a sweep's run)
    # objective parameters
    beta: float | None = None
    delta: float | None = None
    layer: int | None = None
    coefficient: float | None = None
    # embedded benchmark and its model
    n_entities: int = 200
    forget_fraction: float = 0.25  # 50 of 200 entities: 150 forget facts, SE <= 0.025 at 0.1
    data_seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    pretrain_lr: float = 3e-3
    pretrain_epochs: int = 300
    cache_dir: str = field(default_factory=_default_cache_dir)
    # real run on local files
    model: str | None = None
    forget_data: str | None = None
    retain_data: str | None = None
    chunk_length: int = 512
    eval_data: dict[str, str] | None = None  # name -> JSONL multiple-choice file (local model)
    # hardware
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    jobs: int | None = None  # worker processes for several runs (None: the cores, on CPU)

    def for_seed(self, seed: int) -> RunConfig:
        """This configuration narrowed to ``seed``; with ``vary``, also its data and target
        model: ``data_seed + seed`` draws the entities, the forget/retain split and the
        pretraining (a target model cached per seed)."""
        from dataclasses import replace

        if not self.vary:
            return replace(self, seeds=[seed])
        return replace(self, seeds=[seed], data_seed=self.data_seed + seed, vary=False)

    @property
    def real(self) -> bool:
        """Whether this is a run on a local model and corpora (not the embedded benchmark)."""
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON-serialisable data."""
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON (``config.json`` of a run)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first invalid one."""
        from geomkit.bench.data import MAX_ENTITIES
        from geomkit.objectives import OBJECTIVES, RETAIN_KINDS
        from geomkit.strategies import names

        strategies = names()
        _choice("objective", self.objective, OBJECTIVES)
        _choice("retain_loss", self.retain_loss, RETAIN_KINDS)
        _names("strategies", self.strategies, strategies, allow_none=False)
        _names("shadows", self.shadows, strategies, allow_none=True)
        _real("pretrain_lr", self.pretrain_lr, 0.0, strict=True)
        for name in ("batch_size", "eval_every", "chunk_length", "hidden_size", "layers"):
            _integer(name, getattr(self, name), 1)
        for name in ("heads", "pretrain_epochs", "threads"):
            _integer(name, getattr(self, name), 1)
        _integer("data_seed", self.data_seed, 0)
        _integer("epochs", self.epochs, 1, optional=True)
        _integer("jobs", self.jobs, 1, optional=True)
        _integer("relearn", self.relearn, 0)
        if self.relearn and self.real:
            raise _bad("relearn", self.relearn, "0 for a local model (embedded benchmark only)")
        _integer("layer", self.layer, 0, optional=True)
        seeds = "a non-empty list of integers >= 0"
        if not isinstance(self.seeds, list) or not self.seeds:
            raise _bad("seeds", self.seeds, seeds)
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise _bad("seeds", self.seeds, seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise _bad("seeds", self.seeds, "distinct seeds")
        if not isinstance(self.vary, bool):
            raise _bad("vary", self.vary, "true or false")
        if self.vary and self.real:
            raise _bad("vary", self.vary, "false for a local model (its data are given)")
        try:  # the engine's settings (alpha ... record_every), checked by the engine itself
            self.engine_config(self.strategies[0], self.seeds[0]).validate()
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None
        _real("threshold", self.threshold, 0.0, 1.0)
        for name in ("beta", "delta", "coefficient"):
            _real(name, getattr(self, name), optional=True)
        _integer("n_entities", self.n_entities, 10, MAX_ENTITIES)
        _real("forget_fraction", self.forget_fraction, 0.0, 1.0, strict=True, strict_high=True)
        if self.hidden_size % self.heads:
            raise _bad("hidden_size", self.hidden_size, f"a multiple of heads={self.heads}")
        for name in ("out", "cache_dir"):
            _string(name, getattr(self, name))
        if self.name is not None:
            _string("name", self.name)
            if Path(self.name).name != self.name or self.name in (".", ".."):
                raise _bad("name", self.name, "a directory name (no path separators)")
            if len(self.strategies) != 1 or len(self.seeds) != 1:
                raise _bad(
                    "name",
                    self.name,
                    f"None with {len(self.strategies)} strategies x {len(self.seeds)} seeds "
                    "(a named run has one strategy and one seed)",
                )
        self._validate_paths()
        if not isinstance(self.device, str) or not re.fullmatch(
            r"cpu|mps|cuda(:\d+)?", self.device
        ):
            raise _bad("device", self.device, "'cpu', 'cuda', 'cuda:N' or 'mps'")
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        try:  # parameters the objective does not take, or out of range
            self.build_objective()
        except (TypeError, ValueError) as error:
            raise _bad("objective", self.objective, f"parameters it accepts ({error})") from None

    def build_objective(self, seed: int = 0) -> Objective:
        """The :class:`~geomkit.objectives.Objective` this configuration names (RMU's steering
        vector drawn from ``seed``)."""
        from geomkit.objectives import build_objective

        return build_objective(
            self.objective,
            retain_loss=self.retain_loss,
            beta=self.beta,
            delta=self.delta,
            layer=self.layer,
            coefficient=self.coefficient,
            seed=seed,
        )

    def engine_config(self, strategy: str, seed: int) -> EngineConfig:
        """The :class:`~geomkit.engine.EngineConfig` of one run: ``strategy`` applied, ``seed``.

        Every engine setting this configuration also has (``shadows``, ``alpha``, ``gamma``,
        ``lr``, ``optimizer``, ``steps``, ``accumulation``, ``record_every``,
        ``verify_every``, ``record_step``, ``record_realized``) is taken from it by name; the
        others keep the engine's defaults.
        """
        from geomkit.engine import EngineConfig

        return EngineConfig(strategy=strategy, seed=seed, **_shared(self, EngineConfig))

    def model_config(self) -> ModelConfig:
        """The :class:`~geomkit.bench.model.ModelConfig` of the embedded benchmark's model."""
        from geomkit.bench.model import ModelConfig

        return ModelConfig(**_shared(self, ModelConfig))

    def train_config(self) -> TrainConfig:
        """The :class:`~geomkit.bench.model.TrainConfig` pretraining that model (its ``lr``,
        ``max_epochs`` and ``seed`` are ``pretrain_lr``, ``pretrain_epochs`` and ``data_seed``)."""
        from geomkit.bench.model import TrainConfig

        return TrainConfig(
            lr=self.pretrain_lr, max_epochs=self.pretrain_epochs, seed=self.data_seed
        )

    def _validate_paths(self) -> None:
        given = {n: getattr(self, n) for n in ("model", "forget_data", "retain_data")}
        for name, value in given.items():
            if value is not None:
                _string(name, value)
        if any(v is not None for v in given.values()):
            for name, value in given.items():
                if value is None:
                    others = ", ".join(n for n, v in given.items() if v is not None)
                    raise _bad(
                        name,
                        value,
                        "a path: model, forget_data and retain_data come together "
                        f"(given: {others})",
                    )
            if not (Path(self.model) / "config.json").is_file():
                raise _bad("model", self.model, "a local Hugging Face model directory")
            for name in ("forget_data", "retain_data"):
                if not Path(given[name]).is_file():
                    raise _bad(name, given[name], "an existing JSONL or text file")
        if self.eval_data is not None:
            if not self.real:
                raise _bad("eval_data", self.eval_data, "None without a local model")
            if not isinstance(self.eval_data, dict) or not self.eval_data:
                raise _bad("eval_data", self.eval_data, "a table of name = JSONL file")
            for key, path in self.eval_data.items():
                if not isinstance(key, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                    raise _bad("eval_data", key, "names of lower-case letters, digits and _")
                from geomkit.choice import read_questions

                read_questions(path)  # ConfigError naming the file and line of a bad question


# RunConfig(retain=..., forget=...): the deprecated spellings still work, with a warning
RunConfig.__init__ = renamed(**KEY_ALIASES)(RunConfig.__init__)  # type: ignore[method-assign]


def _shared(config: RunConfig, target: type) -> dict[str, Any]:
    """The fields of ``config`` that dataclass ``target`` has too (same name, same meaning)."""
    own = {f.name for f in fields(RunConfig)}
    return {f.name: getattr(config, f.name) for f in fields(target) if f.name in own}


# --------------------------------------------------------------------------------------------
# Checks: geomkit._validation's, raising ConfigError
# --------------------------------------------------------------------------------------------


def _bad(name: str, value: object, allowed: str) -> ConfigError:
    return invalid(name, value, allowed, error=ConfigError)  # type: ignore[return-value]


def _choice(name: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    check_choice(name, value, allowed, error=ConfigError)


def _integer(name: str, value: object, low: int, high: int | None = None, **kw: Any) -> None:
    check_integer(name, value, low, high, error=ConfigError, **kw)


def _real(
    name: str, value: object, low: float | None = None, high: float | None = None, **kw: Any
) -> None:
    check_real(name, value, low, high, error=ConfigError, **kw)


def _names(name: str, value: object, allowed: list[str], allow_none: bool) -> None:
    if value is None and allow_none:
        return
    what = "a list of strategy names from " + ", ".join(allowed)
    if not isinstance(value, list) or (not value and not allow_none):
        raise _bad(name, value, ("a non-empty " if not allow_none else "") + what)
    for item in value:
        if item not in allowed:
            raise _bad(name, value, what + f" ({item!r} is not one)")
    if len(set(value)) != len(value):
        raise _bad(name, value, "distinct names")


def _string(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise _bad(name, value, "a non-empty string")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

# Shared by the paper's WMDP presets (docs/method.md#paper-hyper-parameters): global batch 32
# (here one GPU, 4 x 8 accumulation), 512-token chunks, bf16, seed 0. Warm-up 0.1 and linear decay
# are the engine's defaults. The model and corpora paths are given per run
# (--model/--forget-data/
# --retain-data).
_WMDP: dict[str, Any] = {
    "batch_size": 4,
    "accumulation": 8,
    "chunk_length": 512,
    "dtype": "bfloat16",
    "device": "cuda",
    "seeds": [0],
}

# The paper's RWKU batch setting (docs/method.md#paper-hyper-parameters): Llama-3-8B-Instruct,
# forget the first 50 targets' passages, retain the last 50 targets' passages, 2 epochs, global
# batch 32.
_RWKU: dict[str, Any] = {**_WMDP, "epochs": 2}


def _rwku(objective: str, strategy: str, lr: float, **extra: Any) -> dict[str, Any]:
    return {**_RWKU, "objective": objective, "strategies": [strategy], "lr": lr, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The tiny test configuration: a 2-layer, 32-wide model over 10 entities, 4 steps.
    "smoke": {
        "n_entities": 10,
        "hidden_size": 32,
        "layers": 2,
        "heads": 2,
        "pretrain_epochs": 60,
        "steps": 4,
        "eval_every": 2,
        "batch_size": 8,
        "lr": 1e-3,
    },
    "wmdp_bio_graddiff": {**_WMDP, "strategies": ["sum"], "lr": 3e-6, "steps": 100},
    "wmdp_bio_graddiff_pcgrad": {**_WMDP, "strategies": ["pcgrad"], "lr": 1e-5, "steps": 100},
    "wmdp_bio_graddiff_sago": {
        **_WMDP,
        "strategies": ["sago"],
        "lr": 1e-5,
        "steps": 500,
        "alpha": 0.5,
    },
    "wmdp_bio_npo_sago": {
        **_WMDP,
        "objective": "npo",
        "strategies": ["sago"],
        "lr": 1e-5,
        "steps": 150,
        "alpha": 1.0,
        "gamma": 0.1,
        "beta": 1e-4,
    },
    "wmdp_bio_simnpo_sago": {
        **_WMDP,
        "objective": "simnpo",
        "strategies": ["sago"],
        "lr": 1e-5,
        "steps": 150,
        "alpha": 0.1,
        "gamma": 1.0,
        "beta": 0.02,
        "delta": 0.1,
    },
    # The paper's RMU uses a constant learning rate; the engine's schedule is warm-up + decay.
    "wmdp_bio_rmu": {
        **_WMDP,
        "objective": "rmu",
        "strategies": ["sum"],
        "lr": 5e-5,
        "steps": 80,
        "alpha": 2.5,
        "layer": 7,
        "coefficient": 2.0,
    },
    "rwku_graddiff": _rwku("graddiff", "sum", 8e-7),
    "rwku_graddiff_pcgrad": _rwku("graddiff", "pcgrad", 3e-6),
    "rwku_graddiff_pcgrad_global": _rwku("graddiff", "pcgrad_global", 4e-6),
    "rwku_graddiff_sago": _rwku("graddiff", "sago", 1e-5),
    "rwku_npo": _rwku("npo", "sum", 3e-6, beta=1e-3),
    "rwku_npo_pcgrad": _rwku("npo", "pcgrad", 8e-6, beta=1e-3),
    "rwku_npo_sago": _rwku("npo", "sago", 1e-5, beta=1e-3),
    "rwku_simnpo": _rwku("simnpo", "sum", 8e-6, beta=0.5, delta=0.1),
    "rwku_simnpo_pcgrad": _rwku("simnpo", "pcgrad", 8e-6, alpha=0.5, beta=0.5, delta=0.1),
    "rwku_simnpo_sago": _rwku("simnpo", "sago", 1e-5, alpha=0.1, beta=0.1, delta=0.1),
}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_LISTS = ("strategies", "shadows", "seeds")


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"invalid config={str(path)!r}: expected an existing JSON or TOML file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"invalid config={str(path)!r}: cannot parse it ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"invalid config={str(path)!r}: expected a table of settings")
    return values


def _check_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` with deprecated keys renamed (:data:`KEY_ALIASES`, warning); unknown keys
    raise :class:`ConfigError`."""
    values = rename_keys(values, KEY_ALIASES, source, error=ConfigError)
    valid = [f.name for f in fields(RunConfig)]
    for key in values:
        if key not in valid:
            raise invalid(
                "key", key, "one of " + ", ".join(valid), owner=str(source), error=ConfigError
            )
    return values


def load_config(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The validated configuration: ``preset``, then the file at ``path``, then ``overrides``.

    Parameters
    ----------
    path : path or None
        A JSON file, or TOML if its suffix is ``.toml``, of :class:`RunConfig` fields (the
        deprecated keys of :data:`KEY_ALIASES` warn and still work).
    preset : str or None
        A name of :data:`PRESETS` (None: ``"default"``).
    overrides : dict or None
        Field values that win over both (e.g. the command-line flags actually given).

    Raises
    ------
    ConfigError
        On an unknown preset or key, or an invalid value (the message names the field).
    """
    preset = "default" if preset is None else preset
    if preset not in PRESETS:
        raise _bad("preset", preset, "one of " + ", ".join(PRESETS))
    values: dict[str, Any] = dict(PRESETS[preset])
    if path is not None:
        values.update(_check_keys(_read_file(path), str(path)))
    if overrides:
        values.update(_check_keys(overrides, "the overrides"))
    for key in _LISTS:  # a single value where a list is expected
        if isinstance(values.get(key), (str, int)) and not isinstance(values[key], bool):
            values[key] = [values[key]]
        if isinstance(values.get(key), tuple):
            values[key] = list(values[key])
    for key in ("alpha", "gamma", "lr", "threshold", "forget_fraction", "pretrain_lr"):
        if type(values.get(key)) is int:  # JSON/TOML write 1.0 as 1
            values[key] = float(values[key])
    config = RunConfig(**values)
    config.validate()
    return config
