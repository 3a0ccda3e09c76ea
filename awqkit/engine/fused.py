"""The pointwise pieces of a layer as hand-written Triton kernels (GPU decode and prefill): RMSNorm with the
residual add fused in, rotary embedding with the KV-cache write, and SiLU-and-multiply; the last two also finish the
split-K linear that feeds them.

At decode these are tiny — one row of a few thousand numbers — so their cost is launches and memory round trips.

*RMSNorm.* A norm is one row of a few thousand numbers: its cost is a launch and one trip to memory, not arithmetic.
torch.compile's kernel for it, built with dynamic shapes (the token count changes from call to call), loops over the
row in small blocks and measured 4.2 µs a call on an H100 — 56 calls, 238 µs of a 3.3 ms token for a 7B model. Here
one program takes a whole row (the hidden size is a compile-time constant), so a call is a single load, sum and store.

The arithmetic is Transformers' (and :func:`awqkit.engine.model.rms_norm`'s): the residual sum is rounded to the
activation dtype, normalised in float32, rounded again, then multiplied by the weight.

*Rotary embedding + KV write.* torch.compile turned :func:`awqkit.engine.model.rope_and_cache` into three kernels
(q, k, and the scatter into the cache: ~4.4 µs a layer). One program per (token, head) here does the optional
per-head q/k norm (Qwen3), the rotation in float32 (as the compiled function does), and for a k or v head writes it
straight into the cache row and position.

*Finishing the linears.* At decode the qkv and gate_up matmuls are split along K, and their fp32 partial sums used
to be added up by a reduction kernel of their own (two launches a layer, 112 for a 56-layer model). The rotary and
SiLU kernels here take the unreduced :class:`~awqkit.kernels.common.Partials` instead and add the splits (and the
bias) as they read their inputs, rounding the sum to the activation dtype where the reduction would have: the
results are the unfused path's, up to the order of the fp32 additions. Unsplit outputs (prefill at large batches,
float weights) are the one-split case.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from awqkit.kernels.common import Partials

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model uses the PyTorch functions
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def rope_supported(head_dim: int) -> bool:
    """The rotary kernel loads each half of a head as one block: a power of two."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


