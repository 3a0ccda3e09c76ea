"""Prefill path option: dequantize the weight to the activation dtype, then let cuBLAS multiply.

Reads 0.52 byte and writes 2 bytes per weight, so it costs about ``K * N * 2.52 B / 3 TB/s`` (≈ 115 µs for a
3584×37888 layer) and pays off only once the matrix product itself is long, i.e. at large M, where cuBLAS' GEMM
runs close to the tensor-core peak. The temporary ``[K, N]`` weight is freed after the call.

Chunked variant (``chunk_n > 0``): the weight is dequantized ``chunk_n`` columns at a time into ONE reused
``[K, chunk_n]`` workspace, and cuBLAS writes each chunk's product straight into its column slice of the output. A
chunk small enough to stay in L2 is read back by cuBLAS from L2 instead of DRAM, and rewriting the same workspace
lines lets most of them never reach DRAM at all: the 2 bytes/weight written and read back (~159 µs of the 786 µs at
M = 1024 on the H200) shrink towards the 0.52 byte/weight read.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import pdl_launch, pdl_sync
from awqkit.kernels.gemm import dequant_tile

BLOCK_N = 256  # columns per program of the dequantize kernel; chunk widths are multiples of it
L2_CHUNK = -1  # chunk_n value that asks for :func:`l2_chunk_n`'s width for the device at run time


@triton.jit(do_not_specialize=["nb0"])  # one compile for every chunk offset (its alignment is BN's anyway)
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, N8, K, nb0, W,
                    G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Columns ``nb0 * BN .. nb0 * BN + W`` of the ``[K, N]`` weight into ``w [K, W]`` (row stride ``W``).
    ``nb0 = 0, W = N``: the whole weight. The offset comes as a column block (not a column) so that the loads keep
    their known alignment (``pid * BN8``) whatever value it has."""
    BN8: tl.constexpr = BN // 8
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    cols = pid_n * BN + tl.arange(0, BN)  # within the chunk
    offs_n = (nb0 + pid_n) * BN + tl.arange(0, BN)
    offs_n8 = (nb0 + pid_n) * BN8 + tl.arange(0, BN8)
    mask_n = cols < W  # the chunk ends at or before N, so this also masks N
    mask_n8 = pid_n * BN8 + tl.arange(0, BN8) < W // 8
    k0 = pid_k * BK
    w = dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G, BK, BN,
                     w_ptr.dtype.element_ty)  # fmt: skip
    pdl_sync(PDL)  # the weight was read before the wait (no kernel writes it); `w` may be memory just freed
    tl.store(w_ptr + (k0 + offs_k)[:, None] * W + cols[None, :], w, mask=mask_n[None, :])


def _dequant_into(w, qweight, qzeros, scales, group_size, n0, *, block_k, block_n, num_warps) -> None:
    """Fill the contiguous ``w [K, W]`` with columns ``n0 .. n0+W`` of the dequantized weight."""
    k, width = w.shape
    n = scales.shape[1]
    block_k = min(block_k, k)
    assert k % block_k == 0 and (group_size % block_k == 0 or block_k % group_size == 0)
    assert n0 % block_n == 0 and width % 8 == 0 and n0 + width <= n and w.is_contiguous()
    grid = (k // block_k, triton.cdiv(width, block_n))
    _dequant_kernel[grid](
        qweight, qzeros, scales, w, n, n // 8, k, n0 // block_n, width, G=group_size, BK=block_k, BN=block_n,
        num_warps=num_warps, **pdl_launch(qweight.device),
    )  # fmt: skip


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float16,
    *,
    block_k: int = 32,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
) -> torch.Tensor:
    """Dense ``W [K, N]`` in ``dtype``, equal to :func:`awqkit.formats.gemm.dequantize` up to rounding."""
    w = torch.empty((qweight.shape[0], scales.shape[1]), dtype=dtype, device=qweight.device)
    _dequant_into(w, qweight, qzeros, scales, group_size, 0, block_k=block_k, block_n=block_n, num_warps=num_warps)
    return w


