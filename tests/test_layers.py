"""Tests for geomkit.layers: parameter name -> (layer, component) mapping."""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geomkit.layers import (
    COMPONENTS,
    MODULES,
    TensorLocation,
    locate,
    locate_all,
    locate_model,
)

N_LAYERS = 3
_LLAMA_LIKE = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}

# family -> (model class, config class, config kwargs, expected {name: (layer, component)},
#            names expected outside the blocks)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], dict[str, tuple[int, str]], set[str]]] = {
    "llama": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(_LLAMA_LIKE, tie_word_embeddings=False),
        {
            "model.embed_tokens.weight": (-1, "embed"),
            "model.layers.0.self_attn.q_proj.weight": (0, "attn_q"),
            "model.layers.1.self_attn.k_proj.weight": (1, "attn_k"),
            "model.layers.2.self_attn.v_proj.weight": (2, "attn_v"),
            "model.layers.2.self_attn.o_proj.weight": (2, "attn_o"),
            "model.layers.0.mlp.gate_proj.weight": (0, "mlp_gate"),
            "model.layers.1.mlp.up_proj.weight": (1, "mlp_up"),
            "model.layers.2.mlp.down_proj.weight": (2, "mlp_down"),
            "model.layers.0.input_layernorm.weight": (0, "norm"),
            "model.layers.1.post_attention_layernorm.weight": (1, "norm"),
            "model.norm.weight": (-1, "norm"),
            "lm_head.weight": (-1, "lm_head"),
        },
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    ),
    "mistral": (
        "MistralForCausalLM",
        "MistralConfig",
        dict(_LLAMA_LIKE, tie_word_embeddings=False),
        {
            "model.layers.1.self_attn.o_proj.weight": (1, "attn_o"),
            "model.layers.2.mlp.gate_proj.weight": (2, "mlp_gate"),
            "lm_head.weight": (-1, "lm_head"),
        },
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(_LLAMA_LIKE, tie_word_embeddings=False),
        {
            "model.layers.0.self_attn.q_proj.bias": (0, "attn_q"),
            "model.layers.1.self_attn.k_proj.bias": (1, "attn_k"),
            "model.layers.2.self_attn.v_proj.bias": (2, "attn_v"),
            "model.layers.2.self_attn.o_proj.weight": (2, "attn_o"),
            "model.norm.weight": (-1, "norm"),
        },
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        "Qwen3Config",
        dict(_LLAMA_LIKE, head_dim=8, tie_word_embeddings=False),
        {
            "model.layers.0.self_attn.q_norm.weight": (0, "norm"),
            "model.layers.2.self_attn.k_norm.weight": (2, "norm"),
            "model.layers.1.self_attn.q_proj.weight": (1, "attn_q"),
        },
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    ),
    "gemma_tied": (  # embeddings tied by default: lm_head is not a separate parameter
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(_LLAMA_LIKE, head_dim=8),
        {
            "model.embed_tokens.weight": (-1, "embed"),
            "model.layers.2.mlp.down_proj.weight": (2, "mlp_down"),
        },
        {"model.embed_tokens.weight", "model.norm.weight"},
    ),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {
            "vocab_size": 64,
            "n_embd": 16,
            "n_layer": N_LAYERS,
            "n_head": 2,
            "n_positions": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        {
            "transformer.wte.weight": (-1, "embed"),
            "transformer.wpe.weight": (-1, "embed"),
            "transformer.h.0.ln_1.weight": (0, "norm"),
            "transformer.h.1.ln_2.bias": (1, "norm"),
            "transformer.h.0.attn.c_attn.weight": (0, "attn_qkv"),
            "transformer.h.1.attn.c_attn.bias": (1, "attn_qkv"),
            "transformer.h.2.attn.c_proj.weight": (2, "attn_o"),
            "transformer.h.2.attn.c_proj.bias": (2, "attn_o"),
            "transformer.h.0.mlp.c_fc.weight": (0, "mlp_up"),
            "transformer.h.2.mlp.c_proj.weight": (2, "mlp_down"),
            "transformer.h.2.mlp.c_proj.bias": (2, "mlp_down"),
            "transformer.ln_f.weight": (-1, "norm"),
        },
        # GPT-2 ties lm_head to wte, so lm_head.weight is not listed.
        {
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
        },
    ),
    "gpt_neox": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        {
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 2,
            "tie_word_embeddings": False,
        },
        {
            "gpt_neox.embed_in.weight": (-1, "embed"),
            "gpt_neox.layers.0.attention.query_key_value.weight": (0, "attn_qkv"),
            "gpt_neox.layers.1.attention.dense.bias": (1, "attn_o"),
            "gpt_neox.layers.2.mlp.dense_h_to_4h.weight": (2, "mlp_up"),
            "gpt_neox.layers.2.mlp.dense_4h_to_h.bias": (2, "mlp_down"),
            "gpt_neox.layers.0.input_layernorm.bias": (0, "norm"),
            "gpt_neox.layers.0.post_attention_layernorm.weight": (0, "norm"),
            "gpt_neox.final_layer_norm.weight": (-1, "norm"),
            # transformers 5 names the NeoX output head lm_head, not embed_out
            "lm_head.weight": (-1, "lm_head"),
        },
        {
            "gpt_neox.embed_in.weight",
            "gpt_neox.final_layer_norm.weight",
            "gpt_neox.final_layer_norm.bias",
            "lm_head.weight",
        },
    ),
    "phi": (
        "PhiForCausalLM",
        "PhiConfig",
        {
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 2,
            "tie_word_embeddings": False,
        },
        {
            "model.layers.0.self_attn.q_proj.bias": (0, "attn_q"),
            "model.layers.1.self_attn.dense.weight": (1, "attn_o"),
            "model.layers.1.self_attn.dense.bias": (1, "attn_o"),
            "model.layers.2.mlp.fc1.weight": (2, "mlp_up"),
            "model.layers.2.mlp.fc2.bias": (2, "mlp_down"),
            "model.layers.0.input_layernorm.weight": (0, "norm"),
            "model.final_layernorm.bias": (-1, "norm"),
            "lm_head.bias": (-1, "lm_head"),
        },
        {
            "model.embed_tokens.weight",
            "model.final_layernorm.weight",
            "model.final_layernorm.bias",
            "lm_head.weight",
            "lm_head.bias",
        },
    ),
    "phi3": (
        "Phi3ForCausalLM",
        "Phi3Config",
        {
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": N_LAYERS,
            "num_attention_heads": 2,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "tie_word_embeddings": False,
        },
        {
            "model.layers.0.self_attn.qkv_proj.weight": (0, "attn_qkv"),
            "model.layers.1.self_attn.o_proj.weight": (1, "attn_o"),
            "model.layers.2.mlp.gate_up_proj.weight": (2, "mlp_gate_up"),
            "model.layers.2.mlp.down_proj.weight": (2, "mlp_down"),
        },
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"},
    ),
}


