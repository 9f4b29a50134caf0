"""Forget and retain losses of two-task LLM unlearning (docs/method.md#objectives).

Every loss maps ``(model, batch, reference=None)`` to a scalar to *minimise*; the engine
differentiates the forget loss L_f and the retain loss L_r in two separate backward passes and
combines the two gradients with a strategy (:mod:`geomkit.strategies`).

Batches follow the Hugging Face causal-LM convention: a mapping with ``input_ids`` [B, T]
(integer), ``attention_mask`` [B, T] and ``labels`` [B, T] (integer, ``-100`` where a position
carries no loss). The losses shift themselves: ``logits[:, :-1]`` predict ``labels[:, 1:]``, so
``labels[:, 0]`` never counts. Token log-probabilities are always computed in float32 (also for
bfloat16 models). The loss-carrying positions are those with a label other than ``-100``; the
attention mask is only handed to the model (and, for the activation losses of RMU, selects the
positions that count). A batch without any position that counts raises ``ValueError`` instead
of returning NaN.

Every loss is a ratio ``total / count`` (:meth:`~ForgetLoss.total`, :meth:`~ForgetLoss.count`):
the count depends on the batch only (its ``normalisation``, one of :data:`NORMALISATIONS`), so the
engine can divide the totals of all micro-batches of an optimizer step, on all processes, by
their summed count and take the gradient of the global loss however the batch is split
(docs/method.md#normalisation).

A frozen reference model, where a loss needs one (``needs_reference``), is evaluated under
:func:`torch.no_grad`, so it never receives gradients; put it in ``eval()`` mode yourself.

>>> from geomkit.objectives import build_objective
>>> objective = build_objective("simnpo", beta=0.7, delta=0.1)
>>> objective
Objective(name='simnpo', forget=SimNPO(beta=0.7, delta=0.1), retain=NLL(), trainable=None)
>>> import torch
>>> from types import SimpleNamespace
>>> class Uniform(torch.nn.Module):  # a stand-in LM: all 5 words of its vocabulary equally likely
...     def forward(self, input_ids, attention_mask=None, **kwargs):
...         return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5))
>>> ids = torch.tensor([[1, 2, 3, 4]])
>>> batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
>>> round(float(build_objective("ga").forget(Uniform(), batch)), 4)  # -mean NLL = -log 5
-1.6094
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geomkit._deprecation import renamed
from geomkit._validation import check_choice, check_integer, check_real, invalid

__all__ = [
    "IGNORE_INDEX",
    "NORMALISATIONS",
    "check_count",
    "OBJECTIVES",
    "RETAIN_KINDS",
    "ForgetLoss",
    "RetainLoss",
    "GA",
    "NPO",
    "SimNPO",
    "RMU",
    "NLL",
    "KL",
    "RMURetain",
    "Objective",
    "build_objective",
    "rmu_trainable",
]

IGNORE_INDEX: int = -100
"""Label value of positions that carry no loss (the Hugging Face convention)."""

OBJECTIVES: tuple[str, ...] = ("ga", "graddiff", "npo", "simnpo", "rmu")
"""Names accepted by :func:`build_objective`."""

RETAIN_KINDS: tuple[str, ...] = ("nll", "kl", "none")
"""Values of ``retain_loss=`` accepted by :func:`build_objective`."""

NORMALISATIONS: dict[str, str] = {
    "token": "loss-carrying token",
    "sequence": "sequence with a loss-carrying token",
    "activation": "non-padded token",
}
"""What a loss's :meth:`~ForgetLoss.count` counts, by ``normalisation``: the loss-carrying
next-token positions (``labels[:, 1:] != -100``), the sequences with at least one of them, or
the non-padded positions (``attention_mask != 0``)."""


def check_count(count: int, loss: object, data: str) -> int:
    """Return a step's normaliser ``count``; raise a clear ValueError when it is 0 (the data
    hold nothing the loss ``normalisation`` counts, so its mean would be NaN).

    ``data`` says which data (e.g. ``"the forget data of step 3 (2 micro-batch(es) on 1
    process(es))"``).

    >>> check_count(0, GA(), "the forget data of step 3")
    Traceback (most recent call last):
    ...
    ValueError: GA: the forget data of step 3 hold no loss-carrying token; the loss would be NaN
    """
    if not count:
        unit = NORMALISATIONS.get(getattr(loss, "normalisation", None) or "", "unit")
        raise ValueError(f"{type(loss).__name__}: {data} hold no {unit}; the loss would be NaN")
    return count


RMU_DEFAULT_LAYER: int = 7
"""The RMU layer of the paper (Zephyr-7B); smaller models fall back to their last block."""

_KEYS_LM = ("input_ids", "attention_mask", "labels")
_KEYS_ACTIVATION = ("input_ids", "attention_mask")


# --------------------------------------------------------------------------------------------
# Parameter and input checks
# --------------------------------------------------------------------------------------------


def _batch(owner: str, batch: object, keys: tuple[str, ...]) -> list[Tensor]:
    """Return ``[batch[k] for k in keys]`` after checking types and shapes."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{owner}: invalid batch of type {type(batch).__name__}: "
            f"expected a mapping of tensors ({', '.join(keys)})"
        )
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(
            f"{owner}: invalid batch with keys {', '.join(map(repr, batch))}: expected the "
            f"keys {', '.join(map(repr, keys))} (missing {', '.join(map(repr, missing))})"
        )
    tensors = [batch[k] for k in keys]
    for key, t in zip(keys, tensors, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{owner}: invalid batch[{key!r}] of type {type(t).__name__}: "
                "expected a torch.Tensor"
            )
    ids = tensors[0]
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"{owner}: invalid batch['input_ids'] of dtype {ids.dtype} and shape "
            f"{tuple(ids.shape)}: expected an integer tensor [batch, tokens]"
        )
    for key, t in zip(keys[1:], tensors[1:], strict=True):
        if t.shape != ids.shape:
            raise ValueError(
                f"{owner}: invalid batch[{key!r}] of shape {tuple(t.shape)}: expected the "
                f"shape of batch['input_ids'] {tuple(ids.shape)}"
            )
    if "labels" in keys and (tensors[2].is_floating_point() or tensors[2].is_complex()):
        raise ValueError(
            f"{owner}: invalid batch['labels'] of dtype {tensors[2].dtype}: "
            "expected an integer tensor"
        )
    return tensors


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, hidden: bool = False) -> Any:
    return model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=hidden)


