"""Group-wise round-to-nearest 4-bit quantization (AutoAWQ's ``pseudo_quantize_tensor``, with exact fp16 scales).

Asymmetric (zero point): per group of ``G`` input channels, ``s = (max - min) / 15``, ``z = round(-min / s)``,
``q = clamp(round(w / s) + z, 0, 15)``, so ``w ≈ (q - z) * s``. Symmetric: ``s = absmax / 7``,
``q = clamp(round(w / s), -8, 7) + 8`` with the zero point stored as 8.

One change from AutoAWQ: the scale is rounded to fp16 *before* the weights are rounded against it, so the integers
are optimal for the scale that is actually stored (AutoAWQ rounds with the unrounded scale when run in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awqkit.errors import GroupSizeError

MAX_Q = 15


@dataclass
class QuantizedWeight:
    """Integer weights of one Linear, ``nn.Linear`` orientation: q ``[N, K]``, zeros/scales ``[N, K / G]``."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % group_size:
        raise GroupSizeError(f"group size {group_size} does not divide in_features {in_features}")
    return w.reshape(out_features, in_features // group_size, group_size)


def quantize_weight(w: torch.Tensor, group_size: int, zero_point: bool = True) -> QuantizedWeight:
    """Round ``w`` ``[N, K]`` to 4-bit integers per group; scales are exactly representable in fp16."""
    g = _groups(w.float(), group_size)
    if zero_point:
        wmax = g.amax(dim=-1, keepdim=True).clamp(min=0)
        wmin = g.amin(dim=-1, keepdim=True).clamp(max=0)
        scales = ((wmax - wmin).clamp(min=1e-5) / MAX_Q).half().float()
        zeros = torch.round(-wmin / scales).clamp(0, MAX_Q)
        q = torch.clamp(torch.round(g / scales) + zeros, 0, MAX_Q)
    else:
        scales = (g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / 7).half().float()
        zeros = torch.full_like(scales, 8.0)
        q = torch.clamp(torch.round(g / scales), -8, 7) + 8
    n = w.shape[0]
    return QuantizedWeight(
        q=q.reshape(n, -1).to(torch.uint8),
        zeros=zeros.reshape(n, -1).to(torch.uint8),
        scales=scales.reshape(n, -1),
    )


def fake_quantize(w: torch.Tensor, group_size: int, zero_point: bool = True) -> torch.Tensor:
    """``dequant(quant(w))`` in ``w``'s dtype: the weight the quantized layer will compute with."""
    return dequantize_weight(quantize_weight(w, group_size, zero_point), group_size).to(w.dtype)


def dequantize_weight(qw: QuantizedWeight, group_size: int) -> torch.Tensor:
    """Float ``[N, K]`` weight from integers: ``(q - z) * s``."""
    z = qw.zeros.float().repeat_interleave(group_size, dim=1)
    s = qw.scales.float().repeat_interleave(group_size, dim=1)
    return (qw.q.float() - z) * s