@functools.cache
def _build(family: str) -> Any:
    transformers = pytest.importorskip("transformers")
    model_cls_name, config_cls_name, kwargs, _, _ = FAMILIES[family]
    model_cls = getattr(transformers, model_cls_name, None)
    config_cls = getattr(transformers, config_cls_name, None)
    if model_cls is None or config_cls is None:
        pytest.skip(f"{model_cls_name} not available in this transformers")
    return model_cls(config_cls(**kwargs))


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------- real models


def test_every_parameter_gets_valid_known_location(family: str) -> None:
    model = _build(family)
    names = [n for n, _ in model.named_parameters()]
    locs = locate_model(model)
    assert [loc.name for loc in locs] == names
    for loc in locs:
        assert loc.component in COMPONENTS
        assert loc.module in MODULES
        assert loc.component != "other", loc.name


def test_distinct_layers_match_config(family: str) -> None:
    locs = locate_model(_build(family))
    assert {loc.layer for loc in locs if loc.layer >= 0} == set(range(N_LAYERS))
    assert all(loc.layer >= -1 for loc in locs)


def test_blocks_have_identical_component_layout(family: str) -> None:
    locs = locate_model(_build(family))
    per_layer = [sorted(loc.component for loc in locs if loc.layer == i) for i in range(N_LAYERS)]
    assert all(layout == per_layer[0] for layout in per_layer)
    assert set(per_layer[0]) >= {"attn_o", "mlp_down", "norm"}


def test_expected_components_for_named_parameters(family: str) -> None:
    model = _build(family)
    _, _, _, expected, _ = FAMILIES[family]
    by_name = {loc.name: loc for loc in locate_model(model)}
    for name, (layer, component) in expected.items():
        assert name in by_name, f"{name} not a parameter of {family}"
        assert (by_name[name].layer, by_name[name].component) == (layer, component), name


def test_tensors_outside_blocks_have_layer_minus_one(family: str) -> None:
    model = _build(family)
    _, _, _, _, outside = FAMILIES[family]
    locs = locate_model(model)
    assert {loc.name for loc in locs if loc.layer == -1} == outside
    for loc in locs:
        if loc.component in ("embed", "lm_head"):
            assert loc.layer == -1, loc.name