# --------------------------------------------------------------------------------------------
# Shared reductions
# --------------------------------------------------------------------------------------------


def _count(owner: str, normalisation: str, batch: object) -> Tensor:
    """The number of units of ``normalisation`` (:data:`NORMALISATIONS`) in ``batch`` (int64)."""
    if normalisation == "activation":
        _, attention = _batch(owner, batch, _KEYS_ACTIVATION)
        return (attention != 0).sum()
    _, _, labels = _batch(owner, batch, _KEYS_LM)
    keep = labels[:, 1:] != IGNORE_INDEX
    return keep.any(-1).sum() if normalisation == "sequence" else keep.sum()


def _empty(owner: str, normalisation: str) -> ValueError:
    """The error of a batch whose count is 0."""
    if normalisation == "activation":
        return ValueError(
            f"{owner}: the batch has no non-padded token (attention_mask is 0 everywhere)"
        )
    return ValueError(
        f"{owner}: the batch has no loss-carrying token (every label after the first "
        f"position is {IGNORE_INDEX}); a loss over it would be NaN"
    )


def _token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL [B, T-1] in float32 (0 where the label is ``IGNORE_INDEX``) and the mask
    of loss-carrying positions [B, T-1], both on the logits' device."""
    targets = labels[:, 1:].to(logits.device)
    shifted = logits[:, :-1].float()
    nll = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(targets.shape), targets != IGNORE_INDEX


def _sequence_sum(values: Tensor, valid: Tensor) -> Tensor:
    """Sum of ``values`` [B] over the sequences where ``valid`` [B] holds."""
    return torch.where(valid, values, torch.zeros_like(values)).sum()


def _resolve_layer(owner: str, layer: int | None, n_layers: int) -> int:
    resolved = min(RMU_DEFAULT_LAYER, n_layers - 1) if layer is None else layer
    if not 0 <= resolved < n_layers:
        raise invalid(
            "layer",
            resolved,
            f"an integer in [0, {n_layers - 1}] (the model has {n_layers} decoder layers)",
            owner=owner,
        )
    return resolved


