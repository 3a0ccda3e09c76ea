"""Prefill path option: dequantize the whole weight to the activation dtype in one pass, then let cuBLAS multiply.

Reads 0.52 byte and writes 2 bytes per weight, so it costs about ``K * N * 2.52 B / 3 TB/s`` (≈ 115 µs for a
3584×37888 layer) and pays off only once the matrix product itself is long, i.e. at large M, where cuBLAS' GEMM
runs close to the tensor-core peak. The temporary ``[K, N]`` weight is freed after the call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from awqkit.kernels.common import pdl_launch, pdl_sync
from awqkit.kernels.gemm import dequant_tile


@triton.jit
def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, N8, K,
                    G: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    BN8: tl.constexpr = BN // 8
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_n8 = pid_n * BN8 + tl.arange(0, BN8)
    mask_n = offs_n < N
    mask_n8 = offs_n8 < N8
    k0 = pid_k * BK
    w = dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, offs_n8, mask_n, mask_n8, N, N8, G, BK, BN,
                     w_ptr.dtype.element_ty)  # fmt: skip
    pdl_sync(PDL)  # the weight was read before the wait (no kernel writes it); `w` may be memory just freed
    tl.store(w_ptr + (k0 + offs_k)[:, None] * N + offs_n[None, :], w, mask=mask_n[None, :])


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float16,
    *,
    block_k: int = 32,
    block_n: int = 256,
    num_warps: int = 4,
) -> torch.Tensor:
    """Dense ``W [K, N]`` in ``dtype``, equal to :func:`awqkit.formats.gemm.dequantize` up to rounding."""
    k = qweight.shape[0]
    n = scales.shape[1]
    block_k = min(block_k, k)
    assert k % block_k == 0 and (group_size % block_k == 0 or block_k % group_size == 0)
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    grid = (k // block_k, triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        qweight, qzeros, scales, w, n, n // 8, k, G=group_size, BK=block_k, BN=block_n, num_warps=num_warps,
        **pdl_launch(qweight.device),
    )
    return w


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` as dequantize + cuBLAS (``addmm`` folds the bias into the GEMM's epilogue)."""
    w = dequantize(qweight, qzeros, scales, group_size, x.dtype)
    if bias is not None:
        return torch.addmm(bias.to(x.dtype), x, w)
    return x @ w
