"""Fold AWQ scales into the model so the float function is unchanged.

For Linears reading ``x``, AWQ multiplies their input channels by ``s`` and divides ``x`` by ``s``:
``W x = (W diag(s)) (diag(s)⁻¹ x)``. The division is absorbed by the op that produced ``x``:

* a norm ``y = n(x) * w (+ b)``: ``w /= s`` (and ``b /= s``) — for Gemma-style ``n(x) * (1 + w)`` the weight
  becomes ``(1 + w) / s - 1``;
* a Linear ``y = P x + c``: its output rows are divided, ``P[i] /= s[i]``, ``c[i] /= s[i]``.

Both are exact in real arithmetic, so a fold can only change outputs by float rounding; the pipeline checks that.
"""

from __future__ import annotations

import torch
from torch import nn

from awqkit.errors import NumericalError


def channel_map(prev: nn.Module, linears: list[nn.Module], head_dim: int | None = None) -> torch.Tensor | None:
    """For each input channel of ``linears``, the output channel of ``prev`` that produces it; None if none does.

    A norm or a Linear with as many outputs as the next Linears have inputs maps channel ``c`` to ``c``. With
    grouped-query attention v_proj has fewer outputs than o_proj has inputs: each key/value head feeds ``rep``
    query heads, so o's input channel ``(h, d)`` (query head ``h``, dimension ``d < head_dim``) is v's output
    ``(h // rep, d)`` passed through attention — a weighted sum over positions, linear in v. Scales shared by the
    ``rep`` copies of a channel can therefore still be folded into v (AutoAWQ skips this pair instead).
    """
    k = linears[0].in_features
    if isinstance(prev, nn.Linear) or hasattr(prev, "out_features"):
        p = prev.out_features
        if p == k:
            return torch.arange(k)
        if head_dim is None or k % p or p % head_dim:
            return None
        rep = k // p
        c = torch.arange(k)
        return (c // (head_dim * rep)) * head_dim + c % head_dim
    weight = getattr(prev, "weight", None)
    return torch.arange(k) if weight is not None and weight.shape == (k,) else None


def can_fold(prev: nn.Module, linears: list[nn.Module], head_dim: int | None = None) -> bool:
    """Whether the scales of ``linears``' inputs can be absorbed by ``prev`` (see :func:`channel_map`)."""
    return channel_map(prev, linears, head_dim) is not None


@torch.no_grad()
def fold_scales(
    prev: nn.Module,
    linears: list[nn.Module],
    scales: torch.Tensor,
    norm_offset: float = 0.0,
    mapping: torch.Tensor | None = None,
) -> None:
    """Multiply ``linears``' input channels by ``scales`` and divide ``prev``'s output by them, in place.

    ``mapping`` (from :func:`channel_map`) says which output of ``prev`` feeds each input channel; ``scales`` must
    then be equal on channels fed by the same output.
    """
    s_in = scales.to(torch.float32)
    s = s_in if mapping is None else torch.empty(int(mapping.max()) + 1).scatter_(0, mapping, s_in.cpu()).to(s_in)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        if "gemma" in type(prev).__name__.lower() and norm_offset == 0.0:
            raise NumericalError(
                f"{type(prev).__name__} computes x * (1 + w); its family must declare norm_offset=1.0 to fold scales"
            )
        w = prev.weight
        w.copy_(((w.float() + norm_offset) / s - norm_offset).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias))
    for fc in linears:
        fc.weight.mul_(s_in.to(fc.weight).view(1, -1))


def check_fold(before: torch.Tensor, after: torch.Tensor, where: str, tol: float = 1e-4) -> float:
    """Relative change of a layer's float output caused by a fold; raises if beyond float rounding."""
    err = ((after.float() - before.float()).norm() / before.float().norm().clamp(min=1e-12)).item()
    if not err <= tol:  # also catches NaN
        raise NumericalError(
            f"folding AWQ scales changed the float output of {where} by {err:.2e} (relative; tolerance {tol:.0e}). "
            "The fold is exact in theory, so the architecture declaration does not match this model: "
            "please report it with the model's config.json."
        )
    return err