if triton is not None:
    from awqkit.kernels.common import pdl_launch, pdl_sync

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        pdl_sync(PDL)
        x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(res_ptr + row + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(res_out_ptr + row + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
        tl.store(out_ptr + row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_splits(row_ptr, bias_ptr, stride_s, S, cols, second, mask, HAS_BIAS: tl.constexpr, SB: tl.constexpr):
        """The float32 totals at ``cols`` and at ``cols + second`` of one token's row of a
        :class:`~awqkit.kernels.common.Partials` (``row_ptr``: the row in split 0), bias included, not yet rounded.

        ``SB`` splits of both column sets are loaded per step, ``2 * SB`` independent loads in flight: one split at
        a time is latency bound (~150 ns a step, see :func:`awqkit.kernels.gemv._reduce_kernel`)."""
        sp = tl.arange(0, SB)
        a = tl.zeros([SB, cols.shape[0]], dtype=tl.float32)
        b = tl.zeros([SB, cols.shape[0]], dtype=tl.float32)
        for s0 in range(0, S, SB):
            at = row_ptr + (s0 + sp)[:, None] * stride_s + cols[None, :]
            m = ((s0 + sp) < S)[:, None] & mask[None, :]
            a += tl.load(at, mask=m, other=0.0).to(tl.float32)
            b += tl.load(at + second, mask=m, other=0.0).to(tl.float32)
        a, b = tl.sum(a, axis=0), tl.sum(b, axis=0)
        if HAS_BIAS:  # added after the splits, as Partials.total does
            a += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            b += tl.load(bias_ptr + second + cols, mask=mask, other=0.0).to(tl.float32)
        return a, b

    @triton.jit
    def _rope_cache_kernel(
        parts_ptr, bias_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, cache_ptr, rows_ptr, pos_ptr, q_out_ptr,
        S, stride_ps, stride_pt, stride_cr, stride_ckv, stride_ch, stride_cp, eps,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
        SB: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per (token, head) of the qkv output's ``H + 2 * HKV`` heads: q heads are rotated into
        ``q_out``, k heads rotated and v heads copied into the cache. Head ``h`` is columns ``[h * D, (h + 1) * D)``
        of the qkv row, summed over the ``S`` splits."""
        t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        half = tl.arange(0, D // 2)
        dtype = q_out_ptr.dtype.element_ty
        pdl_sync(PDL)
        x1, x2 = _sum_splits(
            parts_ptr + t * stride_pt + h * D, bias_ptr + h * D, stride_ps, S, half, D // 2, half < D // 2,
            HAS_BIAS, SB,
        )  # fmt: skip
        # rounded to the activation dtype before any rotary maths, where the unfused path rounds the linear's output
        x1, x2 = x1.to(dtype), x2.to(dtype)
        at = cache_ptr + tl.load(rows_ptr + t) * stride_cr + tl.load(pos_ptr + t) * stride_cp
        if h >= H + HKV:  # a v head: written as it is
            at += stride_ckv + (h - H - HKV) * stride_ch
            tl.store(at + half, x1)
            tl.store(at + D // 2 + half, x2)
        else:
            is_q = h < H
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            if HAS_NORM:  # Qwen3: RMSNorm over each head, rounded to the activation dtype before the weight
                rstd = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / D + eps)
                w_ptr = tl.where(is_q, qn_ptr, kn_ptr)
                f1 = (f1 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + half).to(tl.float32)
                f2 = (f2 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + D // 2 + half).to(tl.float32)
                f1, f2 = f1.to(dtype).to(tl.float32), f2.to(dtype).to(tl.float32)
            # the tables are rounded to the activation dtype first, as the PyTorch function does
            c1 = tl.load(cos_ptr + t * D + half).to(dtype).to(tl.float32)
            c2 = tl.load(cos_ptr + t * D + D // 2 + half).to(dtype).to(tl.float32)
            s1 = tl.load(sin_ptr + t * D + half).to(dtype).to(tl.float32)
            s2 = tl.load(sin_ptr + t * D + D // 2 + half).to(dtype).to(tl.float32)
            y1 = (f1 * c1 - f2 * s1).to(dtype)
            y2 = (f2 * c2 + f1 * s2).to(dtype)
            if is_q:
                dst = q_out_ptr + (t * H + h) * D
                tl.store(dst + half, y1)
                tl.store(dst + D // 2 + half, y2)
            else:
                at += (h - H) * stride_ch
                tl.store(at + half, y1)
                tl.store(at + D // 2 + half, y2)

    @triton.jit
    def _silu_mul_kernel(
        parts_ptr, bias_ptr, out_ptr, S, n_cols, stride_ps, stride_pt,
        HAS_BIAS: tl.constexpr, SB: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """``silu(gate) * up`` for ``BLOCK`` columns of one token: gate is column ``c``, up column ``n_cols + c``."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        pdl_sync(PDL)
        gate, up = _sum_splits(parts_ptr + t * stride_pt, bias_ptr, stride_ps, S, cols, n_cols, mask, HAS_BIAS, SB)
        dtype = out_ptr.dtype.element_ty
        # gate and up are rounded to the activation dtype, as the finished linear output is; the rest is float32
        # with one rounding at the end (the compiled PyTorch function's arithmetic)
        gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + t * n_cols + cols, y.to(dtype), mask=mask)


def _splits_per_step(splits: int, cap: int) -> int:
    """Splits a program loads at once: all of them up to ``cap`` (a power of two, as a block must be)."""
    return max(1, min(cap, 1 << (splits - 1).bit_length()))


def _check_parts(p: Partials, cols: int) -> None:
    if p.parts.dim() != 3 or p.parts.shape[-1] != cols or p.parts.stride(-1) != 1:
        raise ValueError(f"expected parts [S, N, {cols}] with unit column stride, got {tuple(p.parts.shape)}")
    if p.bias is not None and (p.bias.shape != (cols,) or not p.bias.is_contiguous()):
        raise ValueError(f"expected a contiguous bias [{cols}]")


def rope_and_cache(
    qkv: Partials,
    n_heads: int,
    n_kv: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """:func:`awqkit.engine.model.rope_and_cache` of the qkv linear's output, in one launch that also finishes
    the linear: ``qkv.parts [S, N, (n_heads + 2 * n_kv) * D]`` (q, k, v heads in that order) are summed over
    ``S`` (plus ``qkv.bias``) and rounded to the activation dtype (the cache's) as they are read. ``cos, sin
    [N, D]`` float32, ``cache [rows, 2, n_kv, positions, D]``; returns the rotated ``q [N, n_heads, D]``."""
    D = cache.shape[-1]
    _check_parts(qkv, (n_heads + 2 * n_kv) * D)
    if cos.stride(-1) != 1 or not cache.is_contiguous() or cache.shape[2] != n_kv:
        raise ValueError(f"rope_and_cache needs unit-stride tables and a contiguous cache of {n_kv} kv heads")
    if not rope_supported(D):
        raise ValueError(f"head_dim {D} must be a power of two for the fused kernel")
    S, N = qkv.parts.shape[:2]
    q_out = torch.empty((N, n_heads, D), dtype=cache.dtype, device=cache.device)
    if N == 0:
        return q_out
    has_norm, bias = q_norm is not None, qkv.bias
    # with many splits a program reads S x D floats a head: up to 8192 per step, over up to 8 warps
    sb = _splits_per_step(S, max(1, 8192 // D))
    _rope_cache_kernel[(N, n_heads + 2 * n_kv)](
        qkv.parts, bias if bias is not None else qkv.parts, cos.contiguous(), sin.contiguous(),
        q_norm if has_norm else q_out, k_norm if has_norm else q_out, cache, rows, positions, q_out,
        S, qkv.parts.stride(0), qkv.parts.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), eps,
        H=n_heads, HKV=n_kv, D=D, HAS_NORM=has_norm, HAS_BIAS=bias is not None, SB=sb,
        num_warps=max(1, min(8, sb * D // 1024)), **pdl_launch(cache.device),
    )  # fmt: skip
    return q_out


def silu_mul(gate_up: Partials, dtype: torch.dtype) -> torch.Tensor:
    """:func:`awqkit.engine.model.silu_mul` of the gate_up linear's output, finishing the linear as it reads it:
    ``gate_up.parts [S, N, 2 * I]`` (gate columns first) summed over ``S`` (plus ``gate_up.bias``) and rounded to
    ``dtype``; returns ``silu(gate) * up [N, I]`` in ``dtype``."""
    S, N, two_i = gate_up.parts.shape
    _check_parts(gate_up, two_i)
    n_cols = two_i // 2
    out = torch.empty((N, n_cols), dtype=dtype, device=gate_up.parts.device)
    if N == 0:
        return out
    # as kernels.gemv.reduce_splits: every split in one round of loads where possible (two [SB, BLOCK] tiles of
    # <= 4096 floats each), narrower programs while a call has fewer than ~2 per SM (batch 1 included)
    sb = _splits_per_step(S, 64)
    block = max(16, min(1024, 4096 // sb, triton.next_power_of_2(n_cols)))
    while block > 16 and triton.cdiv(n_cols, block) * N < 256:
        block //= 2
    bias = gate_up.bias
    _silu_mul_kernel[(N, triton.cdiv(n_cols, block))](
        gate_up.parts, bias if bias is not None else out, out, S, n_cols,
        gate_up.parts.stride(0), gate_up.parts.stride(1),
        HAS_BIAS=bias is not None, SB=sb, BLOCK=block, num_warps=4, **pdl_launch(out.device),
    )  # fmt: skip
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)`` for ``x [N, hidden]``; with no residual, ``(norm(x), x)``."""
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("add_rms_norm needs rows with unit stride")
    x2 = x.reshape(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    out = torch.empty_like(x2)
    res_out = torch.empty_like(x2) if residual is not None else x2
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(n_rows,)](
        x2, residual.reshape(n_rows, n_cols) if residual is not None else x2, weight, out, res_out, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=max(1, min(16, block // 256)),
        **pdl_launch(x.device),
    )  # fmt: skip
    return out.view(x.shape), res_out.view(x.shape)
