"""Pieces shared by every kernel: unpacking AutoAWQ's interleaved nibbles, the int→float trick, device facts.

AutoAWQ packs eight 4-bit weights of one input row into an int32: nibble ``i`` holds output column
``8 * j + AWQ_ORDER[i]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``. The kernels never reorder memory; they
repeat each loaded int32 eight times (``tl.interleave``, which stays inside a thread's registers) and shift each copy
by the amount that brings *its* column's nibble down, so the unpacked tile comes out in natural column order and
scales, zeros and outputs need no permutation.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# 0x4B000000 is the float32 2**23: OR-ing a value 0 <= v < 2**23 into its mantissa gives the float 2**23 + v
# exactly. Two integer ops (shift, and|or folded into one LOP3) plus one FADD replace an int→float conversion,
# which runs at a quarter of the FP32 rate on Hopper and would otherwise limit the decode kernels.
MAGIC_F32 = 0x4B000000


@triton.jit
def unpack_tile(packed, BN: tl.constexpr):
    """``[R, BN // 8]`` int32 AutoAWQ words → ``[R, BN]`` int32 ``2**23 + nibble`` bit patterns, natural column order.

    The caller bitcasts to float32 (see :func:`nibbles_minus_zeros`). Column ``c`` of a block of eight sits in nibble
    ``(c % 2) * 4 + c // 2`` (AutoAWQ's reverse order), so its shift is four times that.
    """
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)  # every word now appears 8 times in a row: [R, BN]
    c = tl.arange(0, BN) % 8
    shifts = ((c % 2) * 4 + c // 2) * 4
    return ((p >> shifts[None, :]) & 0xF) | 0x4B000000


@triton.jit
def unpack_tile_one_plus(packed, BN: tl.constexpr, ASM: tl.constexpr):
    """``[R, BN // 8]`` AutoAWQ words → ``[R, BN]`` float32 ``1 + q / 16``, natural column order.

    The nibble is rotated into mantissa bits 19..22 of the float 1.0 (``0x3F800000``): one funnel shift and one
    LOP3 per weight and no float op, against shift, LOP3 and FADD for ``2**23 + q``. The caller recovers
    ``sum_k x_k q_k = 16 * (sum_k x_k f_k - sum_k x_k)``: the subtraction cancels at most ~4 bits of fp32 on
    random signs (the q/16 part is as large as the 1 part), far below the activations' own rounding.
    ``ASM`` uses one ``shf.l.wrap`` + ``lop3`` per element (GPU only; the interpreter runs the plain-Triton form).
    """
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    rot = (19 - 4 * ((c % 2) * 4 + c // 2)) & 31  # never 0: 19, 15, 11, 7, 3, 31, 27, 23
    if ASM:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, 0x00780000, 0x3F800000, 0xEA; }",
            "=r,r,r",
            [p, tl.broadcast_to(rot[None, :], p.shape)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        u = p.to(tl.uint32, bitcast=True)
        r = (u << rot[None, :]) | (u >> (32 - rot)[None, :])
        bits = ((r & 0x00780000) | 0x3F800000).to(tl.int32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nibble_value(bits):
    """The float32 value of a ``2**23 + nibble`` bit pattern from :func:`unpack_tile`: the nibble, exactly."""
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def nibbles_minus_zeros(qw_bits, qz_bits):
    """``q - z`` as exact float32 from the two magic bit patterns of :func:`unpack_tile` (broadcasting)."""
    return qw_bits.to(tl.float32, bitcast=True) - qz_bits.to(tl.float32, bitcast=True)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM; the same default for CPU interpreter runs)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def unpack_row(packed, BN: tl.constexpr):
    """1-D form of :func:`unpack_tile`: ``[BN // 8]`` words → ``[BN]`` ``2**23 + nibble`` bit patterns."""
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    return ((p >> (((c % 2) * 4 + c // 2) * 4)) & 0xF) | 0x4B000000


@triton.jit
def unpack_row_one_plus(packed, BN: tl.constexpr, ASM: tl.constexpr):
    """1-D form of :func:`unpack_tile_one_plus`: ``[BN // 8]`` words → ``[BN]`` float32 ``1 + q / 16``."""
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    rot = (19 - 4 * ((c % 2) * 4 + c // 2)) & 31
    if ASM:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, 0x00780000, 0x3F800000, 0xEA; }",
            "=r,r,r",
            [p, rot],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        u = p.to(tl.uint32, bitcast=True)
        r = (u << rot) | (u >> (32 - rot))
        bits = ((r & 0x00780000) | 0x3F800000).to(tl.int32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def unpack_tile_pairs(packed, BN: tl.constexpr, IS_BF16: tl.constexpr):
    """``[R, BN // 8]`` AutoAWQ words → ``[R, BN]`` ``1 + q / 16`` in bf16 (``IS_BF16``) or fp16, natural order.

    AutoAWQ's nibble order puts columns ``2i`` and ``2i + 1`` of a block of eight in nibbles ``i`` and ``i + 4``,
    16 bits apart: one rotate brings both to the top four mantissa bits of the two 16-bit halves of a word, and one
    LOP3 (mask, OR with two 1.0s) makes a ready bf16x2 / f16x2 pair — one instruction per weight, no conversion,
    for the tensor-core operand (``1 + q/16`` is exact in both types).
    """
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)  # [R, BN / 2]: each word once per column pair
    i = tl.arange(0, BN // 2) % 4
    u = p.to(tl.uint32, bitcast=True)
    if IS_BF16:  # bf16 1.0 = 0x3F80, 7 mantissa bits: q goes to bits 3..6 of each half
        rot = (3 - 4 * i) & 31  # 3, 31, 27, 23
        v = ((u << rot[None, :]) | (u >> (32 - rot)[None, :])) & 0x00780078 | 0x3F803F80
    else:  # fp16 1.0 = 0x3C00, 10 mantissa bits: q goes to bits 6..9
        rot = (6 - 4 * i) & 31  # 6, 2, 30, 26
        v = ((u << rot[None, :]) | (u >> (32 - rot)[None, :])) & 0x03C003C0 | 0x3C003C00
    v = v.to(tl.int32, bitcast=True)
    dt: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    lo = (v & 0xFFFF).to(tl.int16).to(dt, bitcast=True)  # both halves are < 0x8000: no overflow
    hi = (v >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.interleave(lo, hi)


@triton.jit
def gpu_fence(x):
    """``fence.acq_rel.gpu`` in every thread (GPU only), returning ``x``: makes this thread's earlier global writes
    and atomics visible device-wide before a later signal (the split-K counter)."""
    return tl.inline_asm_elementwise(
        "fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1
    )


# Split-K accumulators: every launch that splits K adds its fp32 partials atomically into a zeroed buffer, and the
# program that arrives last at an output tile (per-tile counter) reads the sum back with an atomic exchange against
# zero, writes the output and resets the counter — so the buffers are zero again when the launch ends, and one
# launch does the whole layer (no reduce kernel, no host synchronisation: CUDA-graph safe).
_WORKSPACE: dict = {}
_RETIRED: list = []  # never freed: a captured graph may hold their addresses


def split_workspace(device: torch.device, n_acc: int, n_cnt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 ``[>= n_acc]`` accumulators and int32 ``[>= n_cnt]`` counters for a split-K launch on ``device``.

    Kept per device and reused by every layer (launches on one stream run one after the other, and each leaves the
    buffers zero); grown in powers of two, old buffers kept alive. Created during a CUDA-graph capture, the buffers
    are zeroed by a memset inside the graph and not cached (warm up eagerly first, as one must for Triton anyway).
    Not for concurrent launches on several streams.
    """
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (device.type, index)
    cur = _WORKSPACE.get(key)
    if cur is not None and cur[0].numel() >= n_acc and cur[1].numel() >= n_cnt:
        return cur
    n_acc = next_pow2(max(n_acc, 1 << 12, cur[0].numel() if cur is not None else 0))
    n_cnt = next_pow2(max(n_cnt, 1 << 10, cur[1].numel() if cur is not None else 0))
    acc = torch.zeros(n_acc, dtype=torch.float32, device=device)
    bufs = (acc, torch.zeros(n_cnt, dtype=torch.int32, device=device))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return bufs
    if cur is not None:
        _RETIRED.append(cur)
    _WORKSPACE[key] = bufs
    return bufs


@triton.jit
def split_k_epilogue(acc, ws_ptr, cnt_ptr, tile, n_split, out_ptrs, bias, mask, HAS_BIAS: tl.constexpr,
                     ASM: tl.constexpr):  # fmt: skip
    """Fold one program's fp32 partial ``acc`` into the tile's sum at ``ws_ptr`` (same shape as ``out_ptrs``); the
    last of the ``n_split`` programs of ``tile`` writes ``sum (+ bias)`` to ``out_ptrs`` and leaves zeros behind."""
    tl.atomic_add(ws_ptr, acc, mask=mask, sem="relaxed")
    if ASM:
        gpu_fence(tl.full([1], 0, tl.int32))
    tl.debug_barrier()  # every thread's adds are issued (and fenced) before thread 0 signals
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    if arrived == n_split - 1:
        wsi = ws_ptr.to(tl.pointer_type(tl.int32))  # the interpreter exchanges integers only; same bits
        y = tl.atomic_xchg(wsi, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed").to(tl.float32, bitcast=True)
        if HAS_BIAS:
            y += bias
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
