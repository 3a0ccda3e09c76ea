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


def can_fold(prev: nn.Module, linears: list[nn.Module]) -> bool:
    """Whether the scales of ``linears``' inputs can be absorbed by ``prev``.

    A Linear can absorb them only when its outputs are exactly the next Linears' inputs; with grouped-query
    attention v_proj has fewer outputs than o_proj has inputs (each v head feeds several query heads), so the
    v→o group is skipped there, as AutoAWQ does.
    """
    k = linears[0].in_features
    if isinstance(prev, nn.Linear) or hasattr(prev, "out_features"):
        return prev.out_features == k
    weight = getattr(prev, "weight", None)
    return weight is not None and weight.shape == (k,)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Multiply ``linears``' input channels by ``scales`` and divide ``prev``'s output by them, in place."""
    s = scales.to(torch.float32)
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
        fc.weight.mul_(s.to(fc.weight).view(1, -1))


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
