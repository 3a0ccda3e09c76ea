"""Tensor-core path: fused dequantize + ``tl.dot`` GEMM, with optional split-K, for M from a few rows to prefill.

Each program loads an activation tile ``x [BM, BK]`` and the packed weight tile ``[BK, BN / 8]``, unpacks and
dequantizes the weight in registers (``(q - z) * s`` in fp32, exact up to one rounding to the activation dtype, like
the reference), and accumulates ``x @ W`` in fp32 on the tensor cores. The weight is read once per ``BM`` rows of
``x``, so for small M the kernel is still a pass over 0.52 byte per weight and split-K spreads that pass over the
SMs; the fp32 partials then go through the same workspace + :func:`~awqkit.kernels.gemv.reduce_splits` as the GEMV.

``SWAP`` computes ``(W^T x^T)^T`` instead: the dequantized tile becomes the left operand, which Hopper's wgmma can
take straight from registers (the right operand must sit in shared memory), saving a shared-memory round trip of
the dequantized weight. Which one wins is measured (see docs/kernels-notes.md).

:func:`gemm_planes` (v5, the default for 2 <= M <= 32 and narrow layers up to M = 64) avoids unpacking into a
``[BK, BN]`` tile altogether: AutoAWQ's nibble ``c`` of every word of a ``[BK, BN/8]`` tile is output column
``8 j + (0, 2, 4, 6, 1, 3, 5, 7)[c]``, so the tile is eight "nibble planes", each an elementwise function of the
loaded words, each multiplied by ``x`` in its own small MMA (A operand built in registers with one PRMT, an optional
shift and one LOP3 per two weights; no layout conversion of the unpacked weight, the words tile is staged in shared
memory once, by the cp.async pipeline or, with ``tma=True`` (the default for 2 <= M <= 16), by the tensor memory
accelerator). The planes are interleaved back into natural column order once, in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from awqkit.kernels.common import (
    Partials,
    interpreting,
    nibble_value,
    nibbles_minus_zeros,
    pdl_launch,
    pdl_sync,
    unpack_tile,
    unpack_tile_one_plus,
)
from awqkit.kernels.gemv import finish_split_k


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
    DOT_F32: tl.constexpr, DQ: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
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
    pdl_sync(PDL)
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
    partials: bool = False,
) -> torch.Tensor | Partials:
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
        ASM=not interpreting(), num_warps=num_warps, **pdl_launch(x.device),
    )  # fmt: skip
    return finish_split_k(dest, out, bias, partials)


# --------------------------------------------------------------------------------------------- nibble-plane kernel
@triton.jit
def _nibble_pairs(w, C: tl.constexpr, F16: tl.constexpr):
    """Nibble ``C`` of each word of ``w`` as ``BASE + q`` in bf16 (``F16``: fp16). One PRMT takes the nibble's byte from
    two words (the two elements an asm instance gets: rows ``k``, ``k + 1`` of an A fragment), a shift brings a high
    nibble down, one LOP3 masks both nibbles and ORs the exponent (bf16 0x4300 = 128, fp16 0x6400 = 1024).
    Generated branches: Triton needs the asm text as a literal."""
    if C == 0:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x400; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x400; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 1:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x400; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x400; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 2:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x501; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x501; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 3:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x501; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x501; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 4:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x602; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x602; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 5:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x602; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x602; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 6:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x703; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x703; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    elif C == 7:
        if F16:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x703; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xEA; }"
            )
        else:
            asm: tl.constexpr = (
                "{ .reg .b32 t; prmt.b32 t, $1, $2, 0x703; shr.b32 t, t, 4; "
                "lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
            )
    else:
        asm: tl.constexpr = ""
    if F16:
        f = tl.inline_asm_elementwise(asm, "=r,r,r", [w], dtype=tl.float16, is_pure=True, pack=2)
    else:
        f = tl.inline_asm_elementwise(asm, "=r,r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=2)
    return f


@triton.jit
def _sub_mul_pairs(f, z, s, F16: tl.constexpr):
    """``(f - z) * s`` on bf16x2/f16x2 pairs (``f - z`` is an exact small integer; one rounding in the product)."""
    if F16:
        r = tl.inline_asm_elementwise("{ .reg .b32 t; sub.rn.f16x2 t, $1, $2; mul.rn.f16x2 $0, t, $3; }", "=r,r,r,r",
                                      [f, z, s], dtype=tl.float16, is_pure=True, pack=2)  # fmt: skip
    else:
        r = tl.inline_asm_elementwise("{ .reg .b32 t; sub.rn.bf16x2 t, $1, $2; mul.rn.bf16x2 $0, t, $3; }", "=r,r,r,r",
                                      [f, z, s], dtype=tl.bfloat16, is_pure=True, pack=2)  # fmt: skip
    return r


@triton.jit
def _folded_pair_asm(ws, zp, sp, F16: tl.constexpr):
    """``(q - z) s`` of columns ``8 j + 2 I`` and ``8 j + 2 I + 1`` of each word, given shifted right by ``4 I``
    (``ws``), as two tensors (bf16, or fp16 with ``F16``). AutoAWQ's order puts those columns in nibbles ``I`` and
    ``I + 4``, 16 bits apart, so one LOP3 gives both as ``BASE + q`` halves of one register (the classic unpack;
    BASE: bf16 0x4300 = 128, fp16 0x6400 = 1024); ``zp`` and ``sp`` hold ``BASE + z`` and ``s`` of the two columns
    the same way, so a bf16x2/f16x2 sub and mul finish both (``BASE + q - BASE - z`` is exact, one rounding in the
    product)."""
    if F16:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA; sub.rn.f16x2 t, t, $3; "
            "mul.rn.f16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r,r", [ws, zp, sp], dtype=(tl.float16, tl.float16), is_pure=True, pack=1,
        )  # fmt: skip
    else:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 t, t, $3; "
            "mul.rn.bf16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
            "=h,=h,r,r,r", [ws, zp, sp], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1,
        )  # fmt: skip
    return lo, hi


@triton.jit
def _folded_pairs(w, zw, s_ptr, g, offs_j, mask_j, N, I: tl.constexpr, BASE: tl.constexpr, ASM: tl.constexpr,
                  DOT_F32: tl.constexpr):  # fmt: skip
    """Columns ``8 j + 2 I`` and ``8 j + 2 I + 1`` of the words ``w [BK, BN8]`` as two ``(q - z) s [BK, BN8]`` in the
    activation dtype (fp32 under the interpreter, ``DOT_F32``): ~2 instructions a weight (shift, LOP3, sub, mul
    per pair)."""
    if ASM:
        ACT: tl.constexpr = tl.float16 if BASE == 1024.0 else tl.bfloat16  # the activation dtype
        # BASE + z of both columns by their bits, and both scales as one 32-bit word of the scales row
        zp = ((zw >> (4 * I)) & 0x000F000F) | (0x64006400 if BASE == 1024.0 else 0x43004300)
        if s_ptr.dtype.element_ty == ACT:
            s32 = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            sp = tl.load(s32 + g * (N // 2) + offs_j * 4 + I, mask=mask_j, other=0)
        else:  # scales in the other 16-bit type (AutoAWQ's fp16 with bf16 activations): convert, then pack
            s_row = s_ptr + g * N + offs_j * 8 + 2 * I
            s_lo = tl.load(s_row, mask=mask_j, other=0.0).to(ACT)
            s_hi = tl.load(s_row + 1, mask=mask_j, other=0.0).to(ACT)
            sp = tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [s_lo, s_hi], dtype=tl.int32,
                                           is_pure=True, pack=1)  # fmt: skip
        lo, hi = _folded_pair_asm(w >> (4 * I), zp[None, :], sp[None, :], BASE == 1024.0)
    else:
        lo = _folded_nibble(w, zw, s_ptr, g, offs_j, mask_j, N, I, 2 * I, BASE, DOT_F32)
        hi = _folded_nibble(w, zw, s_ptr, g, offs_j, mask_j, N, I + 4, 2 * I + 1, BASE, DOT_F32)
    return lo, hi


@triton.jit
def _folded_nibble(w, zw, s_ptr, g, offs_j, mask_j, N, C: tl.constexpr, COL: tl.constexpr, BASE: tl.constexpr,
                   DOT_F32: tl.constexpr):  # fmt: skip
    """Plain-Triton ``(q - z) s`` of nibble ``C`` (column ``8 j + COL``), for the interpreter."""
    sc = tl.load(s_ptr + g * N + offs_j * 8 + COL, mask=mask_j, other=0.0).to(tl.float32)
    b = (((w >> (4 * C)) & 0xF) - ((zw >> (4 * C)) & 0xF)[None, :]).to(tl.float32) * sc[None, :]
    b = b.to(tl.bfloat16) if BASE == 128.0 else b.to(tl.float16)  # one rounding, like the GPU's product
    if DOT_F32:
        b = b.to(tl.float32)
    return b


@triton.jit
def _plane(acc, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, C: tl.constexpr, BASE: tl.constexpr,
           ASM: tl.constexpr, DOT_F32: tl.constexpr, FOLD: tl.constexpr):  # fmt: skip
    """One nibble plane: columns ``8 j + COL`` of the tile, ``acc += s (x @ (BASE + q) - (BASE + z) sum x)``.

    ``w [BN8, BK]`` holds whole AutoAWQ words (column block ``j``, input row ``k``); nibble ``C`` of every word is
    output column ``8 j + COL`` with ``COL = (0, 2, 4, 6, 1, 3, 5, 7)[C]``. The plane is an elementwise function of
    ``w``, so the words tile is loaded (and, with ``STAGES >= 2``, staged in shared memory) once and read from
    registers eight times: no interleave, no per-element re-read. On the GPU two words (rows ``k``, ``k + 1`` of
    one thread's A fragment) become one bf16x2/f16x2 register with a PRMT that picks the nibble's byte of each, an
    optional 4-bit shift, and a LOP3 that ORs the exponent of ``BASE`` (128 for bf16, 1024 for fp16: ``BASE + q``
    is exact, the nibble lands in the low mantissa bits).
    """
    COL: tl.constexpr = 2 * (C % 4) + C // 4
    if ASM:
        f = _nibble_pairs(w, C, BASE == 1024.0)
    else:
        f = ((w >> (4 * C)) & 0xF).to(tl.float32) + BASE
        if not DOT_F32:
            f = f.to(xt.dtype)
    zc = ((zw >> (4 * C)) & 0xF).to(tl.float32) + BASE
    sc = tl.load(s_ptr + g * N + offs_j * 8 + COL, mask=mask_j, other=0.0).to(tl.float32)
    if FOLD:  # w = (q - z) s in the activation dtype, MMA accumulates across steps: no per-output correction
        if ASM:
            a = _sub_mul_pairs(f, zc.to(xt.dtype)[:, None], sc.to(xt.dtype)[:, None], BASE == 1024.0)
        else:
            a = (f.to(tl.float32) - zc[:, None]) * sc[:, None]
            if BASE == 128.0:  # one rounding to the activation dtype, like the GPU's bf16x2/f16x2 product
                a = a.to(tl.bfloat16)
            else:
                a = a.to(tl.float16)
            if DOT_F32:
                a = a.to(tl.float32)
        return tl.dot(a, xt, acc)
    d = tl.dot(f, xt)  # [BN8, BM] fp32
    return acc + sc[:, None] * d - (sc * zc)[:, None] * sx[None, :]


@triton.jit
def _program_tile(M, N8, K, k_split, BM: tl.constexpr, BN8: tl.constexpr, BK: tl.constexpr, M_FASTEST: tl.constexpr):
    """This program's row tile, column blocks and K slice: ``(offs_m, offs_j, offs_k, mask_m, mask_j, pid_n,
    pid_k, k_begin, k_end)``. Programs walk N fastest, or M (``M_FASTEST``: the row tiles sharing a words tile
    run together, so its second read hits L2)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if M_FASTEST:
        pid_m = pid % tl.cdiv(M, BM)
        pid_n = pid // tl.cdiv(M, BM)
    else:
        pid_n = pid % tl.cdiv(N8, BN8)
        pid_m = pid // tl.cdiv(N8, BN8)
    offs_j = pid_n * BN8 + tl.arange(0, BN8)
    offs_m = pid_m * BM + tl.arange(0, BM)
    k_begin = pid_k * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    return offs_m, offs_j, tl.arange(0, BK), offs_m < M, offs_j < N8, pid_n, pid_k, k_begin, k_end


