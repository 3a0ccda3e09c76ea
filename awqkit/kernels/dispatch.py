"""Pick a kernel and its tile configuration from the problem size alone (M, N, K, group size, SM count).

No shape tables: the rules below come from the H100 sweeps recorded in docs/kernels-notes.md and are written in terms
of how much work each program gets and how many programs the GPU needs to stay busy, so they carry over to shapes
that were never measured.

* ``M == 1``, or ``M <= GEMV_MAX_M`` on wide layers: CUDA-core split-K GEMV (:mod:`.gemv`) — the pass over the
  weight is all that matters.
* ``M <= SPLITK_MAX_M``: tensor-core GEMM with split-K (:mod:`.gemm`), one row tile, as many K slices as it takes
  to give every SM a few programs.
* beyond: dequantize to the activation dtype + cuBLAS (:mod:`.dequant`); the fused kernel with large tiles
  (``gemm(..., block_m=128)``) exists and is correct but measured slower than cuBLAS on the dequantized weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from awqkit.kernels import dequant, gemm, gemv
from awqkit.kernels.common import sm_count

GEMV_MAX_M = 4
SPLITK_MAX_M = 64


@dataclass(frozen=True)
class Config:
    """One launch: which kernel and its tile sizes (fields unused by a kernel are ignored)."""

    kernel: str  # "gemv" | "gemm" | "dequant"
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    stages: int = 1
    swap: bool = True
    dq: int = 1  # GEMM dequantization: 1 = "1 + q/16" form (block_k = group size), 0 = (q - z) * s per weight
    rows: int = 8  # GEMV: rows loaded ahead


def _split_for(tiles: int, k_steps: int, sms: int, programs_per_sm: int) -> int:
    """K slices so that ``tiles * split`` reaches ``programs_per_sm`` programs per SM (at most one per K step)."""
    want = triton.cdiv(programs_per_sm * sms, tiles)
    return max(1, min(want, k_steps))


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, group_size: int, sms: int) -> Config:
    """The configuration for ``[m, k] @ [k, n]`` at ``group_size`` on a GPU with ``sms`` multiprocessors.

    Rules (H100 sweeps, docs/kernels-notes.md): the GEMV wants ~24 warps per SM of independent row streams, so
    narrow layers are split along K (down to parts of a group) until they have them, with the fp32 partials capped
    at a quarter of the weight bytes; wide layers (N >= 16K) use 1024-column, 2-warp programs. The tensor-core
    kernels want 2-4 programs per SM. Past M = 64 dequantize + cuBLAS wins.
    """
    groups = k // group_size
    wide = n >= 16384
    if m <= 2 or (m <= GEMV_MAX_M and wide):
        if m == 1:
            block_n, warps, pps = (1024, 2, 12) if wide else (256, 1, 24)
        else:  # per-row accumulators double the registers: half-width programs
            block_n, warps, pps = 512, 1, 12
        split = _split_for(triton.cdiv(n, block_n), max(1, k // 8), sms, pps)
        split = max(1, min(split, k // (32 * m)))  # workspace <= weight bytes / 4
        return Config("gemv", block_n=block_n, split_k=split, num_warps=warps, rows=8)
    if m <= 16:
        tiles = triton.cdiv(n, 128)
        return Config("gemm", block_m=16, block_n=128, split_k=_split_for(tiles, groups, sms, 3), num_warps=4)
    if m <= SPLITK_MAX_M:
        # the (q - z) * s form with a cp.async pipeline measured faster than 1 + q/16 here (notes: run 1 vs run 2)
        block_m = 32 if m <= 32 else 64
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
        return Config("gemm", block_m=block_m, block_n=64, block_k=128, split_k=_split_for(tiles, k // 128, sms, 2),
                      num_warps=4, stages=4, swap=block_m == 32, dq=0)  # fmt: skip
    return Config("dequant")


def run_config(
    cfg: Config,
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch ``cfg`` on a 2-D, row-contiguous ``x``."""
    if cfg.kernel == "gemv":
        return gemv.gemv(
            x, qweight, qzeros, scales, group_size, bias,
            block_n=cfg.block_n, rows=min(cfg.rows, group_size), split_k=cfg.split_k, num_warps=cfg.num_warps,
        )  # fmt: skip
    if cfg.kernel == "gemm":
        block_k = cfg.block_k
        if group_size % block_k and block_k % group_size:
            block_k = group_size
        return gemm.gemm(
            x, qweight, qzeros, scales, group_size, bias,
            block_m=cfg.block_m, block_n=cfg.block_n, block_k=block_k, split_k=cfg.split_k,
            num_warps=cfg.num_warps, stages=cfg.stages, swap=cfg.swap, dq=cfg.dq,
        )  # fmt: skip
    if cfg.kernel == "dequant":
        return dequant.dequant_matmul(x, qweight, qzeros, scales, group_size, bias)
    raise ValueError(f"unknown kernel {cfg.kernel!r}")


def awq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W (+ bias)`` for AutoAWQ GEMM tensors, kernel picked by :func:`pick_config`."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = scales.shape[1]
    if m == 0:
        return x.new_empty((0, n))
    if x.dtype not in (torch.float16, torch.bfloat16):  # e.g. fp32: no tensor-core path, dequantize + matmul
        return dequant.dequant_matmul(x, qweight, qzeros, scales, group_size, bias)
    cfg = pick_config(m, n, k, group_size, sm_count(x.device))
    return run_config(cfg, x, qweight, qzeros, scales, group_size, bias)
