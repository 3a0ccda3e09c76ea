"""Decode path: split-K GEMV on CUDA cores for the smallest M (1 … a few rows).

At M = 1 the layer is a pass over the packed weight (0.52 byte per weight at group 128) and nothing else, so the
kernel is built to keep the memory system busy while spending as few instructions per weight as possible:

* each program owns ``BN`` output columns and a ``k_split`` slice of the input rows (split-K), so even a narrow layer
  (N = 3584) gives several programs per SM and a wide one (N = 37888) gives no long tail;
* the rows of a program's chunk lie inside one quantization group, so the group's scale and zero are factored out
  of the inner sum: per weight the work is one funnel shift and one LOP3 (``1 + q/16`` straight from the bits) and
  one FFMA; the scale and zero are applied once per chunk and column (see :func:`_gemv_kernel`). The row length is
  compiled in, so every row's address is an immediate offset from one base (3.7 instructions per weight in SASS);
* each step can ask for the rows ``LOOKAHEAD`` steps ahead to be brought into L2 (``prefetch.global.L2``: no
  registers, nothing waits), so that a step's loads wait for L2 rather than DRAM;
* :func:`_gemv_lanes_kernel` spreads a step's rows over the lanes instead (16-byte loads, fewer K splits), which
  paid at M = 2 on wide layers (now used only where N is not a multiple of 32, see
  :func:`~awqkit.kernels.dispatch.pick_config`);
* with split-K the fp32 partial sums go to a workspace ``[split, M, N]`` and :func:`reduce_splits` adds them,
  the bias, and casts — deterministic, no atomics, no zero-fill, so it is CUDA-graph safe (the workspace size depends
  only on the shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import (
    Partials,
    interpreting,
    nibble_value,
    pair_mult,
    pdl_launch,
    pdl_mode,
    pdl_sync,
    prefetch_l2,
    unpack_row,
    unpack_row_one_plus,
    unpack_row_pairs,
    unpack_tile,
    unpack_tile_one_plus,
)


@triton.jit
def _load_cols(ptrs, mask, EVEN_N: tl.constexpr):
    """A load along the columns: unmasked when no column block is partial (a masked load also zeroes its registers
    first, one instruction per loaded word)."""
    if EVEN_N:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


# M and the workspace stride change with every batch size: not specialising on them avoids a recompile per M.
# N8 = N / 8 is passed (not computed) so Triton sees its divisibility by 16 and issues 16-byte weight loads.
@triton.jit(do_not_specialize=["M", "stride_os"])
def _gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, N8, K, k_split, stride_xm, stride_os, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, GCH: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, ROW_WORDS: tl.constexpr,
    EVEN_N: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LOOKAHEAD: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """Row-streaming GEMV: a program owns ``BN`` columns and ``k_split`` rows of ``W``.

    The weight is walked one row at a time as a 1-D ``[BN / 8]`` vector, so every thread keeps its own columns for
    the whole K range and the sum over K never leaves the thread: no shuffles, no shared memory, no barriers (a 2-D
    ``[BK, BN]`` tile makes Triton spread K over lanes and warps and reduce across them every step — measured 3x
    slower). ``ROWS`` rows are loaded before any is used, to keep bytes in flight. Scale and zero are factored out
    per chunk of one group (``GCH`` rows: the group, or the part of it this program owns):
    ``sum_k x_k (q_k - z) s = s (16 sum_k x_k f_k - (16 + z) sum_k x_k)`` with ``f = 1 + q/16`` built from the bits,
    i.e. one funnel shift, one LOP3 and one FFMA per weight. Up to four activation rows (``BM <= 4``) share each
    unpacked weight. With programmatic dependent launch (``PDL``) the program asks for its first ``PREFETCH`` weight
    rows to be brought into L2 while the previous kernel still runs, then waits for it (:func:`pdl_sync`).
    ``PAIRS`` unpacks with :func:`~awqkit.kernels.common.unpack_row_pairs` (1.5 instead of 2 instructions per
    weight; ``f = 1 + q / m`` with a per-column ``m``, and ``16`` above becomes that ``m``).
    """
    BN8: tl.constexpr = BN // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8
    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)

    # ROW_WORDS = N / 8 as a compile-time constant makes every row's address base + immediate offset (SASS: 3.7
    # instead of 4.3 instructions per weight at one word per thread); 0 = read N8 at run time
    row_words = N8
    if ROW_WORDS > 0:
        row_words = ROW_WORDS
    cols_in = tl.minimum(offs_n8, N8 - 1)  # in-bounds columns for prefetches (they have no mask)
    if PREFETCH > 0:  # the weight is no kernel's output: safe to touch before the wait
        first = qw_ptr + k_begin * row_words + cols_in
        for r in tl.static_range(PREFETCH):
            prefetch_l2(first + r * row_words)
    pdl_sync(PDL)
    acc0 = tl.zeros([BN], dtype=tl.float32)
    acc1 = tl.zeros([BN], dtype=tl.float32)
    acc2 = tl.zeros([BN], dtype=tl.float32)
    acc3 = tl.zeros([BN], dtype=tl.float32)
    mult = pair_mult(BN) if PAIRS else 16.0  # sum_k x_k q_k = mult (d - sx)
    for g0 in range(k_begin, k_end, GCH):
        grp = g0 // G
        zm = mult + nibble_value(unpack_row(_load_cols(qz_ptr + grp * N8 + offs_n8, mask_n8, EVEN_N), BN))
        s = _load_cols(s_ptr + grp * N + offs_n, mask_n, EVEN_N).to(tl.float32)
        # chunk partials: d = sum_k x_k (1 + q_k / mult), sx = sum_k x_k
        d0 = tl.zeros([BN], dtype=tl.float32)
        d1 = tl.zeros([BN], dtype=tl.float32)
        d2 = tl.zeros([BN], dtype=tl.float32)
        d3 = tl.zeros([BN], dtype=tl.float32)
        sx0 = 0.0
        sx1 = 0.0
        sx2 = 0.0
        sx3 = 0.0
        for r0 in range(g0, g0 + GCH, ROWS):
            # one 64-bit base per step; rows are base + r * row_words (an immediate offset when it is a constant)
            w_row = qw_ptr + r0 * row_words + offs_n8
            x_row = x_ptr + r0
            # rows LOOKAHEAD steps ahead into L2 (the loads of that step then wait for L2, not DRAM); none past
            # the slice: those rows are another program's, and the extra requests cost more than they hide
            if LOOKAHEAD > 0 and r0 + LOOKAHEAD * ROWS < k_end:
                pf_row = qw_ptr + (r0 + LOOKAHEAD * ROWS) * row_words + cols_in
                for r in tl.static_range(ROWS):
                    prefetch_l2(pf_row + r * row_words)
            for r in tl.static_range(ROWS):
                w = _load_cols(w_row + r * row_words, mask_n8, EVEN_N)
                f = unpack_row_pairs(w, BN, ASM) if PAIRS else unpack_row_one_plus(w, BN, ASM)
                xv = tl.load(x_row + r).to(tl.float32)
                d0 += f * xv
                sx0 += xv
                if BM > 1:
                    xv = tl.load(x_row + stride_xm + r).to(tl.float32)
                    d1 += f * xv
                    sx1 += xv
                if BM > 2:
                    xv = tl.load(x_row + 2 * stride_xm + r).to(tl.float32)
                    d2 += f * xv
                    sx2 += xv
                if BM > 3:
                    xv = tl.load(x_row + 3 * stride_xm + r).to(tl.float32)
                    d3 += f * xv
                    sx3 += xv
        acc0 += s * (mult * d0 - zm * sx0)
        if BM > 1:
            acc1 += s * (mult * d1 - zm * sx1)
        if BM > 2:
            acc2 += s * (mult * d2 - zm * sx2)
        if BM > 3:
            acc3 += s * (mult * d3 - zm * sx3)

    _store_rows(out_ptr, bias_ptr, offs_n, mask_n, pid_k, stride_os, stride_om, acc0, acc1, acc2, acc3,
                BM, TO_WORKSPACE, HAS_BIAS)  # fmt: skip


# M and the workspace stride vary per call: not specialised (see _gemv_kernel)
@triton.jit(do_not_specialize=["M", "stride_os"])
def _gemv_lanes_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, N8, K, k_split, stride_xm, stride_os, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, KL: tl.constexpr, ROWS: tl.constexpr, G: tl.constexpr, GCH: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, ROW_WORDS: tl.constexpr,
    EVEN_N: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, LOOKAHEAD: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Lane-split GEMV: a one-warp program streams ``[KL, BN / 8]`` word tiles, ``KL`` rows spread over lanes.

    With ``BN / 8 = 8 x 32 / KL`` words per row every thread loads 16 bytes (four words, 32 weights) per step,
    four times what the row kernel's threads load: the same bytes in flight need a quarter of the warps, so the
    layer needs a quarter of the K splits, and the split-K partials (``split x N`` fp32) shrink by as much. Each
    thread sums its own rows elementwise into ``[KL, BN]`` accumulators, scale and zero are applied per lane when a
    group chunk closes (:func:`_lanes_chunk`), and the lanes of a column are added once, at the end (``tl.sum``
    over ``KL``: shuffles inside the warp). 3.25 instructions per weight in the loop (SASS, sm_90). Measured
    (session 7): the fastest at M = 2 on wide layers; at M = 1 a tie with the row kernel at best (ptxas places the
    next step's loads, written first, late in the loop body, so the L2 look-ahead does the latency hiding).
    """
    tl.static_assert(ROWS == 4, "the pipeline below is written for four word tiles per step")
    BN8: tl.constexpr = BN // 8
    STEP: tl.constexpr = KL * ROWS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    lane_k = tl.arange(0, KL)
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8
    mask_w = (lane_k[:, None] < KL) & mask_n8[None, :]
    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)

    row_words = N8
    if ROW_WORDS > 0:
        row_words = ROW_WORDS
    w_tile = lane_k[:, None] * row_words + offs_n8[None, :]
    z_tile = offs_n8[None, :] + 0 * lane_k[:, None]  # a zeros row in the word tile's layout (every lane the same)
    s_tile = offs_n[None, :] + 0 * lane_k[:, None]
    # one prefetch per thread and row: its four words share a 16-byte, hence one 128-byte, line
    pf_tile = lane_k[:, None] * row_words + tl.minimum(pid_n * BN8 + 4 * tl.arange(0, BN8 // 4), N8 - 1)[None, :]
    step_words = KL * row_words
    first = qw_ptr + k_begin * row_words + w_tile
    if PREFETCH > 0:  # the weight is no kernel's output: safe to touch before the wait
        for r in tl.static_range(PREFETCH):
            prefetch_l2(first + r * step_words)
    pdl_sync(PDL)
    # software pipeline: the ROWS word tiles of the next step are loaded while this step's are unpacked
    t0 = _load_cols(first, mask_w, EVEN_N)
    t1 = _load_cols(first + step_words, mask_w, EVEN_N)
    t2 = _load_cols(first + 2 * step_words, mask_w, EVEN_N)
    t3 = _load_cols(first + 3 * step_words, mask_w, EVEN_N)
    # per lane and column: acc = sum over chunks of s (16 d - (16 + z) sx), summed over the lanes at the end
    acc0 = tl.zeros([KL, BN] if not ONE_CHUNK else [1, BN], dtype=tl.float32)
    acc1 = tl.zeros([KL, BN] if not ONE_CHUNK else [1, BN], dtype=tl.float32)
    d0 = tl.zeros([KL, BN], dtype=tl.float32)
    d1 = tl.zeros([KL, BN], dtype=tl.float32)
    for r0 in range(k_begin, k_end, STEP):
        nxt = qw_ptr + tl.minimum(r0 + STEP, k_end - STEP) * row_words + w_tile  # the last step reloads itself
        x_step = x_ptr + r0 + lane_k[:, None]
        if LOOKAHEAD > 0 and r0 + LOOKAHEAD * STEP < k_end:  # tiles LOOKAHEAD steps ahead into L2 (as above)
            pf = qw_ptr + (r0 + LOOKAHEAD * STEP) * row_words + pf_tile
            for r in tl.static_range(ROWS):
                prefetch_l2(pf + r * step_words)
        u0 = t0
        u1 = t1
        u2 = t2
        u3 = t3
        t0 = _load_cols(nxt, mask_w, EVEN_N)
        t1 = _load_cols(nxt + step_words, mask_w, EVEN_N)
        t2 = _load_cols(nxt + 2 * step_words, mask_w, EVEN_N)
        t3 = _load_cols(nxt + 3 * step_words, mask_w, EVEN_N)
        d0, d1 = _lanes_fma(u0, x_step, stride_xm, d0, d1, BM, BN, ASM)
        d0, d1 = _lanes_fma(u1, x_step + KL, stride_xm, d0, d1, BM, BN, ASM)
        d0, d1 = _lanes_fma(u2, x_step + 2 * KL, stride_xm, d0, d1, BM, BN, ASM)
        d0, d1 = _lanes_fma(u3, x_step + 3 * KL, stride_xm, d0, d1, BM, BN, ASM)
        if not ONE_CHUNK and (r0 + STEP) % GCH == 0:  # end of a group chunk: apply its scale and zero
            c0 = r0 + STEP - GCH
            acc0, acc1 = _lanes_chunk(x_ptr, qz_ptr, s_ptr, c0, stride_xm, N8, N, z_tile, s_tile, mask_w, mask_n,
                                      acc0, acc1, d0, d1, BM, BN, G, GCH, EVEN_N)  # fmt: skip
            d0 = tl.zeros([KL, BN], dtype=tl.float32)
            d1 = tl.zeros([KL, BN], dtype=tl.float32)
    if ONE_CHUNK:  # the slice lies in one group: its scale and zero once, after the loop (fewer live registers)
        acc0, acc1 = _lanes_chunk(x_ptr, qz_ptr, s_ptr, k_begin, stride_xm, N8, N, z_tile, s_tile, mask_w, mask_n,
                                  acc0, acc1, d0, d1, BM, BN, G, GCH, EVEN_N)  # fmt: skip
    y0 = tl.sum(acc0, axis=0)
    y1 = tl.sum(acc1, axis=0)
    _store_rows(out_ptr, bias_ptr, offs_n, mask_n, pid_k, stride_os, stride_om, y0, y1, y1, y1,
                BM, TO_WORKSPACE, HAS_BIAS)  # fmt: skip


@triton.jit
def _lanes_chunk(x_ptr, qz_ptr, s_ptr, c0, stride_xm, N8, N, z_tile, s_tile, mask_w, mask_n, acc0, acc1, d0, d1,
                 BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, GCH: tl.constexpr,
                 EVEN_N: tl.constexpr):  # fmt: skip
    """Close the group chunk of rows ``c0 … c0 + GCH`` of the lane-split GEMV: ``acc += s (16 d - (16 + z) sx)``
    per lane and column, where ``sx`` is the chunk's sum of activations over all lanes (one vector load: summing it
    per step in the loop made Triton load every activation twice, once per layout)."""
    grp = c0 // G
    z16 = 16.0 + nibble_value(unpack_tile(_load_cols(qz_ptr + grp * N8 + z_tile, mask_w, EVEN_N), BN))
    s = _load_cols(s_ptr + grp * N + s_tile, mask_n[None, :], EVEN_N).to(tl.float32)
    rows = c0 + tl.arange(0, GCH)
    # every lane carries 1 / KL of the zero term (exact: KL is a power of two), the lanes are summed at the end
    z16 = z16 * (1.0 / d0.shape[0])
    acc0 += s * (16.0 * d0 - z16 * tl.sum(tl.load(x_ptr + rows).to(tl.float32)))
    if BM > 1:
        acc1 += s * (16.0 * d1 - z16 * tl.sum(tl.load(x_ptr + stride_xm + rows).to(tl.float32)))
    return acc0, acc1


@triton.jit
def _lanes_fma(w, x_ptrs, stride_xm, d0, d1, BM: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr):
    """One ``[KL, BN / 8]`` word tile into the lane-split GEMV's sums ``d = sum_k x_k f_k``, one or two rows."""
    f = unpack_tile_one_plus(w, BN, ASM)
    d0 += f * tl.load(x_ptrs).to(tl.float32)
    if BM > 1:
        d1 += f * tl.load(x_ptrs + stride_xm).to(tl.float32)
    return d0, d1


@triton.jit
def _store_rows(out_ptr, bias_ptr, offs_n, mask_n, pid_k, stride_os, stride_om, acc0, acc1, acc2, acc3,
                BM: tl.constexpr, TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    """Write up to four rows of a GEMV program's sums: fp32 partials into split ``pid_k`` of the workspace, or the
    finished output (plus bias) in its dtype."""
    if TO_WORKSPACE:
        base = out_ptr + pid_k * stride_os + offs_n
        tl.store(base, acc0, mask=mask_n)
        if BM > 1:
            tl.store(base + stride_om, acc1, mask=mask_n)
        if BM > 2:
            tl.store(base + 2 * stride_om, acc2, mask=mask_n)
        if BM > 3:
            tl.store(base + 3 * stride_om, acc3, mask=mask_n)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc0 += b
            acc1 += b
            acc2 += b
            acc3 += b
        base = out_ptr + offs_n
        ty = out_ptr.dtype.element_ty
        tl.store(base, acc0.to(ty), mask=mask_n)
        if BM > 1:
            tl.store(base + stride_om, acc1.to(ty), mask=mask_n)
        if BM > 2:
            tl.store(base + 2 * stride_om, acc2.to(ty), mask=mask_n)
        if BM > 3:
            tl.store(base + 3 * stride_om, acc3.to(ty), mask=mask_n)


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _reduce_kernel(ws_ptr, out_ptr, bias_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, SB: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """``out = sum_s ws[s] (+ bias)`` cast to the output dtype; ``ws`` is ``[SPLIT, M, N]`` fp32, contiguous.

    ``SB`` splits are loaded at once (independent loads in flight): a loop over single splits was latency-bound at
    ~150 ns a step and cost ~17 µs for 112 splits of a 4608-column layer (measured, notes run 3).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    pdl_sync(PDL)
    acc = tl.zeros([SB, BLOCK], dtype=tl.float32)
    for s0 in range(0, SPLIT, SB):
        sp = s0 + tl.arange(0, SB)
        acc += tl.load(ws_ptr + sp[:, None] * MN + offs[None, :], mask=(sp < SPLIT)[:, None] & mask[None, :], other=0.0)
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(ws: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Sum the split-K partials of ``ws [split, M, N]`` into ``out [M, N]`` (plus bias), one launch."""
    split, m, n = ws.shape
    # all splits in one round of loads where possible (up to 128 x 32 = 4096 independent loads per program: ~1 L2
    # round trip instead of split / 32 dependent ones); narrower programs for small outputs so that ~1-2 programs per
    # SM remain (v3: 64 columns x 32 splits per round, 4 rounds for 112 splits). The tile follows M x N, so the order
    # in which an element's splits are added (the tile's layout) can change with the batch: rows agree across batch
    # sizes to rounding, not bit for bit (choosing the tile from N alone measured 10-25 % slower at M = 16-64)
    sb = min(128, triton.next_power_of_2(split))
    block = max(16, min(256, 4096 // sb))
    while block > 16 and triton.cdiv(m * n, block) < 256:
        block //= 2
    _reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, out, bias if bias is not None else out, m * n, n, split,
        HAS_BIAS=bias is not None, SB=sb, BLOCK=block, num_warps=4, **pdl_launch(ws.device),
    )  # fmt: skip
    return out


def finish_split_k(
    dest: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, partials: bool
) -> torch.Tensor | Partials:
    """What a split-K launch returns: ``out`` (the partials in ``dest`` reduced into it when ``dest`` is a
    ``[S, M, N]`` workspace), or with ``partials`` the unreduced :class:`Partials` for a consumer kernel."""
    split = dest is not out
    if partials:
        return Partials(dest, bias) if split else Partials(out[None], None)
    if split:
        reduce_splits(dest, out, bias)
    return out


def k_slices(k: int, group_size: int, split_k: int, granule: int) -> tuple[int, int]:
    """``(rows per K slice, slices)`` for about ``split_k`` slices: whole groups, or equal parts of one group down to
    ``granule`` rows (so that narrow layers get enough programs); no empty slices."""
    groups = k // group_size
    if split_k <= groups:
        k_split = triton.cdiv(groups, max(split_k, 1)) * group_size
    else:  # sub-group slices: group_size / 2**j rows, at least `granule`
        k_split = group_size
        while k_split > granule and k_split % 2 == 0 and (k // k_split) < split_k and (k_split // 2) % granule == 0:
            k_split //= 2
    return k_split, triton.cdiv(k, k_split)


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 1024,
    rows: int = 8,
    split_k: int = 1,
    num_warps: int = 1,
    specialize_n: bool = True,
    lanes: int = 1,
    lookahead: int = 0,
    pairs: bool = False,
    partials: bool = False,
) -> torch.Tensor | Partials:
    """``x [M, K] @ W (+ bias)`` for ``M <= 4`` on CUDA cores (``partials``: see :func:`finish_split_k`).

    ``block_n`` should be ``256 * num_warps`` times 1, 2 or 4 (4-, 8- or 16-byte weight loads per thread; less makes
    Triton replicate work across threads); ``rows`` rows are loaded ahead. ``split_k`` K slices are whole groups, or
    equal parts of one group (so narrow layers get enough programs). ``specialize_n`` compiles the row length in
    (one compilation per layer width; off only to measure what it gains). ``lanes > 1`` runs the lane-split kernel
    (:func:`_gemv_lanes_kernel`): steps of four ``[lanes, block_n / 8]`` word tiles, rows over the lanes (``rows``
    is then ignored); ``lanes * block_n / 8`` should be ``128 * num_warps`` (16-byte loads, every thread its own
    words). ``lookahead``: steps ahead whose weight rows are prefetched into L2 (0: none). ``pairs``: the row
    kernel unpacks two nibbles per rotated word (:func:`~awqkit.kernels.common.unpack_row_pairs`).
    """
    m, k = x.shape
    n = scales.shape[1]
    assert 1 <= m <= (4 if lanes == 1 else 2), "the GEMV takes at most 4 rows (the lane-split kernel 2)"
    rows = min(rows, group_size) if lanes == 1 else 4  # the lane-split kernel keeps four tiles in flight
    step = rows * lanes
    assert x.stride(1) == 1 and group_size % step == 0, (group_size, rows, lanes)
    k_split, split_k = k_slices(k, group_size, split_k, step)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dest = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n, block_n), split_k)
    mode = pdl_mode(x.device)
    if lanes == 1:
        kernel, shape = _gemv_kernel, {"PAIRS": pairs}
    else:
        kernel, shape = _gemv_lanes_kernel, {"KL": lanes, "ONE_CHUNK": k_split <= group_size}
    lookahead = 0 if interpreting() else lookahead  # a prefetch is inline PTX (and only a hint)
    kernel[grid](
        x, qweight, qzeros, scales, dest, bias if bias is not None else out,
        m, n, n // 8, k, k_split, x.stride(0), m * n, n,
        BM=m, BN=block_n, ROWS=rows, G=group_size, GCH=min(group_size, k_split),
        TO_WORKSPACE=split_k > 1, HAS_BIAS=bias is not None, ASM=not interpreting(),
        ROW_WORDS=n // 8 if specialize_n else 0, EVEN_N=n % block_n == 0, num_warps=num_warps,
        PREFETCH=rows if mode == 1 else 0, LOOKAHEAD=lookahead, **shape, **pdl_launch(x.device, mode),
    )  # fmt: skip
    return finish_split_k(dest, out, bias, partials)
