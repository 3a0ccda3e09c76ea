"""The pointwise pieces of a layer as hand-written Triton kernels (GPU decode and prefill): RMSNorm with the
residual add fused in, and rotary embedding with the KV-cache write.

At decode these are tiny — one row of a few thousand numbers — so their cost is launches and memory round trips.

*RMSNorm.* A norm is one row of a few thousand numbers: its cost is a launch and one trip to memory, not arithmetic.
torch.compile's kernel for it, built with dynamic shapes (the token count changes from call to call), loops over the
row in small blocks and measured 4.2 µs a call on an H100 — 56 calls, 238 µs of a 3.3 ms token for a 7B model. Here
one program takes a whole row (the hidden size is a compile-time constant), so a call is a single load, sum and store.

The arithmetic is Transformers' (and :func:`awqkit.engine.model.rms_norm`'s): the residual sum is rounded to the
activation dtype, normalised in float32, rounded again, then multiplied by the weight.

*Rotary embedding + KV write.* torch.compile turned :func:`awqkit.engine.model.rope_and_cache` into three kernels
(q, k, and the scatter into the cache: ~4.4 µs a layer). One program per (token, head) here does the optional
per-head q/k norm (Qwen3), the rotation in float32 (as the compiled function does), and for a kv head writes its key
and value straight into the cache row and position.
"""

from __future__ import annotations

import logging

import torch

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

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
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
    def _rope_cache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, cache_ptr, rows_ptr, pos_ptr, q_out_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cr, stride_ckv, stride_ch, stride_cp, eps,
        H: tl.constexpr, D: tl.constexpr, HAS_NORM: tl.constexpr,
    ):  # fmt: skip
        t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        half = tl.arange(0, D // 2)
        is_q = h < H
        hk = tl.where(is_q, 0, h - H)
        src = tl.where(is_q, q_ptr + t * stride_qt + h * stride_qh, k_ptr + t * stride_kt + hk * stride_kh)
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        dtype = q_ptr.dtype.element_ty
        if HAS_NORM:  # Qwen3: RMSNorm over each head, rounded to the activation dtype before the weight
            rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
            w_ptr = tl.where(is_q, qn_ptr, kn_ptr)
            x1 = (x1 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + half).to(tl.float32)
            x2 = (x2 * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + D // 2 + half).to(tl.float32)
            x1, x2 = x1.to(dtype).to(tl.float32), x2.to(dtype).to(tl.float32)
        # the tables are rounded to the activation dtype first, as the PyTorch function does
        c1 = tl.load(cos_ptr + t * D + half).to(dtype).to(tl.float32)
        c2 = tl.load(cos_ptr + t * D + D // 2 + half).to(dtype).to(tl.float32)
        s1 = tl.load(sin_ptr + t * D + half).to(dtype).to(tl.float32)
        s2 = tl.load(sin_ptr + t * D + D // 2 + half).to(dtype).to(tl.float32)
        y1 = (x1 * c1 - x2 * s1).to(dtype)
        y2 = (x2 * c2 + x1 * s2).to(dtype)
        if is_q:
            dst = q_out_ptr + (t * H + h) * D
            tl.store(dst + half, y1)
            tl.store(dst + D // 2 + half, y2)
        else:
            at = cache_ptr + tl.load(rows_ptr + t) * stride_cr + hk * stride_ch + tl.load(pos_ptr + t) * stride_cp
            tl.store(at + half, y1)
            tl.store(at + D // 2 + half, y2)
            v_src = v_ptr + t * stride_vt + hk * stride_vh
            tl.store(at + stride_ckv + half, tl.load(v_src + half))
            tl.store(at + stride_ckv + D // 2 + half, tl.load(v_src + D // 2 + half))


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """:func:`awqkit.engine.model.rope_and_cache` in one launch: ``q [N, H, D]``, ``k, v [N, Hkv, D]`` (strided views
    of the qkv output are fine), ``cos, sin [N, D]`` float32, ``cache [rows, 2, Hkv, positions, D]``; returns the
    rotated ``q`` (contiguous)."""
    N, H, D = q.shape
    Hkv = k.shape[1]
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos.stride(-1) != 1 or not cache.is_contiguous():
        raise ValueError("rope_and_cache needs unit-stride heads and a contiguous cache")
    if not rope_supported(D):
        raise ValueError(f"head_dim {D} must be a power of two for the fused kernel")
    q_out = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    if N == 0:
        return q_out
    has_norm = q_norm is not None
    _rope_cache_kernel[(N, H + Hkv)](
        q, k, v, cos.contiguous(), sin.contiguous(), q_norm if has_norm else q, k_norm if has_norm else q,
        cache, rows, positions, q_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), eps,
        H=H, D=D, HAS_NORM=has_norm, num_warps=1,
    )  # fmt: skip
    return q_out


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
    )  # fmt: skip
    return out.view(x.shape), res_out.view(x.shape)