@triton.jit(do_not_specialize=["M", "stride_os"])
def _gemm_planes_kernel(
    x_ptr, qw_ptr, w_desc, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, N8, K, k_split, stride_xm, stride_os, stride_om,
    G: tl.constexpr, BM: tl.constexpr, BN8: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr, FOLD: tl.constexpr,
    PDL: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Tensor-core W4A16 for small and medium M as eight nibble-plane products (``(W^T x^T)^T`` per plane).

    A program owns ``BN8`` AutoAWQ column blocks (``8 * BN8`` outputs) and ``BM`` rows of ``x``; per step of ``BK``
    rows (inside one group) it loads the ``[BK, BN8]`` words once and runs eight ``[BN8, BK] @ [BK, BM]`` dots, one
    per nibble position, whose A operand is built in registers (1–1.5 instructions per weight, no layout
    conversion of the unpacked tile). Scale and zero are applied per step and output element (fp32), so the MMA
    sees the exact integers ``BASE + q``. With ``TMA`` the words tile is copied into shared memory by the tensor
    memory accelerator (``w_desc``, ``[BK, BN8]`` boxes, ``STAGES - 1`` steps ahead) instead of by cp.async.
    """
    offs_m, offs_j, offs_k, mask_m, mask_j, pid_n, pid_k, k_begin, k_end = _program_tile(
        M, N8, K, k_split, BM, BN8, BK, False
    )
    BASE: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    acc0 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc1 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc2 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc3 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc4 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc5 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc6 = tl.zeros([BN8, BM], dtype=tl.float32)
    acc7 = tl.zeros([BN8, BM], dtype=tl.float32)
    pdl_sync(PDL)
    for k0 in tl.range(k_begin, k_end, BK, num_stages=STAGES):
        if TMA:
            w = tl.trans(w_desc.load([k0, pid_n * BN8]))
        else:
            w = tl.load(qw_ptr + (k0 + offs_k)[None, :] * N8 + offs_j[:, None], mask=mask_j[:, None], other=0)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None], mask=mask_m[None, :], other=0.0)
        g = k0 // G
        zw = tl.load(qz_ptr + g * N8 + offs_j, mask=mask_j, other=0)
        if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 holds them exactly
            xt = xt.to(tl.float32)
        if FOLD:
            sx = 0.0
        else:
            sx = tl.sum(xt.to(tl.float32), axis=0)
        acc0 = _plane(acc0, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 0, BASE, ASM, DOT_F32, FOLD)
        acc1 = _plane(acc1, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 1, BASE, ASM, DOT_F32, FOLD)
        acc2 = _plane(acc2, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 2, BASE, ASM, DOT_F32, FOLD)
        acc3 = _plane(acc3, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 3, BASE, ASM, DOT_F32, FOLD)
        acc4 = _plane(acc4, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 4, BASE, ASM, DOT_F32, FOLD)
        acc5 = _plane(acc5, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 5, BASE, ASM, DOT_F32, FOLD)
        acc6 = _plane(acc6, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 6, BASE, ASM, DOT_F32, FOLD)
        acc7 = _plane(acc7, w, xt, sx, zw, s_ptr, g, offs_j, mask_j, N, 7, BASE, ASM, DOT_F32, FOLD)

    # interleave the planes back into natural column order (column 8 j + 2 i + h is plane i + 4 h) so that the
    # store is one coalesced [8 BN8, BM] tile: eight strided plane stores measured up to 2.6x slower (runs 7-8)
    t = tl.join(tl.join(tl.join(acc0, acc4), tl.join(acc1, acc5)), tl.join(tl.join(acc2, acc6), tl.join(acc3, acc7)))
    t = tl.reshape(tl.permute(t, (0, 4, 3, 2, 1)), (8 * BN8, BM))  # [j, a, b, h, m] -> rows 8 j + 4 a + 2 b + h
    offs_n = pid_n * (8 * BN8) + tl.arange(0, 8 * BN8)
    mask = (offs_n < N)[:, None] & mask_m[None, :]
    if TO_WORKSPACE:
        tl.store(out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None], t, mask=mask)
    else:
        if HAS_BIAS:
            t += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], t.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "stride_os"])
def _gemm_planes_xa_kernel(
    x_ptr, qw_ptr, w_desc, qz_ptr, s_ptr, out_ptr, bias_ptr,
    M, N, N8, K, k_split, stride_xm, stride_os, stride_om,
    G: tl.constexpr, BM: tl.constexpr, BN8: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, ASM: tl.constexpr,
    PDL: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The tensor-core GEMM for M of a few dozen rows and up: ``x [BM, BK]`` is the MMA's left operand and the
    folded weight ``(q - z) s`` its right one, built as column pairs (:func:`_folded_pairs`) and joined into the
    natural ``[BK, 8 BN8]`` tile (a register renaming: each thread holds the eight columns of its words). So one
    unpack of a words tile serves all ``BM`` rows in one MMA per step (on Hopper, ``BM`` >= 64 with 4 warps a
    warpgroup: wgmma m64n256 for 256 columns, the tile stored once to shared memory with 16-byte stores and read
    by every warpgroup; SASS: ~3.5 instructions a weight, 4 barriers a step). Programs walk M fastest so that the
    row tiles sharing a words tile run together (its second read hits L2)."""
    offs_m, offs_j, offs_k, mask_m, mask_j, pid_n, pid_k, k_begin, k_end = _program_tile(
        M, N8, K, k_split, BM, BN8, BK, True
    )
    BASE: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    acc = tl.zeros([BM, 8 * BN8], dtype=tl.float32)
    pdl_sync(PDL)
    for k0 in tl.range(k_begin, k_end, BK, num_stages=STAGES):
        if TMA:
            w = w_desc.load([k0, pid_n * BN8])
        else:
            w = tl.load(qw_ptr + (k0 + offs_k)[:, None] * N8 + offs_j[None, :], mask=mask_j[None, :], other=0)
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
        if DOT_F32:  # Triton's CPU interpreter multiplies bf16 tiles wrongly; fp32 holds them exactly
            xa = xa.to(tl.float32)
        g = k0 // G
        zw = tl.load(qz_ptr + g * N8 + offs_j, mask=mask_j, other=0)
        l0, h0 = _folded_pairs(w, zw, s_ptr, g, offs_j, mask_j, N, 0, BASE, ASM, DOT_F32)
        l1, h1 = _folded_pairs(w, zw, s_ptr, g, offs_j, mask_j, N, 1, BASE, ASM, DOT_F32)
        l2, h2 = _folded_pairs(w, zw, s_ptr, g, offs_j, mask_j, N, 2, BASE, ASM, DOT_F32)
        l3, h3 = _folded_pairs(w, zw, s_ptr, g, offs_j, mask_j, N, 3, BASE, ASM, DOT_F32)
        # each join appends a last axis: t[k, j, a, b, h] is column 8 j + 2 (2 a + b) + h, so the reshape alone
        # gives the natural [BK, 8 BN8] tile, eight columns a thread (no permute)
        t = tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)), tl.join(tl.join(h0, h2), tl.join(h1, h3)))
        acc = tl.dot(xa, tl.reshape(t, (BK, 8 * BN8)), acc)

    offs_n = pid_n * (8 * BN8) + tl.arange(0, 8 * BN8)
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    if TO_WORKSPACE:
        tl.store(out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def gemm_planes(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_m: int = 16,
    block_n: int = 256,
    block_k: int = 128,
    split_k: int = 1,
    num_warps: int = 4,
    stages: int = 2,
    fold: bool = False,
    maxnreg: int = 0,
    tma: bool = False,
    x_operand: bool = False,
    partials: bool = False,
) -> torch.Tensor | Partials:
    """``x [M, K] @ W (+ bias)`` with the nibble-plane tensor-core kernel (``block_n`` = 8 x column blocks).

    ``block_k`` is capped at the group size (a step must lie inside one group). ``maxnreg`` caps the registers per
    thread (more resident warps per SM at the price of some spills; 0 = the compiler's choice, ~255). ``tma``
    stages the words through the tensor memory accelerator (needs ``N % 32 == 0``: 16-byte rows). ``x_operand``
    makes ``x`` the MMA's left operand and the folded planes its right one (:func:`_gemm_planes_xa_kernel`;
    implies ``fold``)."""
    m, k = x.shape
    n = scales.shape[1]
    block_k = min(block_k, group_size)
    assert group_size % block_k == 0 and k % block_k == 0 and x.stride(1) == 1, (block_k, group_size, k)
    assert fold or not x_operand, "x as the left operand needs the folded (q - z) s planes"
    bn8 = block_n // 8
    steps = k // block_k
    split_k = max(1, min(split_k, steps))
    k_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(k, k_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dest = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n // 8, bn8) * triton.cdiv(m, block_m), split_k)
    assert not tma or n % 32 == 0, "TMA needs 16-byte weight rows (N a multiple of 32)"
    w_desc = qweight
    if tma:
        w_desc = TensorDescriptor.from_tensor(qweight, [block_k, bn8])
    kernel, flags = (_gemm_planes_xa_kernel, {}) if x_operand else (_gemm_planes_kernel, {"FOLD": fold})
    kernel[grid](
        x, qweight, w_desc, qzeros, scales, dest, bias if bias is not None else out,
        m, n, n // 8, k, k_split, x.stride(0), m * n, n,
        G=group_size, BM=block_m, BN8=bn8, BK=block_k, STAGES=stages,
        TO_WORKSPACE=split_k > 1, HAS_BIAS=bias is not None, DOT_F32=interpreting(), ASM=not interpreting(),
        TMA=tma, num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg and not interpreting() else {}),
        **flags, **pdl_launch(x.device),
    )  # fmt: skip
    return finish_split_k(dest, out, bias, partials)
