"""Capture what the search needs: the first decoder layer's inputs, and each Linear group's input statistics.

AWQ runs one decoder layer at a time. The model is run only up to the first layer (a "catcher" stops it there), and
from then on each layer's outputs become the next layer's inputs, so only one layer needs to be on the compute
device at a time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the catcher once layer 0's inputs are recorded."""


def layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    blocks: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the model's embedding part on ``blocks`` and return layer 0's hidden states and keyword arguments.

    Only the modules in front of the first decoder layer (embeddings, rotary tables) run, on ``device``. The kwargs
    (position embeddings, mask) are recorded from the first batch; calibration blocks all share one length, so they
    are the same for every batch (and broadcast over the batch dimension).
    """
    first = layers[0]
    captured: list[torch.Tensor] = []
    kwargs_seen: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().to("cpu", torch.float32))
        if not kwargs_seen:
            kwargs_seen.update(kwargs)
        raise _StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    moved = _move_non_layer_modules(model, layers, device, dtype)
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], batch):
                try:
                    model(input_ids=blocks[start : start + batch].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        for module in moved:
            module.to("cpu")
    kwargs = {k: v for k, v in kwargs_seen.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
    return torch.cat(captured), kwargs


def _move_non_layer_modules(model: nn.Module, layers: nn.ModuleList, device: torch.device, dtype: torch.dtype):
    """Put the embedding and rotary modules (everything that is not a decoder layer or the head) on the device."""
    base = model.get_submodule(_parent_name(model, layers))
    moved = []
    for child in base.children():
        if child is layers:
            continue
        child.to(device)
        if any(p.is_floating_point() for p in child.parameters(recurse=True)):
            child.to(dtype)
        moved.append(child)
    return moved


def _parent_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if any(child is target for child in module.children()):
            return name
    raise ValueError("decoder layers not found in the model")


def kwargs_for(module: nn.Module, layer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of the decoder layer's kwargs that ``module.forward`` accepts (all of them if it takes **kwargs)."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(layer_kwargs)
    return {k: v for k, v in layer_kwargs.items() if k in params}


def slice_batch(kwargs: dict[str, Any], sel: slice | torch.Tensor, total: int) -> dict[str, Any]:
    """Select batch rows of any kwarg tensor that has the full batch dimension (a padding mask, say)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total and total > 1:
            out[k] = v[sel]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[sel] if t.dim() > 0 and t.shape[0] == total and total > 1 else t for t in v)
        else:
            out[k] = v
    return out


@dataclass
class GroupInputs:
    """Statistics of one scale group's shared input, gathered over every calibration token.

    Attributes:
        abs_sum: per-channel sum of |x| (→ the mean activation magnitude that AWQ scales by).
        gram: ``Xᵀ X`` over an evenly strided token sample, for a single-Linear group: the output MSE of any weight
            change ΔW over those tokens is ``tr(ΔW · XᵀX · ΔWᵀ) / (tokens · out)``, without touching them again.
        gram_tokens: how many tokens the Gram matrix holds.
        block_gram: per-group ``X_gᵀ X_g`` ``[groups, G, G]`` over every token, for the clip search.
        search: the input rows of the search sequences (full sequences: attention needs them).
        tokens: how many tokens were seen.
    """

    abs_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    block_gram: torch.Tensor | None = None
    search: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    gram_tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)
