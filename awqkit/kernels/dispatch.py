"""Pick a kernel and its tile configuration from the problem size alone (M, N, K, group size, SM count).

No shape tables: the rules are written in terms of how much work each program gets and how many programs the GPU
needs to stay busy (docs/kernels-notes.md), so they carry over to shapes that were never measured.

* ``M <= GEMV_MAX_M``: CUDA-core split-K GEMV (:mod:`.gemv`) — the pass over the weight is all that matters.
* ``M <= SPLITK_MAX_M``: tensor-core kernel with split-K (:mod:`.gemm`), one row tile, as many K slices as it takes
  to give every SM a few programs.
* beyond: dequantize to the activation dtype + cuBLAS (:mod:`.dequant`); the fused kernel with large tiles
  (``gemm(..., block_m=128)``) exists and is correct but measured slower than cuBLAS on the dequantized weight.

Both split-K kernels finish the layer in one launch (atomic fp32 partials, last program per tile writes).
:func:`gemv_config` / :func:`gemm_config` turn the knobs (tile, warps, prefetch, work per SM) into a launch for any
shape; ``benchmarks/kernels.py --sweep`` times them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from awqkit.kernels import dequant, gemm, gemv
from awqkit.kernels.common import sm_count

GEMV_MAX_M = 2
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
    dq: int = 2  # GEMM dequantization: 0 = (q - z) * s per weight; 1, 2 = "1 + q/16" forms (block_k = group size)
    prefetch: int = 1  # GEMM: K steps loaded ahead through registers (0: Triton's cp.async pipeline, `stages`)
    rows: int = 4  # GEMV: row steps loaded ahead
    vec: int = 4  # GEMV: packed words per thread and row step (4 = 16-byte loads)


def _split_for(tiles: int, k_steps: int, sms: int, programs_per_sm: int) -> int:
    """K slices so that ``tiles * split`` reaches ``programs_per_sm`` programs per SM (at most one per K step)."""
    want = triton.cdiv(programs_per_sm * sms, tiles)
    return max(1, min(want, k_steps))


def gemv_config(
    m: int, n: int, k: int, group_size: int, sms: int, *, block_n: int, num_warps: int, vec: int = 4, rows: int = 4,
    warps_per_sm: int = 16,
) -> Config:  # fmt: skip
    """GEMV launch with at least ``warps_per_sm`` warps of work per SM: K is split into whole groups at least (one
    group chunk per program: no second accumulator set), and further into parts of a group for narrow layers."""
    programs = triton.cdiv(warps_per_sm * sms, num_warps)
    split = max(k // group_size, triton.cdiv(programs, triton.cdiv(n, block_n)))
    return Config("gemv", block_n=block_n, split_k=split, num_warps=num_warps, rows=rows, vec=vec)


def gemm_config(
    m: int, n: int, k: int, group_size: int, sms: int, *, block_m: int, block_n: int, num_warps: int,
    programs_per_sm: int, dq: int = 2, prefetch: int = 1, swap: bool = True, stages: int = 1, block_k: int = 128,
) -> Config:  # fmt: skip
    """Tensor-core launch: ``programs_per_sm`` programs per SM from output tiles times K slices (whole steps)."""
    bk = group_size if dq else block_k
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = _split_for(tiles, max(1, k // bk), sms, programs_per_sm)
    return Config("gemm", block_m=block_m, block_n=block_n, block_k=bk, split_k=split, num_warps=num_warps,
                  stages=stages, swap=swap, dq=dq, prefetch=prefetch)  # fmt: skip


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, group_size: int, sms: int) -> Config:
    """The configuration for ``[m, k] @ [k, n]`` at ``group_size`` on a GPU with ``sms`` multiprocessors.

    Rules in terms of work per program and programs per SM only (docs/kernels-notes.md, v4; chosen from the
    compiler's resource report, not yet from a sweep):

    * M <= GEMV_MAX_M: the CUDA-core GEMV (one FFMA per weight and row of x). 512 columns and 4 warps per program,
      16-byte loads, 8 row steps ahead: 80 registers (6 programs per SM) and each thread's whole slice in flight
      at once; K split so that every SM gets >= 16 warps of work — one wave, one epilogue per program on narrow
      layers (3584 x 4608: 64-row slices, 504 programs), whole groups on wide ones.
    * M <= 16: tensor-core kernel, 16-row tile, 128 columns, 4 warps, two K steps prefetched through registers
      (219 registers: 2 programs and 32 KB of packed weight in flight per SM), split-K to 2 programs per SM.
    * M <= SPLITK_MAX_M: the same with a 32- (64 columns) or 64-row tile (128 columns, 8 warps, one step ahead).
    * beyond: dequantize + cuBLAS (bound by writing the bf16 weight: docs/kernels-notes.md).
    """
    if m <= GEMV_MAX_M:
        return gemv_config(m, n, k, group_size, sms, block_n=512, num_warps=4, vec=4, rows=8, warps_per_sm=16)
    if m <= 16:
        return gemm_config(m, n, k, group_size, sms, block_m=16, block_n=128, num_warps=4, programs_per_sm=2,
                           prefetch=2)  # fmt: skip
    if m <= 32:
        return gemm_config(m, n, k, group_size, sms, block_m=32, block_n=64, num_warps=4, programs_per_sm=2,
                           prefetch=2)  # fmt: skip
    if m <= SPLITK_MAX_M:
        return gemm_config(m, n, k, group_size, sms, block_m=64, block_n=128, num_warps=8, programs_per_sm=2,
                           prefetch=1)  # fmt: skip
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
            block_n=cfg.block_n, rows=cfg.rows, split_k=cfg.split_k, num_warps=cfg.num_warps, vec=cfg.vec,
        )  # fmt: skip
    if cfg.kernel == "gemm":
        block_k = cfg.block_k
        if group_size % block_k and block_k % group_size:
            block_k = group_size
        return gemm.gemm(
            x, qweight, qzeros, scales, group_size, bias,
            block_m=cfg.block_m, block_n=cfg.block_n, block_k=block_k, split_k=cfg.split_k,
            num_warps=cfg.num_warps, stages=cfg.stages, swap=cfg.swap, dq=cfg.dq, prefetch=cfg.prefetch,
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
