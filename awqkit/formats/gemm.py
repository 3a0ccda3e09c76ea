"""AutoAWQ's GEMM packing, bit for bit.

A quantized Linear with ``in_features = K``, ``out_features = N`` and group size ``G`` is stored as

* ``qweight`` int32 ``[K, N / 8]`` - eight 4-bit weights per int32,
* ``qzeros``  int32 ``[K / G, N / 8]`` - eight 4-bit zero points per int32,
* ``scales``  fp16  ``[K / G, N]``,

and the weight AutoAWQ means is ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]`` (note: ``[in, out]``, the
transpose of ``nn.Linear.weight``). Within an int32, nibble ``i`` (bits ``4i .. 4i+3``) holds output column
``8 * j + AWQ_ORDER[i]``; this interleaving lets AutoAWQ's CUDA kernel unpack with a few shifts. vLLM, Transformers and
every published AWQ checkpoint read exactly this layout, so nothing here may change.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # weights per int32
# nibble i of a packed int32 holds column AWQ_ORDER[i] of its block of eight
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# column c of a block of eight sits in nibble AWQ_REVERSE_ORDER[c]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)
# bit offset of column c's nibble within its int32: unpacking shifts straight to column order, with no gather
_COLUMN_SHIFTS = torch.tensor([BITS * i for i in AWQ_REVERSE_ORDER], dtype=torch.int32)


def pack(intweight: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit integers ``[rows, N]`` (values 0..15) into int32 ``[rows, N / 8]`` in AWQ order."""
    rows, cols = intweight.shape
    if cols % PACK:
        raise ValueError(f"cannot pack {cols} columns: the count must be a multiple of {PACK}")
    q = intweight.to(torch.int32)
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise ValueError("pack() takes unsigned 4-bit values in 0..15")
    # [rows, N/8, 8] with the 8 columns of each block permuted into nibble order
    q = q.view(rows, cols // PACK, PACK)[:, :, list(AWQ_ORDER)]
    shifted = q << _SHIFTS.to(q.device)
    # the nibbles occupy disjoint bits, so a sum is a bitwise OR; int64 avoids overflow of the top nibble
    return shifted.to(torch.int64).sum(-1).to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 ``[rows, N / 8]`` → uint8-valued int32 ``[rows, N]`` in column order."""
    rows, blocks = packed.shape
    return ((packed.unsqueeze(-1) >> _COLUMN_SHIFTS.to(packed.device)) & 0xF).reshape(rows, blocks * PACK)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """AutoAWQ's dequantization ``(q - z) * s`` as a dense ``[K, N]`` tensor (``x @ W`` computes the layer).

    Computed in float32 and cast to ``dtype`` (default: the scales' dtype) at the end, so the result is the exact
    product of the stored fp16 scale and a small integer.
    """
    k, n = qweight.shape[0], scales.shape[1]
    q = unpack(qweight).view(k // group_size, group_size, n)  # broadcast each group's zero and scale
    w = (q - unpack(qzeros)[:, None]).float() * scales.float()[:, None]
    return w.view(k, n).to(dtype or scales.dtype)


def pack_linear(
    intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack one Linear's integer weights into AutoAWQ tensors.

    Args:
        intweight: ``[N, K]`` integers 0..15 (``nn.Linear.weight`` orientation).
        zeros: ``[N, K / G]`` integer zero points 0..15.
        scales: ``[N, K / G]`` float scales.

    Returns:
        ``(qweight [K, N/8], qzeros [K/G, N/8], scales fp16 [K/G, N])``.
    """
    qweight = pack(intweight.t().contiguous())
    qzeros = pack(zeros.t().contiguous())
    return qweight, qzeros, scales.t().contiguous().to(torch.float16)
