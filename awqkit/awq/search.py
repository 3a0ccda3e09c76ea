"""The two searches of AWQ: per-input-channel scales, then per-group weight clipping.

**Scale search.** Salient weights are the ones that meet large activations. Scaling input channel ``j`` of the
weight up by ``s_j`` (and the activation down by the same factor) shrinks its relative rounding error, at the
cost of the other channels in its group. AWQ searches ``s = x̄^α / w̄^(1-α)`` (``x̄``: mean |activation| per channel,
``w̄``: mean normalised |weight|; "duo scaling") or ``s = x̄^α``, over a grid of α in [0, 1), and keeps the α whose
quantized block output is closest (MSE) to the float output. α = 0 is plain round-to-nearest, so AWQ never loses to
it on the calibration data.

**Clip search.** Shrinking a group's range before rounding trades a few clipped outliers for finer steps for
everything else; per output channel and group, the shrink (down to 50 %) minimising the output error is kept. The
error of a group's weight change ``Δ`` over all calibration tokens is ``Δ X_gᵀX_g Δᵀ``, so each candidate is scored on
every token at a cost independent of their number (:func:`block_gram`).
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


def shared_mean(v: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """``v`` averaged over the channels that ``mapping`` sends to the same source channel (shape kept)."""
    mapping = mapping.to(v.device)
    n = int(mapping.max()) + 1
    sums = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, mapping, v)
    counts = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, mapping, torch.ones_like(v))
    return (sums / counts)[mapping]


def search_scales(
    x_mean: torch.Tensor,
    weights: list[torch.Tensor],
    group_size: int,
    loss_of: Callable[[torch.Tensor], float],
    duo_scaling: bool = True,
    n_grid: int = N_GRID,
    mapping: torch.Tensor | None = None,
) -> ScaleResult:
    """Grid-search α; ``loss_of(scales)`` returns the block-output MSE with the group quantized at those scales.

    ``mapping`` (see :func:`awqkit.awq.fold.channel_map`) ties channels that one output of the previous op feeds:
    their statistics are averaged so that every candidate gives them one scale, which is what makes it foldable.
    """
    w_mean = weight_mean(weights, group_size) if duo_scaling else None
    x_mean = x_mean.float()
    if mapping is not None and int(mapping.max()) + 1 < mapping.numel():
        x_mean = shared_mean(x_mean, mapping)
        w_mean = None if w_mean is None else shared_mean(w_mean, mapping)
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
    """Mean squared output error of a weight change over all tokens: ``tr(ΔW XᵀX ΔWᵀ) / (tokens · out)``.

    The product runs in ``gram``'s dtype (bfloat16 halves its time on CPUs that multiply it natively; the loss then
    moves by ~1e-4 relative, far below the differences between the α candidates it ranks), the sum in float32."""
    return (torch.sum((delta.to(gram.dtype) @ gram).float() * delta) / (tokens * delta.shape[0])).item()


def block_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group second moments ``X_gᵀ X_g`` ``[groups, G, G]`` of inputs ``x`` ``[tokens, K]`` (fp32).

    The output error a weight change ``Δ`` of one (output channel, group) causes over those tokens is
    ``Δ · X_gᵀX_g · Δᵀ``, so the clip search can score a candidate on every calibration token at a cost that does
    not grow with the number of tokens.
    """
    xg = x.float().reshape(x.shape[0], -1, group_size).transpose(0, 1)  # [groups, T, G]
    return torch.bmm(xg.transpose(1, 2), xg)


def _group_errors(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``Δ_ng · H_g · Δ_ngᵀ`` for every output channel ``n`` and group ``g``: ``[N, groups]``."""
    d = delta.transpose(0, 1)  # [groups, N, G]
    return (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1)


def _quantize_clipped(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, zero_point: bool) -> torch.Tensor:
    """Fake-quantized ``w`` ``[N, groups, G]`` after clamping each group to ``[lo, hi]``."""
    n, groups, g = w.shape
    clipped = torch.maximum(torch.minimum(w, hi.unsqueeze(-1)), lo.unsqueeze(-1))
    return fake_quantize(clipped.reshape(n, groups * g), g, zero_point).reshape(n, groups, g)


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    group_size: int,
    zero_point: bool,
    n_grid: int = N_GRID,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best clipping range per (output channel, group): ``(low, high, mean shrink)``.

    ``gram`` is :func:`block_gram` of the Linear's inputs. Candidates are scored by the output error they cause
    over all of those tokens (AutoAWQ measures 512 tokens, with a broadcast over every candidate).

    With a zero point the range is ``[r_lo·min, r_hi·max]``: first the best common shrink ``r`` (a grid of
    ``n_grid·max_shrink`` steps down to ``1 - max_shrink``), then each end refined on its own with the other held —
    a lopsided group often wants only one side clipped, which AutoAWQ's symmetric ``[-r·absmax, r·absmax]`` cannot
    do. Without a zero point the range is symmetric, as the quantizer's is.
    """
    n_out, k = weight.shape
    w = weight.float().reshape(n_out, k // group_size, group_size)
    gram = gram.to(w.device, torch.float32)
    if zero_point:
        hi0, lo0 = w.amax(dim=-1).clamp(min=0), w.amin(dim=-1).clamp(max=0)
    else:
        hi0 = w.abs().amax(dim=-1)
        lo0 = -hi0
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    best_err = torch.full_like(hi0, float("inf"))
    r_lo, r_hi = torch.ones_like(hi0), torch.ones_like(hi0)

    def consider(cand_lo: torch.Tensor, cand_hi: torch.Tensor) -> None:
        nonlocal best_err, r_lo, r_hi
        err = _group_errors(_quantize_clipped(w, lo0 * cand_lo, hi0 * cand_hi, zero_point) - w, gram)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        r_lo, r_hi = torch.where(better, cand_lo, r_lo), torch.where(better, cand_hi, r_hi)

    for r in ratios:  # common shrink
        consider(torch.full_like(hi0, r), torch.full_like(hi0, r))
    if zero_point:  # then each end on its own
        for r in ratios:
            consider(r_lo.clone(), torch.full_like(hi0, r))
        for r in ratios:
            consider(torch.full_like(hi0, r), r_hi.clone())
    low, high = lo0 * r_lo, hi0 * r_hi
    span = (hi0 - lo0).clamp(min=1e-12)
    shrink = 1 - ((high - low) / span).clamp(max=1).mean().item()
    return low, high, shrink


@torch.no_grad()
def apply_clip(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, group_size: int) -> None:
    """Clamp each group of ``weight`` (in place) to ``[low, high]``."""
    n_out, k = weight.shape
    g = weight.view(n_out, k // group_size, group_size)
    g.copy_(torch.maximum(torch.minimum(g, high.to(weight).unsqueeze(-1)), low.to(weight).unsqueeze(-1)))