def _masked_mse_sum(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Sum over the positions in ``mask`` [B, T] of the mean over hidden dims of (a - b)^2
    (float32)."""
    per_token = (a.float() - b.float()).square().mean(-1)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


# --------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------


class _Loss:
    """A loss ``total / count``: an un-normalised total over the batch and a count that depends on
    the batch only.

    A built-in loss implements :meth:`total` and names its :attr:`normalisation`; a custom loss
    may instead implement :meth:`compute` alone (it then counts 1 per batch, so that the engine
    averages it over the micro-batches and processes of a step).
    """

    needs_reference: bool = False
    """Whether the loss compares against a frozen reference model (``reference=`` required)."""

    normalisation: str | None = None
    """What :meth:`count` counts: a key of :data:`NORMALISATIONS` (``None``: 1 per batch)."""

    def __call__(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """Return the scalar loss of ``model`` on ``batch`` (float32, differentiable).

        Parameters
        ----------
        model : torch.nn.Module
            A causal LM returning ``.logits`` (and ``.hidden_states`` on request), such as a
            Hugging Face ``*ForCausalLM``.
        batch : mapping of str to Tensor
            ``input_ids``, ``attention_mask`` and ``labels`` (RMU losses need no labels).
        reference : torch.nn.Module, optional
            The frozen reference model; required when :attr:`needs_reference` is true and
            ignored otherwise.
        """
        self._check_reference(reference)
        return self.compute(model, batch, reference)

    def _check_reference(self, reference: nn.Module | None) -> None:
        if self.needs_reference and reference is None:
            name = type(self).__name__
            raise invalid("reference", reference, "a frozen reference model", owner=name)

    def compute(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None
    ) -> Tensor:
        """The loss itself, ``total / count``; called by ``__call__`` after the reference check.

        Raises ``ValueError`` when the count is 0 (the loss would be NaN).
        """
        count = self.count(batch)
        if not bool(count):
            raise _empty(type(self).__name__, self.normalisation or "token")
        return self.total(model, batch, reference) / count

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """The un-normalised loss: the sum over the batch's units (scalar float32,
        differentiable; 0 for a batch without any unit). ``total / count`` is the loss.

        A loss that implements only :meth:`compute` returns it here (its count is 1).
        """
        if type(self).compute is _Loss.compute:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither total() (with a normalisation) nor "
                "compute()"
            )
        self._check_reference(reference)
        return self.compute(model, batch, reference)

    def count(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The normaliser: the number of units of :attr:`normalisation` in ``batch`` (a 0-dim
        int64 tensor on the batch's device; 1 when :attr:`normalisation` is ``None``). It
        depends on the batch only, never on the model."""
        if self.normalisation is None:
            device = next((v.device for v in batch.values() if isinstance(v, Tensor)), None)
            return torch.ones((), dtype=torch.int64, device=device)
        return _count(type(self).__name__, self.normalisation, batch)

    def _params(self) -> dict[str, object]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._params().items())))


class ForgetLoss(_Loss):
    """A forget loss L_f, written as something to minimise (e.g. -NLL for gradient ascent)."""


class RetainLoss(_Loss):
    """A retain loss L_r, minimised to keep the model's behaviour on retain data."""


# --------------------------------------------------------------------------------------------
# Forget losses
# --------------------------------------------------------------------------------------------


class GA(ForgetLoss):
    """Gradient ascent on the forget data (Jang et al., 2023; Maini et al., 2024, TOFU).

    L_f = -(1/N) sum_{t} NLL_t, the negated mean token negative log-likelihood over all N
    loss-carrying tokens of the batch (a token mean, not a mean of sequence means).
    """

    normalisation = "token"

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """-sum_t NLL_t over the loss-carrying tokens."""
        ids, mask, labels = _batch("GA", batch, _KEYS_LM)
        nll, _ = _token_nll(_forward(model, ids, mask).logits, labels)
        return -nll.sum()