def test_untied_models_expose_lm_head_tied_ones_do_not(family: str) -> None:
    model = _build(family)
    components = {loc.component for loc in locate_model(model)}
    if model.config.tie_word_embeddings:
        assert "lm_head" not in components
    else:
        assert "lm_head" in components
    assert "embed" in components


def test_locate_model_trainable_only_respects_requires_grad() -> None:
    model = _build("llama")
    try:
        for name, param in model.named_parameters():
            param.requires_grad_(".layers.1.mlp." in name or name == "lm_head.weight")
        trainable = locate_model(model, trainable_only=True)
        assert [loc.name for loc in trainable] == [
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "lm_head.weight",
        ]
        assert len(locate_model(model)) == len(list(model.parameters()))
        assert len(locate_model(model, trainable_only=False)) > len(trainable)
    finally:
        for param in model.parameters():
            param.requires_grad_(True)


def test_locate_model_with_no_trainable_parameters() -> None:
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(2, 2)
    layer.requires_grad_(False)
    assert locate_model(layer, trainable_only=True) == []
    assert [loc.component for loc in locate_model(layer)] == ["other", "other"]


# --------------------------------------------------------------------------- raw names

RAW_CASES: list[tuple[str, int, str]] = [
    # GPT-2: c_proj under attn vs mlp
    ("transformer.h.0.attn.c_proj.weight", 0, "attn_o"),
    ("transformer.h.0.attn.c_proj.bias", 0, "attn_o"),
    ("transformer.h.0.mlp.c_proj.weight", 0, "mlp_down"),
    ("transformer.h.11.mlp.c_proj.bias", 11, "mlp_down"),
    ("transformer.h.2.attn.c_attn.weight", 2, "attn_qkv"),
    ("transformer.h.0.mlp.c_fc.bias", 0, "mlp_up"),
    ("transformer.ln_f.bias", -1, "norm"),
    ("transformer.wpe.weight", -1, "embed"),
    # segment matching: o_proj vs gate_proj, multi-digit indices
    ("model.layers.31.mlp.gate_proj.weight", 31, "mlp_gate"),
    ("model.layers.10.self_attn.o_proj.weight", 10, "attn_o"),
    ("model.layers.3.self_attn.q_proj.bias", 3, "attn_q"),
    ("model.layers.3.self_attn.k_norm.weight", 3, "norm"),
    # numbers that are not block indices
    ("model.embed_tokens.weight", -1, "embed"),
    ("model.layers.0.mlp.fc1.weight", 0, "mlp_up"),
    ("model.layers.0.mlp.fc2.weight", 0, "mlp_down"),
    ("transformer.h.4.ln_2.weight", 4, "norm"),
    ("model.layers.2.block_sparse_moe.experts.7.w1.weight", 2, "mlp_gate"),
    ("model.layers.2.block_sparse_moe.experts.7.w3.weight", 2, "mlp_up"),
    ("model.layers.2.block_sparse_moe.experts.7.w2.weight", 2, "mlp_down"),
    ("decoder.layers.x.mlp.down_proj.weight", -1, "mlp_down"),  # non-integer after container
    # GPT-NeoX / Phi / Phi-3
    ("gpt_neox.layers.1.attention.query_key_value.weight", 1, "attn_qkv"),
    ("gpt_neox.layers.1.attention.dense.weight", 1, "attn_o"),
    ("embed_out.weight", -1, "lm_head"),
    ("model.layers.5.self_attn.dense.bias", 5, "attn_o"),
    ("model.layers.5.self_attn.qkv_proj.weight", 5, "attn_qkv"),
    ("model.layers.5.mlp.gate_up_proj.weight", 5, "mlp_gate_up"),
    ("model.final_layernorm.weight", -1, "norm"),
    # transformers 5 fused MoE experts (3-D tensors without a .weight suffix)
    ("model.layers.0.mlp.experts.gate_up_proj", 0, "mlp_gate_up"),
    ("model.layers.0.mlp.experts.down_proj", 0, "mlp_down"),
    ("model.layers.0.mlp.gate.weight", 0, "other"),  # MoE router
    # wrappers: PEFT / DDP / torch.compile prefixes
    ("base_model.model.model.layers.4.self_attn.v_proj.lora_A.default.weight", 4, "attn_v"),
    ("module._orig_mod.model.layers.1.mlp.up_proj.weight", 1, "mlp_up"),
    # other containers
    ("encoder.blocks.7.foo.weight", 7, "other"),
    ("encoder.block.2.layer.1.SelfAttention.q.weight", 2, "attn_q"),
    ("bert.encoder.layer.6.attention.self.key.bias", 6, "attn_k"),
    ("bert.encoder.layer.6.attention.output.dense.weight", 6, "attn_o"),
    ("layers.0.attention.wv.weight", 0, "attn_v"),
    ("layers.0.feed_forward.w2.weight", 0, "mlp_down"),
    ("transformer.layers.1.self_attn.in_proj_weight", 1, "attn_qkv"),
    ("transformer.layers.1.self_attn.out_proj.bias", 1, "attn_o"),
    # generic fallbacks
    ("model.layers.3.self_attn.rotary.inv_freq", 3, "other"),
    ("classifier.weight", -1, "other"),
    ("weight", -1, "other"),
    ("h", -1, "other"),
    ("layers.9", 9, "other"),
]


