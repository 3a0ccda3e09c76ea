"""Tensor-core path: fused dequantize + ``tl.dot`` GEMM, with optional split-K, for M from a few rows to prefill.

Each program loads an activation tile ``x [BM, BK]`` and the packed weight tile ``[BK, BN / 8]``, unpacks the weight
in registers and accumulates ``x @ W`` in fp32 on the tensor cores. The weight is read once per ``BM`` rows of ``x``,
so for small M the kernel is still a pass over 0.52 byte per weight; split-K spreads that pass over the SMs and the
programs fold their fp32 partials atomically into one zeroed buffer, the last one per tile writing the output
(:func:`~awqkit.kernels.common.split_k_epilogue`): one launch per layer.

Dequantization forms (``DQ``):

* 0: ``w = (q - z) * s`` per weight in fp32, rounded once to the activation dtype (any ``BK``);
* 1: ``f = 1 + q/16`` from the bits as fp32, converted to the activation dtype; scale and zero applied once per group
  to the dot's result: ``x (q - z) s`` summed over a group ``= s (16 (x @ f) - (16 + z) sum x)`` (``BK = G``);
* 2: as 1, but ``f`` is built directly as bf16x2 / f16x2 pairs (one rotate + one LOP3 per two weights,
  :func:`~awqkit.kernels.common.unpack_tile_pairs`).

``SWAP`` computes ``(W^T x^T)^T``: the unpacked tile becomes the left operand, which Hopper's wgmma takes from
registers (and its M = ``BN`` >= 64 while ``BM`` may be 16). ``PREFETCH = 1, 2`` software-pipelines through
registers: the packed tile, activations, scales and zeros of step ``i + 1`` (and ``i + 2``) are loaded before step
``i`` is unpacked and multiplied (Triton's own cp.async pipelining re-reads a staged packed tile once per unpacked
element). ``PREFETCH = 0`` leaves the loop to Triton's pipeliner (``STAGES``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import (
    interpreting,
    nibble_value,
    nibbles_minus_zeros,
    split_k_epilogue,
    split_workspace,
    unpack_row,
    unpack_tile,
    unpack_tile_one_plus,
    unpack_tile_pairs,
)


@triton.jit
def dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8,
                 G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """Rows ``k0 .. k0+BK`` of ``W`` for columns ``offs_n`` as ``[BK, BN]`` in ``dtype`` (fp32 math, one rounding)."""
    qw = tl.load(qw_ptr + (k0 + offs_k)[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
    qz, s = _zs_tile(qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G, BK)
    return _dq0(qw, qz, s, BN, dtype)


@triton.jit
def _zs_tile(qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G: tl.constexpr, BK: tl.constexpr):
    """Packed zeros and scales for rows ``k0 .. k0+BK``: one row ``[1, .]`` if the tile lies in one group, else
    one per row (gathered; G rows share each, cache hits)."""
    if BK <= G:
        g = k0 // G
        qz = tl.load(qz_ptr + g * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
        s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    else:
        g = (k0 + offs_k) // G
        qz = tl.load(qz_ptr + g[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    return qz, s


@triton.jit
def _dq0(qw, qz, s, BN: tl.constexpr, dtype: tl.constexpr):
    return (nibbles_minus_zeros(unpack_tile(qw, BN), unpack_tile(qz, BN)) * s.to(tl.float32)).to(dtype)


@triton.jit
def _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k0, k_lim, offs_k, offs_n, offs_n8, mask_m, mask_n, mask_n8, N, N8, K,
               G: tl.constexpr, BK: tl.constexpr, DQ: tl.constexpr, SWAP: tl.constexpr):  # fmt: skip
    """Everything step ``k0`` reads from memory: x tile, packed weights, packed zeros, scales. Rows at or past
    ``k_lim`` are masked off (the prefetch past a slice's end); zeros and scales are tiny, so their row is clamped
    into range instead. For ``DQ > 0`` zeros come as ``[BN8]`` and scales as ``[BN, 1]`` columns when ``SWAP`` (the
    accumulator is ``[BN, BM]``), ``[1, BN]`` rows otherwise."""
    in_k = (k0 + offs_k) < k_lim
    a = tl.load(x_ptrs + k0, mask=mask_m[:, None] & in_k[None, :], other=0.0)
    qw = tl.load(qw_ptr + (k0 + offs_k)[:, None] * N8 + offs_n8[None, :], mask=in_k[:, None] & mask_n8[None, :],
                 other=0)  # fmt: skip
    kc = tl.minimum(k0, K - BK)
    if DQ == 0:
        qz, s = _zs_tile(qz_ptr, s_ptr, kc, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G, BK)
    else:
        g = kc // G
        qz = tl.load(qz_ptr + g * N8 + offs_n8, mask=mask_n8, other=0)  # [BN8]
        if SWAP:
            s = tl.load(s_ptr + g * N + offs_n[:, None], mask=mask_n[:, None], other=0.0)
        else:
            s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    return a, qw, qz, s


@triton.jit
def _mma_step(acc, a, qw, qz, s, BN: tl.constexpr, DQ: tl.constexpr, SWAP: tl.constexpr, DOT_F32: tl.constexpr,
              ASM: tl.constexpr):  # fmt: skip
    dtype: tl.constexpr = a.dtype
    if DQ == 0:  # w = (q - z) * s rounded once to the activation dtype
        w = _dq0(qw, qz, s, BN, dtype)
        if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 holds them exactly
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP:
            acc = tl.dot(tl.trans(w), tl.trans(a), acc)
        else:
            acc = tl.dot(a, w, acc)
    else:  # f = 1 + q/16 exact in bf16/fp16; x (q - z) s summed over the group = s (16 (x @ f) - (16 + z) sum x)
        if DQ == 1:
            f = unpack_tile_one_plus(qw, BN, ASM).to(dtype)
        else:
            f = unpack_tile_pairs(qw, BN, dtype == tl.bfloat16)
        z16 = 16.0 + nibble_value(unpack_row(qz, BN))  # [BN]
        sx = tl.sum(a.to(tl.float32), axis=1)  # [BM]
        if DOT_F32:
            a = a.to(tl.float32)
            f = f.to(tl.float32)
        s = s.to(tl.float32)
        if SWAP:
            d = tl.dot(tl.trans(f), tl.trans(a))  # [BN, BM]
            acc += s * (16.0 * d - z16[:, None] * sx[None, :])
        else:
            d = tl.dot(a, f)  # [BM, BN]
            acc += s * (16.0 * d - z16[None, :] * sx[:, None])
    return acc


@triton.jit(do_not_specialize=["M", "n_split"])  # see gemv.py: no recompile per M; N8 passed for its divisibility
def _gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, k_split, n_split, stride_xm, stride_om,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    STAGES: tl.constexpr, SWAP: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr, DQ: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr,
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

    if SWAP:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    if PREFETCH == 1:  # register double buffer: loads of step i + 1 are in flight while step i computes
        a, qw, qz, s = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k_begin, k_end, offs_k, offs_n, offs_n8, mask_m,
                                  mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
        for k0 in tl.range(k_begin, k_end, BK, num_stages=1):
            a2, qw2, qz2, s2 = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k0 + BK, k_end, offs_k, offs_n, offs_n8,
                                          mask_m, mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
            acc = _mma_step(acc, a, qw, qz, s, BN, DQ, SWAP, DOT_F32, ASM)
            a, qw, qz, s = a2, qw2, qz2, s2
    elif PREFETCH == 2:  # two steps ahead
        a, qw, qz, s = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k_begin, k_end, offs_k, offs_n, offs_n8, mask_m,
                                  mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
        a2, qw2, qz2, s2 = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k_begin + BK, k_end, offs_k, offs_n, offs_n8,
                                      mask_m, mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
        for k0 in tl.range(k_begin, k_end, BK, num_stages=1):
            a3, qw3, qz3, s3 = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k0 + 2 * BK, k_end, offs_k, offs_n,
                                          offs_n8, mask_m, mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
            acc = _mma_step(acc, a, qw, qz, s, BN, DQ, SWAP, DOT_F32, ASM)
            a, qw, qz, s = a2, qw2, qz2, s2
            a2, qw2, qz2, s2 = a3, qw3, qz3, s3
    else:
        for k0 in tl.range(k_begin, k_end, BK, num_stages=STAGES):
            a, qw, qz, s = _load_step(x_ptrs, qw_ptr, qz_ptr, s_ptr, k0, k_end, offs_k, offs_n, offs_n8, mask_m,
                                      mask_n, mask_n8, N, N8, K, G, BK, DQ, SWAP)  # fmt: skip
            acc = _mma_step(acc, a, qw, qz, s, BN, DQ, SWAP, DOT_F32, ASM)
    if SWAP:
        acc = tl.trans(acc)

    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        b = 0.0
    if SPLIT:
        split_k_epilogue(acc, ws_ptr + offs_m[:, None] * N + offs_n[None, :], cnt_ptr, pid, n_split, out_ptrs, b,
                         mask, HAS_BIAS, ASM)  # fmt: skip
    else:
        if HAS_BIAS:
            acc += b
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


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
    prefetch: int = 0,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` with the fused dequantize-and-dot kernel; ``split_k`` slices of ``block_k`` tiles.

    ``block_k`` must divide ``group_size`` or be a multiple of it. ``dq=1`` or ``2`` (the ``1 + q/16`` forms, fewer
    instructions per weight) force ``block_k = group_size``.
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
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if split_k > 1:
        ws, cnt = split_workspace(x.device, m * n, tiles)
    else:
        ws, cnt = out, out  # unused
    _gemm_kernel[(tiles, split_k)](
        x, qweight, qzeros, scales, out, bias if bias is not None else out, ws, cnt,
        m, n, n // 8, k, k_split, split_k, x.stride(0), out.stride(0),
        G=group_size, BM=block_m, BN=block_n, BK=block_k, GROUP_M=group_m, STAGES=stages, SWAP=swap,
        SPLIT=split_k > 1, HAS_BIAS=bias is not None, DOT_F32=interpreting(), DQ=dq, PREFETCH=int(prefetch),
        ASM=not interpreting(), num_warps=num_warps, num_stages=1 if prefetch else stages,
    )  # fmt: skip
    return out
