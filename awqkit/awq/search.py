"""The two searches of AWQ: per-input-channel scales, then per-group weight clipping.

**Scale search.** Salient weights are the ones that meet large activations. Scaling input channel ``j`` of the
weight up by ``s_j`` (and the activation down by the same factor) shrinks its relative rounding error, at the
cost of the other channels in its group. AWQ searches ``s = x̄^α / w̄^(1-α)`` (``x̄``: mean |activation| per channel,
``w̄``: mean normalised |weight|; "duo scaling") or ``s = x̄^α``, over a grid of α in [0, 1), and keeps the α whose
quantized block output is closest (MSE) to the float output. α = 0 is plain round-to-nearest, so AWQ never loses to
it on the calibration data.

**Clip search.** Shrinking a group's range ``[-m, m]`` before rounding trades a few clipped outliers for finer steps
for everything else; per output channel and group, the shrink (down to 50 %) minimising the output error is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from awqkit.awq.quantizer import fake_quantize

N_GRID = 20


@dataclass
class ScaleResult:
    """Outcome of one group's scale search: the scales, chosen α, and block-output MSE at α=0 (RTN) and at α."""

    scales: torch.Tensor
    alpha: float
    rtn_mse: float
    awq_mse: float


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max: how large each input channel's weights are."""
    w = torch.cat([x.float() for x in weights], dim=0)
    g = w.abs().view(-1, group_size)
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.view(w.shape).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """AWQ's scale vector for one α, normalised so that max·min = 1 (keeps magnitudes centred)."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s) | torch.isnan(s)] = 1
    return s


def search_scales(
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    group_size: int,
    loss_of: Callable[[torch.Tensor], float],
    duo_scaling: bool = True,
    n_grid: int = N_GRID,
) -> ScaleResult:
    """Grid-search α; ``loss_of(scales)`` returns the block-output MSE with the group quantized at those scales."""
    w_mean = weight_mean(weights, group_size) if duo_scaling else None
    x_mean = x_mean.float()
    best = None
    rtn = float("nan")
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, w_mean, alpha) if i else torch.ones_like(x_mean)
        loss = loss_of(s)
        if i == 0:
            rtn = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    assert best is not None
    return ScaleResult(scales=best[2], alpha=best[1], rtn_mse=rtn, awq_mse=best[0])


def quantized_trial(weight: torch.Tensor, scales: torch.Tensor, group_size: int, zero_point: bool) -> torch.Tensor:
    """The weight a candidate scaling yields: ``Q(W·s) / s``, in ``weight``'s dtype."""
    s = scales.to(torch.float32).view(1, -1)
    return (fake_quantize(weight.float() * s, group_size, zero_point) / s).to(weight.dtype)


def gram_loss(delta: torch.Tensor, gram: torch.Tensor, tokens: int) -> float:
    """Mean squared output error of a weight change over all tokens: ``tr(ΔW XᵀX ΔWᵀ) / (tokens · out)``."""
    return (torch.sum((delta @ gram) * delta) / (tokens * delta.shape[0])).item()


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    group_size: int,
    zero_point: bool,
    n_grid: int = N_GRID,
    max_shrink: float = 0.5,
    max_elems: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best clipping range per (output channel, group): ``(low, high, mean shrink)``.

    With a zero point the range ``[r·min, r·max]`` shrinks towards zero from both sides; AutoAWQ clips to the
    symmetric ``[-r·absmax, r·absmax]`` even then, which leaves the smaller side of a lopsided group untouched.
    Without a zero point the range is symmetric, as the quantizer's is.

    The output error of each group is computed as a batched matmul over groups (``[groups, tokens, out]``), far
    faster on a CPU than AutoAWQ's broadcast-and-sum, and chunked over output channels to bound memory.
    """
    n_out, k = weight.shape
    n_groups = k // group_size
    w = weight.float()
    xg = x.float().reshape(-1, n_groups, group_size).transpose(0, 1)  # [groups, T, G]
    chunk = max(1, min(n_out, max_elems // max(1, n_groups * xg.shape[1])))
    best_lo = torch.empty(n_out, n_groups, device=w.device)
    best_hi = torch.empty(n_out, n_groups, device=w.device)
    for start in range(0, n_out, chunk):
        wc = w[start : start + chunk].reshape(-1, n_groups, group_size)  # [n, groups, G]
        ref = torch.bmm(xg, wc.transpose(0, 1).transpose(1, 2))  # [groups, T, n]
        if zero_point:
            hi0, lo0 = wc.amax(dim=-1).clamp(min=0), wc.amin(dim=-1).clamp(max=0)
        else:
            hi0 = wc.abs().amax(dim=-1)
            lo0 = -hi0
        best_err = torch.full_like(hi0, float("inf"))
        lo_best, hi_best = lo0.clone(), hi0.clone()
        for i in range(int(max_shrink * n_grid)):
            r = 1 - i / n_grid
            lo, hi = lo0 * r, hi0 * r
            clipped = torch.maximum(torch.minimum(wc, hi.unsqueeze(-1)), lo.unsqueeze(-1))
            q = fake_quantize(clipped.reshape(-1, k), group_size, zero_point).reshape(-1, n_groups, group_size)
            out = torch.bmm(xg, q.transpose(0, 1).transpose(1, 2))
            err = (out - ref).pow(2).mean(dim=1).transpose(0, 1)  # [n, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            lo_best = torch.where(better, lo, lo_best)
            hi_best = torch.where(better, hi, hi_best)
        best_lo[start : start + chunk] = lo_best
        best_hi[start : start + chunk] = hi_best
        del ref
    span = w.reshape(n_out, n_groups, group_size).amax(-1) - w.reshape(n_out, n_groups, group_size).amin(-1)
    shrink = 1 - ((best_hi - best_lo) / span.clamp(min=1e-12)).clamp(max=1).mean().item()
    return best_lo, best_hi, shrink


@torch.no_grad()
def apply_clip(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, group_size: int) -> None:
    """Clamp each group of ``weight`` (in place) to ``[low, high]``."""
    n_out, k = weight.shape
    g = weight.view(n_out, k // group_size, group_size)
    g.copy_(torch.maximum(torch.minimum(g, high.to(weight).unsqueeze(-1)), low.to(weight).unsqueeze(-1)))