@pytest.mark.parametrize(("name", "layer", "component"), RAW_CASES)
def test_locate_raw_names(name: str, layer: int, component: str) -> None:
    loc = locate(name)
    assert loc == TensorLocation(name=name, layer=layer, component=component, module=loc.module)
    assert loc.module in MODULES


@pytest.mark.parametrize(
    ("component", "module"),
    [
        ("embed", "embed"),
        ("attn_q", "attention"),
        ("attn_k", "attention"),
        ("attn_v", "attention"),
        ("attn_qkv", "attention"),
        ("attn_o", "attention"),
        ("mlp_gate", "mlp"),
        ("mlp_up", "mlp"),
        ("mlp_gate_up", "mlp"),
        ("mlp_down", "mlp"),
        ("norm", "norm"),
        ("lm_head", "lm_head"),
        ("other", "other"),
    ],
)
def test_module_is_derived_from_component(component: str, module: str) -> None:
    locs = [locate(name) for name, _, comp in RAW_CASES if comp == component]
    locs += [
        locate(name)
        for spec in FAMILIES.values()
        for name, (_, comp) in spec[3].items()
        if comp == component
    ]
    assert locs, f"no test case covers {component}"
    assert {loc.module for loc in locs} == {module}


def test_components_and_modules_constants() -> None:
    assert len(set(COMPONENTS)) == len(COMPONENTS) == 13
    assert COMPONENTS[0] == "embed" and COMPONENTS[-1] == "other"
    assert MODULES == ("embed", "attention", "mlp", "norm", "lm_head", "other")


def test_locate_all_preserves_order_and_accepts_iterables() -> None:
    names = ["lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    locs = locate_all(iter(names))
    assert [loc.name for loc in locs] == names
    assert [loc.component for loc in locs] == ["lm_head", "mlp_up", "norm"]
    assert locate_all([]) == []


def test_tensor_location_is_frozen() -> None:
    loc = locate("model.norm.weight")
    with pytest.raises(FrozenInstanceError):
        loc.layer = 3  # type: ignore[misc]


@given(st.text(min_size=1).filter(lambda s: s.strip()))
def test_locate_never_crashes_on_arbitrary_text(name: str) -> None:
    loc = locate(name)
    assert loc.name == name
    assert loc.component in COMPONENTS
    assert loc.module in MODULES
    assert loc.layer >= -1


@given(
    st.sampled_from(["layers", "layer", "h", "blocks", "block"]),
    st.integers(min_value=0, max_value=10_000),
    st.sampled_from(["model", "transformer", "gpt_neox", "encoder.decoder"]),
)
def test_block_index_round_trips(container: str, index: int, prefix: str) -> None:
    loc = locate(f"{prefix}.{container}.{index}.mlp.down_proj.weight")
    assert (loc.layer, loc.component, loc.module) == (index, "mlp_down", "mlp")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("bad", "type_name"), [(3, "int"), (None, "NoneType"), (b"x", "bytes")])
def test_locate_rejects_non_strings(bad: object, type_name: str) -> None:
    with pytest.raises(TypeError, match=f"parameter name string, got {type_name}"):
        locate(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "   "])
def test_locate_rejects_empty_names(bad: str) -> None:
    with pytest.raises(ValueError, match="non-empty parameter name"):
        locate(bad)


def test_locate_all_rejects_single_string_and_bad_elements() -> None:
    with pytest.raises(TypeError, match="iterable of parameter name strings"):
        locate_all("model.norm.weight")
    with pytest.raises(TypeError, match="got int"):
        locate_all(["model.norm.weight", 7])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="non-empty"):
        locate_all(["model.norm.weight", ""])


# --------------------------------------------------------------------------- dependencies


def test_module_imports_only_stdlib() -> None:
    # Load layers.py by path so that whatever geomkit/__init__.py imports is not counted.
    path = Path(__file__).resolve().parents[1] / "geomkit" / "layers.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_layers_probe', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert mod.locate('model.norm.weight').component == 'norm'\n"
        "bad = {'torch', 'transformers', 'numpy', 'xarray', 'matplotlib'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