class NPO(ForgetLoss):
    """Negative Preference Optimization (Zhang et al., 2024, arXiv 2404.05868).

    L_f = -(2/beta) mean_y log sigmoid(-beta [log pi_theta(y) - log pi_ref(y)]), where
    log pi(y) is the sum of the token log-probabilities of sequence y over its loss-carrying
    tokens and pi_ref is the frozen reference model. Sequences without any loss-carrying token
    are left out of the mean.

    Parameters
    ----------
    beta : float
        Inverse temperature, > 0. The default 0.1 is a generic choice; the paper's per-run values
        (1e-4 to 0.05) are listed in docs/method.md#paper-hyper-parameters.
    """

    needs_reference = True
    normalisation = "sequence"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = check_real("beta", beta, 0, strict=True, owner="NPO")

    def _params(self) -> dict[str, object]:
        return {"beta": self.beta}

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """-(2/beta) sum_y log sigmoid(...) over the sequences with a loss-carrying token."""
        self._check_reference(reference)
        ids, mask, labels = _batch("NPO", batch, _KEYS_LM)
        nll, keep = _token_nll(_forward(model, ids, mask).logits, labels)
        with torch.no_grad():
            ref_nll, _ = _token_nll(_forward(reference, ids, mask).logits, labels)
        # log pi_theta(y) - log pi_ref(y) = -(sum NLL_theta) + (sum NLL_ref)
        log_ratio = ref_nll.to(nll.device).sum(-1) - nll.sum(-1)
        terms = F.logsigmoid(-self.beta * log_ratio)
        return -(2.0 / self.beta) * _sequence_sum(terms, keep.any(-1))


class SimNPO(ForgetLoss):
    """Simple NPO, reference-free and length-normalised (Fan et al., 2024, arXiv 2410.07163).

    L_f = -(2/beta) mean_y log sigmoid(beta [NLL_avg(y) - delta]), where NLL_avg(y) is the mean
    token NLL over the loss-carrying tokens of sequence y (the form of the released SAGO /
    open-unlearning code, margin inside the product). Sequences without any loss-carrying token
    are left out of the mean.

    Parameters
    ----------
    beta : float
        Inverse temperature, > 0. Default 2.5 (a generic choice; the paper's per-run values,
        0.02 to 5.0, are in docs/method.md#paper-hyper-parameters).
    delta : float
        Margin subtracted from the length-normalised NLL. Default 0.0; the paper uses 0.1.
    """

    normalisation = "sequence"

    def __init__(self, beta: float = 2.5, delta: float = 0.0) -> None:
        self.beta = check_real("beta", beta, 0, strict=True, owner="SimNPO")
        self.delta = check_real("delta", delta, owner="SimNPO")

    def _params(self) -> dict[str, object]:
        return {"beta": self.beta, "delta": self.delta}

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """-(2/beta) sum_y log sigmoid(...) over the sequences with a loss-carrying token."""
        ids, mask, labels = _batch("SimNPO", batch, _KEYS_LM)
        nll, keep = _token_nll(_forward(model, ids, mask).logits, labels)
        counts = keep.sum(-1)
        valid = counts > 0
        nll_avg = nll.sum(-1) / counts.clamp(min=1)
        terms = F.logsigmoid(self.beta * (nll_avg - self.delta))
        return -(2.0 / self.beta) * _sequence_sum(terms, valid)


