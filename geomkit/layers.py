"""Map parameter names to a (layer index, component) location.

This module is the single definition of how a parameter name such as
``model.layers.3.self_attn.q_proj.weight`` is placed in a transformer: which
block it belongs to and which functional component it is. It covers the
naming schemes of Llama / Mistral / Qwen2 / Qwen3 / Gemma, GPT-2, GPT-NeoX,
Phi and Phi-3, plus a loose fallback for anything else. It never raises on an
unknown name; unknown tensors are reported as component ``"other"``.

Only the standard library is imported at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "COMPONENTS",
    "MODULES",
    "TensorLocation",
    "locate",
    "locate_all",
    "locate_model",
]

COMPONENTS: tuple[str, ...] = (
    "embed",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_gate_up",
    "mlp_down",
    "norm",
    "lm_head",
    "other",
)
"""Every component :func:`locate` can return, in display order."""

MODULES: tuple[str, ...] = ("embed", "attention", "mlp", "norm", "lm_head", "other")
"""Coarse groups of :data:`COMPONENTS`, in display order."""

_MODULE_OF: dict[str, str] = {
    c: "attention" if c.startswith("attn_") else "mlp" if c.startswith("mlp_") else c
    for c in COMPONENTS
}

# A block container segment followed by an integer segment: ``layers.3``, ``h.0``, ...
# The first (outermost) match wins, so T5's ``block.2.layer.1`` gives block 2.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Context prefixes: a segment naming attention / an MLP, then at most two
# intermediate segments (e.g. BERT ``attention.self.query``, Mixtral
# ``block_sparse_moe.experts.0.w1``).
_ATTN = r"[^.]*(?:attn|attention)[^.]*\.(?:[^.]+\.){0,2}"
_MLP = r"[^.]*(?:mlp|ffn|feed_?forward|moe|experts?)[^.]*\.(?:[^.]+\.){0,2}"


def _rule(segment: str, component: str, within: str = "") -> tuple[re.Pattern[str], str]:
    """Compile a rule matching whole dotted segment(s) ``segment`` after ``within``."""
    pattern = rf"(?:^|\.){within}(?:{segment})(?:\.|$)"
    return re.compile(pattern, re.IGNORECASE), component


# Ordered: the first matching rule decides. Each alternative must match a whole
# dotted segment, so ``o_proj`` never matches inside ``gate_proj``.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    _rule(r"lm_head|embed_out", "lm_head"),
    _rule(r"[^.]*norm[^.]*|ln|ln_[^.]*", "norm"),  # layernorm, q_norm, ln_1, ln_f, ...
    _rule(r"[^.]*embed[^.]*|wte|wpe", "embed"),  # embed_tokens, embed_in, word_embeddings
    _rule(r"qkv_proj|query_key_value|c_attn|w_?qkv|in_proj_weight|in_proj_bias", "attn_qkv"),
    _rule(r"qkv", "attn_qkv", within=_ATTN),
    _rule(r"q_proj", "attn_q"),
    _rule(r"k_proj", "attn_k"),
    _rule(r"v_proj", "attn_v"),
    _rule(r"o_proj", "attn_o"),
    _rule(r"q|wq|query", "attn_q", within=_ATTN),
    _rule(r"k|wk|key", "attn_k", within=_ATTN),
    _rule(r"v|wv|value", "attn_v", within=_ATTN),
    _rule(r"o|wo|out_proj|dense|c_proj|proj", "attn_o", within=_ATTN),
    _rule(r"gate_up_proj", "mlp_gate_up"),
    _rule(r"gate_proj", "mlp_gate"),
    _rule(r"up_proj|c_fc|fc1|fc_in|dense_h_to_4h", "mlp_up"),
    _rule(r"down_proj|fc2|fc_out|dense_4h_to_h", "mlp_down"),
    _rule(r"w1", "mlp_gate", within=_MLP),  # Meta-Llama / Mixtral naming
    _rule(r"w3", "mlp_up", within=_MLP),
    _rule(r"w2|c_proj", "mlp_down", within=_MLP),
)


@dataclass(frozen=True, slots=True)
class TensorLocation:
    """Where a parameter sits in a transformer.

    Attributes
    ----------
    name : str
        The full parameter name, as given.
    layer : int
        Transformer block index, or ``-1`` for tensors outside the blocks
        (embeddings, final norm, ``lm_head``).
    component : str
        One of :data:`COMPONENTS`.
    module : str
        One of :data:`MODULES`, derived from ``component``.
    """

    name: str
    layer: int
    component: str
    module: str


@lru_cache(maxsize=8192)
def _classify(name: str) -> tuple[int, str]:
    match = _LAYER_RE.search(name)
    layer = int(match.group(1)) if match else -1
    for pattern, component in _RULES:
        if pattern.search(name):
            return layer, component
    return layer, "other"


def locate(name: str) -> TensorLocation:
    """Locate one parameter by name.

    Parameters
    ----------
    name : str
        A parameter name as produced by ``torch.nn.Module.named_parameters``,
        e.g. ``"model.layers.3.self_attn.q_proj.weight"``.

    Returns
    -------
    TensorLocation
        The block index (``-1`` outside the blocks), component and module.
        Names that no rule recognises get component ``"other"``.

    Raises
    ------
    TypeError
        If ``name`` is not a ``str``.
    ValueError
        If ``name`` is empty or only whitespace.
    """
    if not isinstance(name, str):
        # the one message style of geomkit._validation.invalid (this module imports no geomkit)
        raise TypeError(
            f"invalid name={name!r}: expected a parameter name string, got {type(name).__name__}"
        )
    if not name.strip():
        raise ValueError(f"invalid name={name!r}: expected a non-empty parameter name string")
    layer, component = _classify(name)
    return TensorLocation(name=name, layer=layer, component=component, module=_MODULE_OF[component])


def locate_all(names: Iterable[str]) -> list[TensorLocation]:
    """Locate many parameters by name, preserving order.

    Parameters
    ----------
    names : Iterable[str]
        Parameter names. A single ``str`` is rejected rather than iterated
        character by character.

    Returns
    -------
    list[TensorLocation]
        One location per name, in input order.

    Raises
    ------
    TypeError
        If ``names`` is a single string, or any element is not a string.
    ValueError
        If any name is empty.

    Examples
    --------
    >>> names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight"]
    >>> for loc in locate_all(names):
    ...     print(loc.layer, loc.component, loc.module)
    -1 embed embed
    3 attn_q attention
    """
    if isinstance(names, str):
        raise TypeError(
            f"invalid names={names!r}: expected an iterable of parameter name strings, "
            "got a single str"
        )
    return [locate(n) for n in names]


def locate_model(model: torch.nn.Module, trainable_only: bool = False) -> list[TensorLocation]:
    """Locate every parameter of a model, in ``named_parameters()`` order.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; only ``named_parameters()`` is used. Tied (shared)
        parameters appear once, under their first name.
    trainable_only : bool, default False
        If True, skip parameters with ``requires_grad=False``.

    Returns
    -------
    list[TensorLocation]
        One location per parameter.
    """
    return [
        locate(name)
        for name, param in model.named_parameters()
        if not trainable_only or param.requires_grad
    ]
