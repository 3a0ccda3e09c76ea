"""Decode path: split-K GEMV on CUDA cores for the smallest M (1 … a few rows).

At M = 1 the layer is a pass over the packed weight (0.52 byte per weight at group 128) and nothing else, so the
kernel is built to keep the memory system busy while spending as few instructions per weight as possible:

* each program owns ``BN`` output columns and a ``k_split`` slice of the input rows (split-K), so even a narrow layer
  (N = 3584) gives several programs per SM and a wide one (N = 37888) gives no long tail;
* a tile ``[BK, BN]`` lies inside one quantization group (``G % BK == 0``), so the group's scale and zero are
  factored out of the inner sum: per weight the work is shift, and|or (one LOP3), FADD (``q - z``, exact) and FFMA;
  the scale is applied once per tile column: ``acc += s * sum_k x_k (q_k - z)``;
* with split-K the fp32 partial sums go to a workspace ``[split, M, N]`` and :func:`reduce_splits` adds them,
  the bias, and casts — deterministic, no atomics, no zero-fill, so it is CUDA-graph safe (the workspace size depends
  only on the shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import nibbles_minus_zeros, unpack_tile


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, K, k_split, stride_xm, stride_os, stride_om,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    STAGES: tl.constexpr, TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    BN8: tl.constexpr = BN // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    N8 = N // 8

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8
    offs_k = tl.arange(0, BK)
    offs_m = tl.arange(0, BM)
    mask_m = offs_m < M

    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)

    qw_ptrs = qw_ptr + offs_k[:, None] * N8 + offs_n8[None, :]
    if BM == 1:
        acc = tl.zeros([BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)

    for k0 in tl.range(k_begin, k_end, BK, num_stages=STAGES):
        qw = tl.load(qw_ptrs + k0 * N8, mask=mask_n8[None, :], other=0)
        g = k0 // G
        qz = tl.load(qz_ptr + g * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = nibbles_minus_zeros(unpack_tile(qw, BN), unpack_tile(qz, BN))  # [BK, BN] exact q - z
        if BM == 1:
            x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
            acc += s * tl.sum(w * x[:, None], axis=0)
        else:
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0
            ).to(tl.float32)
            acc += s[None, :] * tl.sum(x[:, :, None] * w[None, :, :], axis=1)

    if TO_WORKSPACE:
        base = out_ptr + pid_k * stride_os
        if BM == 1:
            tl.store(base + offs_n, acc, mask=mask_n)
        else:
            tl.store(base + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if BM == 1:
                acc += b
            else:
                acc += b[None, :]
        y = acc.to(out_ptr.dtype.element_ty)
        if BM == 1:
            tl.store(out_ptr + offs_n, y, mask=mask_n)
        else:
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _reduce_kernel(ws_ptr, out_ptr, bias_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``out = sum_s ws[s] (+ bias)`` cast to the output dtype; ``ws`` is ``[SPLIT, M, N]`` fp32, contiguous."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Sum the split-K partials of ``ws [split, M, N]`` into ``out [M, N]`` (plus bias), one launch."""
    split, m, n = ws.shape
    block = 1024
    _reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, out, bias if bias is not None else out, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 256,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    stages: int = 2,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` for small M on CUDA cores; ``split_k`` slices of whole ``block_k`` tiles.

    ``block_k`` must divide the group size; ``M`` may be anything but the work per weight grows with it (one FFMA
    per row), so the dispatcher uses this only for M ≤ 4.
    """
    m, k = x.shape
    n = scales.shape[1]
    block_k = min(block_k, group_size)
    assert group_size % block_k == 0 and x.stride(1) == 1
    bm = 1 if m == 1 else triton.next_power_of_2(m)
    steps = k // block_k
    split_k = max(1, min(split_k, steps))
    k_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(k, k_split)  # no empty slices
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split_k > 1:
        dest = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    else:
        dest = out
    grid = (triton.cdiv(n, block_n), split_k)
    _gemv_kernel[grid](
        x, qweight, qzeros, scales, dest, bias if bias is not None else out,
        m, n, k, k_split, x.stride(0), m * n, n,
        G=group_size, BM=bm, BN=block_n, BK=block_k, STAGES=stages,
        TO_WORKSPACE=split_k > 1, HAS_BIAS=bias is not None, num_warps=num_warps,
    )  # fmt: skip
    if split_k > 1:
        reduce_splits(dest, out, bias)
    return out
