"""Decode path: split-K GEMV on CUDA cores for the smallest M (1 … 4 rows), one launch per layer.

At M = 1 the layer is a pass over the packed weight (0.52 byte per weight at group 128) and nothing else, so the
kernel is built to keep the memory system busy while spending as few instructions per weight as possible:

* each program owns ``BN`` output columns and a ``k_split`` slice of the input rows (split-K, down to parts of one
  group), so even a narrow layer (N = 3584) gives every SM many independent row streams;
* inside a program the packed rows are read as ``[KR, BN / 8]`` tiles, one 16-byte (``VEC`` words) load per thread
  and row step; every thread keeps its own rows and columns for the whole slice, so the sum over K stays in its
  registers until one cross-thread reduction at the end (``KR > 1`` splits K over the lanes and warps too);
* ``f = 1 + q/16`` is built straight from the bits (one funnel shift, one LOP3) and scale and zero are factored out
  per group: ``sum_k x_k (q_k - z) s = s (16 sum_k x_k f_k - (16 + z) sum_k x_k)`` — one FFMA per weight and row;
* with split-K the programs add their fp32 partials atomically into a zeroed buffer, and the last program of each
  column block writes the output (see :func:`~awqkit.kernels.common.split_k_epilogue`): one launch, nothing written
  to memory but the sums (the former workspace + reduce kernel cost a second launch and 8 bytes per output per slice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import (
    interpreting,
    nibble_value,
    split_k_epilogue,
    split_workspace,
    unpack_tile,
    unpack_tile_one_plus,
)


@triton.jit
def _chunk(x_ptr, qw_ptr, qz_ptr, s_ptr, g0, offs_n, offs_n8, mask_n, mask_n8, kr, N, N8, stride_xm,
           BM: tl.constexpr, BN: tl.constexpr, KR: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr,
           GCH: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Rows ``g0 .. g0 + GCH`` (inside one group) for every row of x: ``s (16 sum_k x_k f_k - (16 + z) sum_k x_k)``
    per thread row slot, as four ``[KR, BN]`` tensors (rows of x past ``BM`` come back as zeros)."""
    grp = g0 // G
    # zeros and scales: loaded now (their latency hides behind the rows), unpacked after the rows (registers);
    # as [KR, .] tiles shaped like the weight tile, every row slot reading the same row, so that they come out
    # in the accumulators' register layout
    qz = tl.load(qz_ptr + grp * N8 + kr[:, None] * 0 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
    s = tl.load(s_ptr + grp * N + kr[:, None] * 0 + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    # per thread row slot: d = sum_k x_k (1 + q_k / 16), sx = sum_k x_k
    d0 = tl.zeros([KR, BN], dtype=tl.float32)
    d1 = tl.zeros([KR, BN], dtype=tl.float32)
    d2 = tl.zeros([KR, BN], dtype=tl.float32)
    d3 = tl.zeros([KR, BN], dtype=tl.float32)
    sx0 = tl.zeros([KR], dtype=tl.float32)
    sx1 = tl.zeros([KR], dtype=tl.float32)
    sx2 = tl.zeros([KR], dtype=tl.float32)
    sx3 = tl.zeros([KR], dtype=tl.float32)
    for r0 in range(g0, g0 + GCH, KR * ROWS):
        for r in tl.static_range(ROWS):
            rows = r0 + r * KR + kr
            w = tl.load(qw_ptr + rows[:, None] * N8 + offs_n8[None, :], mask=mask_n8[None, :], other=0)
            f = unpack_tile_one_plus(w, BN, ASM)
            xv = tl.load(x_ptr + rows).to(tl.float32)
            d0 += f * xv[:, None]
            sx0 += xv
            if BM > 1:
                xv = tl.load(x_ptr + stride_xm + rows).to(tl.float32)
                d1 += f * xv[:, None]
                sx1 += xv
            if BM > 2:
                xv = tl.load(x_ptr + 2 * stride_xm + rows).to(tl.float32)
                d2 += f * xv[:, None]
                sx2 += xv
            if BM > 3:
                xv = tl.load(x_ptr + 3 * stride_xm + rows).to(tl.float32)
                d3 += f * xv[:, None]
                sx3 += xv
    z16 = 16.0 + nibble_value(unpack_tile(qz, BN))
    s16 = 16.0 * s.to(tl.float32)
    sz = s16 * z16 * 0.0625  # s (16 + z)
    return (s16 * d0 - sz * sx0[:, None], s16 * d1 - sz * sx1[:, None], s16 * d2 - sz * sx2[:, None],
            s16 * d3 - sz * sx3[:, None])  # fmt: skip


# M and the split count change with the batch and the layer: not specialising on them avoids recompiles.
# N8 = N / 8 is passed (not computed) so Triton sees its divisibility by 16 and issues 16-byte weight loads.
@triton.jit(do_not_specialize=["M", "n_split"])
def _gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, N8, K, k_split, n_split, stride_xm, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, KR: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, GCH: tl.constexpr,
    ONE_CHUNK: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """A program owns ``BN`` columns and ``k_split`` rows; ``ROWS`` steps of ``KR`` rows are loaded before use.
    ``ONE_CHUNK``: the program's rows lie inside one group (``k_split <= G``): no outer loop, no second set of
    accumulators (96 instead of ~170 registers at M = 1)."""
    BN8: tl.constexpr = BN // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8
    kr = tl.arange(0, KR)
    k_begin = pid_k * k_split

    if ONE_CHUNK:
        acc0, acc1, acc2, acc3 = _chunk(x_ptr, qw_ptr, qz_ptr, s_ptr, k_begin, offs_n, offs_n8, mask_n, mask_n8, kr,
                                        N, N8, stride_xm, BM, BN, KR, ROWS, G, GCH, ASM)  # fmt: skip
    else:
        k_end = tl.minimum(k_begin + k_split, K)
        acc0 = tl.zeros([KR, BN], dtype=tl.float32)
        acc1 = tl.zeros([KR, BN], dtype=tl.float32)
        acc2 = tl.zeros([KR, BN], dtype=tl.float32)
        acc3 = tl.zeros([KR, BN], dtype=tl.float32)
        for g0 in range(k_begin, k_end, GCH):
            c0, c1, c2, c3 = _chunk(x_ptr, qw_ptr, qz_ptr, s_ptr, g0, offs_n, offs_n8, mask_n, mask_n8, kr, N, N8,
                                    stride_xm, BM, BN, KR, ROWS, G, GCH, ASM)  # fmt: skip
            acc0 += c0
            if BM > 1:
                acc1 += c1
            if BM > 2:
                acc2 += c2
            if BM > 3:
                acc3 += c3

    # one reduction over the KR row slots (lanes / warps) per program
    y = tl.sum(acc0, axis=0)
    if BM > 2:  # [BN, 4], column j = row j of x
        y = tl.join(tl.join(y, tl.sum(acc2, axis=0)), tl.join(tl.sum(acc1, axis=0), tl.sum(acc3, axis=0)))
        y = tl.reshape(y, [BN, 4])
    elif BM > 1:
        y = tl.join(y, tl.sum(acc1, axis=0))  # [BN, 2]
    if BM > 1:
        ym = tl.arange(0, 4 if BM > 2 else 2)  # rows >= M are masked
        off = offs_n[:, None] + ym[None, :] * N
        msk = mask_n[:, None] & (ym < M)[None, :]
        outp = out_ptr + offs_n[:, None] + ym[None, :] * stride_om
        bcol = offs_n[:, None]
    else:
        off = offs_n
        msk = mask_n
        outp = out_ptr + offs_n
        bcol = offs_n
    if HAS_BIAS:
        b = tl.load(bias_ptr + bcol, mask=mask_n if BM == 1 else mask_n[:, None], other=0.0).to(tl.float32)
    else:
        b = 0.0
    if SPLIT:
        split_k_epilogue(y, ws_ptr + off, cnt_ptr, pid_n, n_split, outp, b, msk, HAS_BIAS, ASM)
    else:
        if HAS_BIAS:
            y += b
        tl.store(outp, y.to(out_ptr.dtype.element_ty), mask=msk)


def gemv_plan(k: int, n: int, group_size: int, block_n: int, num_warps: int, vec: int, rows: int, split_k: int):
    """``(kr, rows, k_split, split)``: rows per load step, steps per batch, rows per program, programs along K."""
    kr = max(1, num_warps * 32 * vec * 8 // block_n)  # rows covered by one vec-word load of every thread
    kr = min(kr, group_size)
    rows = max(1, min(rows, group_size // kr))
    step = kr * rows
    groups = k // group_size
    if split_k <= groups:
        k_split = triton.cdiv(groups, max(split_k, 1)) * group_size
    else:  # sub-group slices: group_size / 2**j rows, at least one step
        k_split = group_size
        while k_split > step and (k // k_split) < split_k and (k_split // 2) % step == 0:
            k_split //= 2
    return kr, rows, k_split, triton.cdiv(k, k_split)


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 1024,
    rows: int = 4,
    split_k: int = 1,
    num_warps: int = 2,
    vec: int = 4,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` for ``M <= 4`` on CUDA cores, one launch.

    Each thread loads ``vec`` packed words (``4 * vec`` bytes) per row step; ``block_n / (8 * vec)`` threads span a
    row, so a step covers ``kr = 256 * num_warps * vec / block_n`` rows (split over lanes and warps, reduced once at
    the end). ``split_k`` K slices are whole groups, or equal parts of one group (so narrow layers get enough
    programs), in multiples of ``kr * rows``.
    """
    m, k = x.shape
    n = scales.shape[1]
    assert 1 <= m <= 4, "the GEMV takes at most 4 rows"
    assert x.stride(1) == 1 and k % group_size == 0
    kr, rows, k_split, split = gemv_plan(k, n, group_size, block_n, num_warps, vec, rows, split_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    n_blocks = triton.cdiv(n, block_n)
    if split > 1:
        ws, cnt = split_workspace(x.device, m * n, n_blocks)
    else:
        ws, cnt = out, out  # unused
    _gemv_kernel[(n_blocks, split)](
        x, qweight, qzeros, scales, out, bias if bias is not None else out, ws, cnt,
        m, n, n // 8, k, k_split, split, x.stride(0), out.stride(0),
        BM=m, BN=block_n, KR=kr, ROWS=rows, G=group_size, GCH=min(group_size, k_split),
        ONE_CHUNK=k_split <= group_size, SPLIT=split > 1, HAS_BIAS=bias is not None, ASM=not interpreting(),
        num_warps=num_warps, num_stages=1,
    )  # fmt: skip
    return out
