"""Tensor-core path: fused dequantize + ``tl.dot`` GEMM, with optional split-K, for M from a few rows to prefill.

Each program loads an activation tile ``x [BM, BK]`` and the packed weight tile ``[BK, BN / 8]``, unpacks and
dequantizes the weight in registers (``(q - z) * s`` in fp32, exact up to one rounding to the activation dtype, like
the reference), and accumulates ``x @ W`` in fp32 on the tensor cores. The weight is read once per ``BM`` rows of
``x``, so for small M the kernel is still a pass over 0.52 byte per weight and split-K spreads that pass over the
SMs; the fp32 partials then go through the same workspace + :func:`~awqkit.kernels.gemv.reduce_splits` as the GEMV.

``SWAP`` computes ``(W^T x^T)^T`` instead: the dequantized tile becomes the left operand, which Hopper's wgmma can
take straight from registers (the right operand must sit in shared memory), saving a shared-memory round trip of
the dequantized weight. Which one wins is measured (see docs/kernels-notes.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import interpreting, nibble_value, nibbles_minus_zeros, unpack_tile, unpack_tile_one_plus
from awqkit.kernels.gemv import reduce_splits


@triton.jit
def dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8,
                 G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """Rows ``k0 .. k0+BK`` of ``W`` for columns ``offs_n`` as ``[BK, BN]`` in ``dtype`` (fp32 math, one rounding)."""
    qw = tl.load(qw_ptr + (k0 + offs_k)[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
    if BK <= G:  # the tile lies inside one group: one row of zeros and scales
        g = k0 // G
        qz = tl.load(qz_ptr + g * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
        s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    else:  # several groups: gather each row's zeros and scales (cache hits: G rows share one)
        g = (k0 + offs_k) // G
        qz = tl.load(qz_ptr + g[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    w = nibbles_minus_zeros(unpack_tile(qw, BN), unpack_tile(qz, BN)) * s.to(tl.float32)
    return w.to(dtype)


@triton.jit(do_not_specialize=["M", "stride_os"])  # see gemv.py: no recompile per M; N8 passed for its divisibility
def _gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, N8, K, k_split, stride_xm, stride_os, stride_om,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, SWAP: tl.constexpr, TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, DQ: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    BN8: tl.constexpr = BN // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)

    # grouped tile order: GROUP_M row-tiles share each weight tile while it is in L2
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8

    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    dtype = x_ptr.dtype.element_ty

    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BK, num_stages=STAGES):
        a = tl.load(x_ptrs + k0, mask=mask_m[:, None], other=0.0)
        if DQ == 0:  # w = (q - z) * s rounded once to the activation dtype
            w = dequant_tile(
                qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G, BK, BN, dtype
            )
            if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 holds them exactly
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if SWAP:
                acc = tl.dot(tl.trans(w), tl.trans(a), acc)
            else:
                acc = tl.dot(a, w, acc)
        else:  # BK == G: f = 1 + q/16 is exact in bf16/fp16, so the tile costs a funnel shift and a LOP3 per weight;
            # x (q - z) s summed over the group = s (16 (x @ f) - (16 + z) sum x), applied once per group
            qw = tl.load(qw_ptr + (k0 + offs_k)[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
            f = unpack_tile_one_plus(qw, BN, ASM).to(dtype)
            g = k0 // G
            z16 = 16.0 + nibble_value(unpack_tile(tl.load(qz_ptr + g * N8 + offs_n8[None, :], mask=mask_n8[None, :],
                                                          other=0), BN))  # fmt: skip
            s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0).to(tl.float32)
            sx = tl.sum(a.to(tl.float32), axis=1)[:, None]  # [BM, 1]
            if DOT_F32:
                a = a.to(tl.float32)
                f = f.to(tl.float32)
            if SWAP:
                d = tl.trans(tl.dot(tl.trans(f), tl.trans(a)))
            else:
                d = tl.dot(a, f)
            if SWAP:
                acc += tl.trans(s * (16.0 * d - z16 * sx))
            else:
                acc += s * (16.0 * d - z16 * sx)
    if SWAP:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & mask_n[None, :]
    if TO_WORKSPACE:
        tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(dtype), mask=mask)


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 64,
    split_k: int = 1,
    group_m: int = 8,
    num_warps: int = 4,
    stages: int = 3,
    swap: bool = False,
    dq: int = 0,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` with the fused dequantize-and-dot kernel; ``split_k`` slices of ``block_k`` tiles.

    ``block_k`` must divide ``group_size`` or be a multiple of it. ``dq=1`` (the ``1 + q/16`` form, fewer
    instructions per weight) forces ``block_k = group_size``.
    """
    if dq:
        block_k = group_size
    m, k = x.shape
    n = scales.shape[1]
    assert group_size % block_k == 0 or block_k % group_size == 0, (block_k, group_size)
    assert k % block_k == 0 and x.stride(1) == 1
    steps = k // block_k
    split_k = max(1, min(split_k, steps))
    k_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(k, k_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dest = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _gemm_kernel[grid](
        x, qweight, qzeros, scales, dest, bias if bias is not None else out,
        m, n, n // 8, k, k_split, x.stride(0), m * n, n,
        G=group_size, BM=block_m, BN=block_n, BK=block_k, GROUP_M=group_m, STAGES=stages, SWAP=swap,
        TO_WORKSPACE=split_k > 1, HAS_BIAS=bias is not None, DOT_F32=interpreting(), DQ=dq,
        ASM=not interpreting(), num_warps=num_warps,
    )  # fmt: skip
    if split_k > 1:
        reduce_splits(dest, out, bias)
    return out
