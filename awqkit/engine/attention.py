"""Decode attention on the GPU (one new token per row), split over the context: flash-decoding.

SDPA's kernels parallelise over (batch, heads, query blocks); at decode that is ``B * kv_heads`` programs (4 for a
7B Qwen2 at batch 1), each walking the whole context, which measured 9 µs a layer at 512 tokens and 82 µs at 4,096 on
an H100. Here each program takes one kv head of one row and a slice of its context, with the G query heads that share
the kv head as the rows of a small matrix product (each key is read once), and writes a partial result and its
log-sum-exp. The slices are then merged — at decode's usual few slices by the last program of each (row, kv head)
to finish its slice, in the same launch (:func:`~awqkit.kernels.common.arrive_last`: no second kernel's launch and
wait on the critical path of every layer), else by a second kernel. Rows attend to keys
``[max(0, length - window), length)``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model uses SDPA
    triton = None

BLOCK_N = 64
# Most context slices whose merge the partial kernel's last program does itself; beyond, a merge kernel of B * H
# programs does it (one program merging G heads of many slices would be the tail of every layer). Batch 1 of a 7B
# Qwen2 on an H100 takes 8 slices up to 512 tokens of context and 16 up to 1,024.
MAX_FUSED_SPLITS = 16
MAX_MERGE_ELEMENTS = 16384  # and at most this many partial values (S_PAD x G x D) in the last program's registers


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:
    from awqkit.kernels.common import arrival_counters, arrive_last, interpreting, pdl_launch, pdl_sync, reset_counter

    @triton.jit
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, lse_ptr, o_ptr, cnt_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, stride_ob, stride_oh,
        kv_len, chunk, window, scale, splits,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, MERGE: tl.constexpr,
        S_PAD: tl.constexpr, G_M: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Attention of the G query heads of kv head ``h`` of row ``b`` over context slice ``s``: the normalised
        partial output and its log-sum-exp. ``MERGE``: the last of the row's ``splits`` programs of this kv head to
        finish merges them into ``o`` (``S_PAD >= splits``, ``G <= G_M <= G_PAD``, powers of two)."""
        b, h, s = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        pdl_sync(PDL)
        length = tl.minimum(tl.load(len_ptr + b).to(tl.int32), kv_len)
        lo = tl.maximum(s * chunk, length - window)
        hi = tl.minimum(s * chunk + chunk, length)
        offs_g, offs_d, offs_n = tl.arange(0, G_PAD), tl.arange(0, D), tl.arange(0, BLOCK)
        q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_g < G)[:, None], other=0.0)  # fmt: skip
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        for start in range(lo, hi, BLOCK):
            n = start + offs_n
            valid = n < hi
            k = tl.load(k_base + n[:, None] * stride_kl + offs_d[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        hkv = tl.num_programs(1)
        row = (b * hkv + h) * splits + s
        tl.store(out_ptr + (row * G_PAD + offs_g)[:, None] * D + offs_d[None, :], out)
        tl.store(lse_ptr + row * G_PAD + offs_g, tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf")))
        if MERGE:
            if arrive_last(cnt_ptr + b * hkv + h, splits, ASM):
                _merge_kv_head(out_ptr, lse_ptr, o_ptr, b, h, hkv, stride_ob, stride_oh, splits,
                               S_PAD, G, G_M, G_PAD, D)  # fmt: skip
                reset_counter(cnt_ptr + b * hkv + h)

    @triton.jit
    def _merge_kv_head(part_ptr, lse_ptr, o_ptr, b, h, hkv, stride_ob, stride_oh, splits,
                       S_PAD: tl.constexpr, G: tl.constexpr, G_M: tl.constexpr, G_PAD: tl.constexpr,
                       D: tl.constexpr):  # fmt: skip
        """The G query heads of kv head ``h`` of row ``b``: each slice's partial output weighted by its share of the
        softmax mass, ``exp(lse_s - max) / sum``. All ``S_PAD x G x D`` parts in one round of loads (the last
        program's tail is on the layer's critical path: one L2 round trip, not one per head), read from L2 (.cg):
        other SMs wrote them."""
        offs_s, offs_g, offs_d = tl.arange(0, S_PAD), tl.arange(0, G_M), tl.arange(0, D)
        rows = (b * hkv + h) * splits + offs_s
        at = rows[:, None] * G_PAD + offs_g[None, :]  # [S_PAD, G_M]: the padded query rows exist (G_M <= G_PAD)
        live = offs_s < splits
        lse = tl.load(lse_ptr + at, mask=live[:, None], other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(part_ptr + at[:, :, None] * D + offs_d[None, None, :], mask=live[:, None, None], other=0.0,
                        cache_modifier=".cg")  # fmt: skip
        w = tl.exp(lse - tl.max(lse, 0)[None, :])
        w = w / tl.sum(w, 0)[None, :]
        out = tl.sum(parts * w[:, :, None], 0)
        at_o = o_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(at_o, out.to(o_ptr.dtype.element_ty), mask=(offs_g < G)[:, None])

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, o_ptr, stride_ob, stride_oh, splits,
                      S_PAD: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                      PDL: tl.constexpr):  # fmt: skip
        """The slices' merge when the partial kernel does not do it (many slices): one program per (row, query
        head), as :func:`_merge_kv_head` weighs them."""
        b, hq = tl.program_id(0).to(tl.int64), tl.program_id(1)
        pdl_sync(PDL)
        h, g = hq // G, hq % G
        offs_s, offs_d = tl.arange(0, S_PAD), tl.arange(0, D)
        rows = (b * (tl.num_programs(1) // G) + h) * splits + offs_s
        lse = tl.load(lse_ptr + rows * G_PAD + g, mask=offs_s < splits, other=float("-inf"))
        w = tl.exp(lse - tl.max(lse, 0))
        w = w / tl.sum(w, 0)
        parts = tl.load(part_ptr + (rows * G_PAD + g)[:, None] * D + offs_d[None, :], mask=(offs_s < splits)[:, None],
                        other=0.0)  # fmt: skip
        out = tl.sum(parts * w[:, None], 0)
        tl.store(o_ptr + b * stride_ob + hq * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, kv_len: int, sms: int) -> tuple[int, int]:
    """``(splits, chunk)``: enough programs for two per SM, each at least one block of keys."""
    want = max(1, min(triton.cdiv(kv_len, BLOCK_N), triton.cdiv(2 * sms, batch * kv_heads)))
    chunk = triton.cdiv(triton.cdiv(kv_len, want), BLOCK_N) * BLOCK_N
    return triton.cdiv(kv_len, chunk), chunk


_SMS: dict[int, int] = {}


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, window: int | None
) -> torch.Tensor:
    """``q [B, H, D]`` against ``keys/values [B, Hkv, kv_len, D]`` (strided views of the cache) → ``[B, H, D]``.

    Row ``b`` sees keys ``[max(0, lengths[b] - window), min(lengths[b], kv_len))``; ``H`` is a multiple of ``Hkv``.
    """
    B, H, D = q.shape
    Hkv, kv_len = keys.shape[1], keys.shape[2]
    G = H // Hkv
    G_PAD = max(16, triton.next_power_of_2(G))  # tl.dot wants at least 16 rows
    if q.is_cuda:
        device = q.device.index or 0
        sms = _SMS.setdefault(device, torch.cuda.get_device_properties(device).multi_processor_count)
    else:  # Triton's interpreter (tests)
        sms = 4
    splits, chunk = splits_for(B, Hkv, kv_len, sms)
    s_pad = triton.next_power_of_2(splits)
    g_m = triton.next_power_of_2(G)
    merge = splits <= MAX_FUSED_SPLITS and s_pad * g_m * D <= MAX_MERGE_ELEMENTS
    part = torch.empty((B, Hkv, splits, G_PAD, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B, Hkv, splits, G_PAD), dtype=torch.float32, device=q.device)
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    counters = arrival_counters(q.device, B * Hkv) if merge else lse
    _partial_kernel[(B, Hkv, splits)](
        q, keys, values, lengths, part, lse, out, counters,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
        kv_len, chunk, window or kv_len, D**-0.5, splits,
        G=G, G_PAD=G_PAD, D=D, BLOCK=BLOCK_N, MERGE=merge, S_PAD=s_pad, G_M=g_m, ASM=not interpreting(), num_warps=4,
        **pdl_launch(q.device),
    )  # fmt: skip
    if not merge:
        _merge_kernel[(B, H)](
            part, lse, out, out.stride(0), out.stride(1), splits,
            S_PAD=s_pad, G=G, G_PAD=G_PAD, D=D, num_warps=1, **pdl_launch(q.device),
        )  # fmt: skip
    return out


def self_test(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the kernel once against SDPA (also compiles it); on failure the model falls back to SDPA."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        cache = torch.randn(2, 2, 2, 200, 64, device=device, dtype=dtype, generator=g)
        q = torch.randn(2, 8, 64, device=device, dtype=dtype, generator=g)
        lengths = torch.tensor([200, 37], device=device)
        got = decode_attention(q, cache[:, 0, :, :192], cache[:, 1, :, :192], lengths, None).float()
        for b, n in enumerate((192, 37)):
            k, v = (cache[b, i, :, :n].float().repeat_interleave(4, 0) for i in (0, 1))
            ref = F.scaled_dot_product_attention(q[b].float()[:, None], k, v)[:, 0]
            if not torch.allclose(got[b], ref, atol=2e-2, rtol=2e-2):
                raise AssertionError(f"max error {(got[b] - ref).abs().max().item():.3g}")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means: use SDPA
        log.warning("decode attention kernel unusable here (%s); using SDPA", e)
        return False