class RMU(ForgetLoss):
    """Representation Misdirection for Unlearning, forget term (Li et al., 2024, WMDP).

    L_f = mean over non-padded tokens and hidden dimensions of (h_l(x_f) - c u)^2, where h_l is
    ``hidden_states[layer + 1]`` of the model run with ``output_hidden_states=True`` (the output
    of decoder block ``layer``; for the last block, Hugging Face models return it *after* the
    final norm) and u is a fixed random unit vector: uniform on [0, 1)^d from a
    :class:`torch.Generator` seeded with ``seed``, divided by its norm (as in the WMDP code),
    cast to the activations' device and dtype. Padded positions (``attention_mask == 0``) do
    not count; labels are not used.

    Parameters
    ----------
    layer : int or None
        Decoder block whose output is steered. ``None`` resolves at each call to
        ``min(7, n_layers - 1)`` (7 is the paper's layer for Zephyr-7B). An out-of-range layer
        raises ``ValueError`` at the first call, naming the model's layer count.
    coefficient : float
        Steering coefficient c > 0. Default 2.0, the paper's value
        (docs/method.md#paper-hyper-parameters).
    seed : int
        Seed of the random direction u (>= 0).
    """

    normalisation = "activation"

    def __init__(self, layer: int | None = None, coefficient: float = 2.0, seed: int = 0) -> None:
        self.layer = None if layer is None else check_integer("layer", layer, 0, owner="RMU")
        self.coefficient = check_real("coefficient", coefficient, 0, strict=True, owner="RMU")
        self.seed = check_integer("seed", seed, 0, owner="RMU")
        self._directions: dict[tuple[int, torch.device | None, torch.dtype], Tensor] = {}

    def _params(self) -> dict[str, object]:
        return {"layer": self.layer, "coefficient": self.coefficient, "seed": self.seed}

    def resolve_layer(self, n_layers: int) -> int:
        """The layer steered in a model with ``n_layers`` decoder blocks (checked)."""
        return _resolve_layer("RMU", self.layer, n_layers)

    def steering_vector(
        self,
        hidden_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The unit vector u of dimension ``hidden_size`` (not scaled by the coefficient).

        Generated in float32 on the CPU from ``seed`` (so identical on every device), then cast
        to ``device`` and ``dtype``; cached per ``(hidden_size, device, dtype)``.
        """
        hidden_size = check_integer("hidden_size", hidden_size, 0, owner="RMU")
        device = None if device is None else torch.device(device)
        key = (hidden_size, device, dtype)
        if key not in self._directions:
            generator = torch.Generator().manual_seed(self.seed)
            u = torch.rand(hidden_size, generator=generator, dtype=torch.float32)
            u = u / u.norm()
            self._directions[key] = u.to(device=device, dtype=dtype)
        return self._directions[key]

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """Sum over the non-padded tokens of the hidden-dimension mean of (h_l - c u)^2."""
        ids, attention = _batch("RMU", batch, _KEYS_ACTIVATION)
        keep = attention != 0
        states = _forward(model, ids, attention, hidden=True).hidden_states
        h = states[self.resolve_layer(len(states) - 1) + 1]
        u = self.steering_vector(h.shape[-1], device=h.device, dtype=h.dtype)
        return _masked_mse_sum(h, self.coefficient * u.float(), keep.to(h.device))


# --------------------------------------------------------------------------------------------
# Retain losses
# --------------------------------------------------------------------------------------------


class NLL(RetainLoss):
    """Gradient descent on the retain data, the "GD" term of GradDiff (Maini et al., 2024, TOFU).

    L_r = (1/N) sum_t NLL_t, the mean token negative log-likelihood over all N loss-carrying
    tokens of the batch.
    """

    normalisation = "token"

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """sum_t NLL_t over the loss-carrying tokens."""
        ids, mask, labels = _batch("NLL", batch, _KEYS_LM)
        nll, _ = _token_nll(_forward(model, ids, mask).logits, labels)
        return nll.sum()


class KL(RetainLoss):
    """KL divergence to the frozen reference on retain data (Maini et al., 2024, TOFU).

    L_r = (1/N) sum_t KL(pi_ref(. | x_<t) || pi_theta(. | x_<t)), the mean over the N
    loss-carrying (next-token) positions of the batch of the full-vocabulary KL divergence.
    """

    needs_reference = True
    normalisation = "token"

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """sum_t KL_t over the loss-carrying positions."""
        self._check_reference(reference)
        ids, mask, labels = _batch("KL", batch, _KEYS_LM)
        logits = _forward(model, ids, mask).logits[:, :-1]
        keep = labels[:, 1:] != IGNORE_INDEX
        log_p = logits[keep.to(logits.device)].float().log_softmax(-1)
        with torch.no_grad():
            ref_logits = _forward(reference, ids, mask).logits[:, :-1]
            log_q = ref_logits[keep.to(ref_logits.device)].float().log_softmax(-1)
        if log_q.shape != log_p.shape:
            raise ValueError(
                f"KL: the reference's vocabulary ({ref_logits.shape[-1]}) differs from the "
                f"model's ({logits.shape[-1]})"
            )
        log_q = log_q.to(log_p.device)
        kl = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
        return kl.sum()


class RMURetain(RetainLoss):
    """RMU retain term: keep layer-l activations on retain data (Li et al., 2024, WMDP).

    L_r = mean over non-padded tokens and hidden dimensions of (h_l(x_r) - h_l^ref(x_r))^2,
    with h_l as in :class:`RMU` and h_l^ref the frozen reference's activation.

    Parameters
    ----------
    layer : int or None
        As in :class:`RMU` (``None``: ``min(7, n_layers - 1)``); use the forget term's layer.
    """

    needs_reference = True
    normalisation = "activation"

    def __init__(self, layer: int | None = None) -> None:
        self.layer = None if layer is None else check_integer("layer", layer, 0, owner="RMURetain")

    def _params(self) -> dict[str, object]:
        return {"layer": self.layer}

    def resolve_layer(self, n_layers: int) -> int:
        """The layer compared in a model with ``n_layers`` decoder blocks (checked)."""
        return _resolve_layer("RMURetain", self.layer, n_layers)

    def total(
        self, model: nn.Module, batch: Mapping[str, Tensor], reference: nn.Module | None = None
    ) -> Tensor:
        """Sum over the non-padded tokens of the hidden-dimension mean of (h_l - h_l^ref)^2."""
        self._check_reference(reference)
        ids, attention = _batch("RMURetain", batch, _KEYS_ACTIVATION)
        keep = attention != 0
        states = _forward(model, ids, attention, hidden=True).hidden_states
        layer = self.resolve_layer(len(states) - 1)
        with torch.no_grad():
            ref_states = _forward(reference, ids, attention, hidden=True).hidden_states
        if len(ref_states) != len(states):
            raise ValueError(
                f"RMURetain: the reference has {len(ref_states) - 1} decoder layers, "
                f"the model {len(states) - 1}"
            )
        h = states[layer + 1]
        return _masked_mse_sum(h, ref_states[layer + 1].to(h.device), keep.to(h.device))


# --------------------------------------------------------------------------------------------
# Objective = forget loss + retain loss
# --------------------------------------------------------------------------------------------


def rmu_trainable(layer: int) -> str:
    """Regex (for :func:`re.search` on parameter names) of the tensors RMU trains.

    The ``mlp.down_proj`` weights of blocks ``layer - 2 .. layer`` (clipped at 0), as in the
    paper (layer 7: ``layers\\.(5|6|7)\\.mlp\\.down_proj``). Llama-family names.
    """
    layer = check_integer("layer", layer, 0, owner="rmu_trainable")
    blocks = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    return rf"layers\.({blocks})\.mlp\.down_proj"


@dataclass(frozen=True)
class Objective:
    """An unlearning objective: a forget loss and an optional retain loss.

    Parameters
    ----------
    name : str
        The method name (one of :data:`OBJECTIVES` when built by :func:`build_objective`).
    forget : ForgetLoss
        L_f, minimised.
    retain : RetainLoss or None
        L_r, minimised; ``None`` for forget-only methods.
    trainable : str or None
        Regex, for :func:`re.search` on ``named_parameters()`` names, of the parameters to
        train; ``None`` means all. For RMU with an unresolved layer use :meth:`trainable_for`.
    """

    name: str
    forget: ForgetLoss
    retain: RetainLoss | None
    trainable: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise invalid("name", self.name, "a str", owner="Objective", error=TypeError)
        if not isinstance(self.forget, ForgetLoss):
            raise invalid(
                "forget",
                self.forget,
                f"a ForgetLoss, got {type(self.forget).__name__}",
                owner="Objective",
                error=TypeError,
            )
        if self.retain is not None and not isinstance(self.retain, RetainLoss):
            raise invalid(
                "retain",
                self.retain,
                f"a RetainLoss or None, got {type(self.retain).__name__}",
                owner="Objective",
                error=TypeError,
            )
        if self.trainable is not None:
            if not isinstance(self.trainable, str):
                raise invalid(
                    "trainable",
                    self.trainable,
                    f"a regex str or None, got {type(self.trainable).__name__}",
                    owner="Objective",
                    error=TypeError,
                )
            try:
                re.compile(self.trainable)
            except re.error as err:
                raise invalid(
                    "trainable", self.trainable, f"a valid regex ({err})", owner="Objective"
                ) from None

    @property
    def needs_reference(self) -> bool:
        """Whether either loss needs a frozen reference model."""
        return self.forget.needs_reference or (
            self.retain is not None and self.retain.needs_reference
        )

    def trainable_for(self, n_layers: int) -> str | None:
        """The trainable-parameter regex for a model with ``n_layers`` decoder blocks.

        :attr:`trainable` when set; for RMU otherwise :func:`rmu_trainable` of the resolved
        layer (which also checks the layer against ``n_layers``); else ``None`` (all).
        """
        if isinstance(self.forget, RMU):
            layer = self.forget.resolve_layer(n_layers)
            if self.trainable is None:
                return rmu_trainable(layer)
        return self.trainable


@renamed(retain="retain_loss")
def build_objective(
    name: str,
    *,
    retain_loss: str = "nll",
    beta: float | None = None,
    delta: float | None = None,
    layer: int | None = None,
    coefficient: float | None = None,
    seed: int = 0,
) -> Objective:
    """Build a named objective (docs/method.md#objectives).

    Parameters
    ----------
    name : str
        ``"ga"`` (GA alone), ``"graddiff"`` (GA + retain), ``"npo"`` (NPO + retain, "NPO+GD"),
        ``"simnpo"`` (SimNPO + retain) or ``"rmu"`` (RMU + RMURetain).
    retain_loss : str
        ``"nll"`` (:class:`NLL`, default), ``"kl"`` (:class:`KL`) or ``"none"`` (forget only)
        for graddiff, npo and simnpo; graddiff needs a retain loss. ``"ga"`` is forget-only and
        ``"rmu"`` always uses :class:`RMURetain`: for them only the default or ``"none"`` is
        accepted.
    beta : float, optional
        NPO / SimNPO inverse temperature; defaults 0.1 (NPO) and 2.5 (SimNPO).
    delta : float, optional
        SimNPO margin; default 0.0.
    layer : int, optional
        RMU layer; default ``min(7, n_layers - 1)``, resolved at the first call.
    coefficient : float, optional
        RMU steering coefficient c; default 2.0.
    seed : int
        Seed of RMU's random direction.

    The defaults are generic; the paper's per-run values are in
    docs/method.md#paper-hyper-parameters. Parameters that the objective does not use must be left
    as ``None``.
    """
    check_choice("objective", name, list(OBJECTIVES))
    check_choice("retain_loss", retain_loss, list(RETAIN_KINDS))
    uses = {
        "beta": ("npo", "simnpo"),
        "delta": ("simnpo",),
        "layer": ("rmu",),
        "coefficient": ("rmu",),
    }
    given = {"beta": beta, "delta": delta, "layer": layer, "coefficient": coefficient}
    for param, value in given.items():
        if value is not None and name not in uses[param]:
            raise invalid(
                param,
                value,
                f"None for objective {name!r} (it is a parameter of {', '.join(uses[param])})",
            )
    if retain_loss == "kl" and name in ("ga", "rmu"):
        hints = {
            "ga": "use 'graddiff' for GA with a retain loss",
            "rmu": "its retain loss is RMURetain",
        }
        raise invalid("retain_loss", retain_loss, f"'nll' or 'none' for {name!r} ({hints[name]})")
    if retain_loss == "none" and name == "graddiff":
        raise invalid(
            "retain_loss", retain_loss, "'nll' or 'kl' for 'graddiff' (use 'ga' for GA alone)"
        )

    forget: ForgetLoss
    trainable = None
    if name in ("ga", "graddiff"):
        forget = GA()
    elif name == "npo":
        forget = NPO(0.1 if beta is None else beta)
    elif name == "simnpo":
        forget = SimNPO(2.5 if beta is None else beta, 0.0 if delta is None else delta)
    else:
        forget = RMU(layer, 2.0 if coefficient is None else coefficient, seed)
        trainable = None if layer is None else rmu_trainable(layer)

    retain: RetainLoss | None
    if retain_loss == "none" or name == "ga":
        retain = None
    elif name == "rmu":
        retain = RMURetain(layer)
    else:
        retain = KL() if retain_loss == "kl" else NLL()
    return Objective(name, forget, retain, trainable)