# Share of L2 one chunk's dequantized bytes may take: cuBLAS streams x's K-panels and writes the output tiles
# through the same L2 while it reads the chunk, and H100/H200's L2 is two halves with data of the far half cached
# in the near one too, so a chunk much above a third of the nominal size gets partly evicted before it is read.
L2_SHARE = 3
# Fewest columns a chunk keeps: narrower chunks make GEMMs too small to fill the GPU (M = 1024: 8 x 8 tiles of
# 128x128) and pay a launch and a tile-quantization tail per chunk.
MIN_CHUNK_COLS = 1024


def chunk_for_l2(k: int, n: int, l2_bytes: int, elem_bytes: int = 2, *, share: int = L2_SHARE,
                 min_cols: int = MIN_CHUNK_COLS, align: int = BLOCK_N) -> int:  # fmt: skip
    """Columns per chunk so that a ``[k, chunk]`` weight of ``elem_bytes`` fits ``l2_bytes / share``, rounded down to
    a multiple of ``align`` (the dequantize kernel's column block; a multiple of 8) and at least ``min_cols``; 0 (one
    pass) when the whole weight fits that budget anyway, when one chunk would cover all of ``n``, or without an L2."""
    if l2_bytes <= 0 or k * n * elem_bytes <= l2_bytes // share:
        return 0
    cols = max(min_cols, l2_bytes // share // (k * elem_bytes) // align * align)
    return cols if cols < n else 0


@functools.cache
def _l2_bytes(index: int) -> int:
    return torch.cuda.get_device_properties(index).L2_cache_size


def l2_chunk_n(k: int, n: int, device: torch.device, dtype: torch.dtype) -> int:
    """:func:`chunk_for_l2` for ``device``'s L2 (0 on the CPU, which the interpreter tests run on)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return chunk_for_l2(k, n, _l2_bytes(index), torch.empty((), dtype=dtype).element_size())


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    chunk_n: int = 0,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` as dequantize + cuBLAS (``addmm`` folds the bias into the GEMM's epilogue).

    ``chunk_n``: 0 dequantizes the whole weight at once; > 0 (a multiple of :data:`BLOCK_N`) dequantizes that many
    columns at a time into one reused workspace, each chunk's GEMM writing its slice of the output;
    :data:`L2_CHUNK` takes :func:`l2_chunk_n`'s width. A chunk as wide as N is the one-pass path."""
    k, n = qweight.shape[0], scales.shape[1]
    if chunk_n < 0:
        chunk_n = l2_chunk_n(k, n, x.device, x.dtype)
    if chunk_n <= 0 or chunk_n >= n:
        w = dequantize(qweight, qzeros, scales, group_size, x.dtype)
        if bias is not None:
            return torch.addmm(bias.to(x.dtype), x, w)
        return x @ w
    assert chunk_n % BLOCK_N == 0, f"chunk_n={chunk_n} must be a multiple of {BLOCK_N}"
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    ws = torch.empty(k * chunk_n, dtype=x.dtype, device=x.device)
    bias = None if bias is None else bias.to(x.dtype)
    for c0 in range(0, n, chunk_n):
        cn = min(chunk_n, n - c0)
        w = ws[: k * cn].view(k, cn)  # the last, narrower chunk stays dense (row stride cn)
        _dequant_into(w, qweight, qzeros, scales, group_size, c0, block_k=32, block_n=BLOCK_N, num_warps=4)
        # out's column slice has stride (n, 1): cuBLAS takes it as is (ldc = n), no copy
        if bias is not None:
            torch.addmm(bias[c0 : c0 + cn], x, w, out=out[:, c0 : c0 + cn])
        else:
            torch.mm(x, w, out=out[:, c0 : c0 + cn])
    return out
