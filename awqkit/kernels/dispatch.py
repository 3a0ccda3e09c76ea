"""Pick a kernel and its tile configuration from the problem size alone (M, N, K, group size, SM count).

No shape tables: the rules below come from the H100 sweeps recorded in docs/kernels-notes.md and are written in terms
of how much work each program gets and how many programs the GPU needs to stay busy, so they carry over to shapes
that were never measured.

* ``M == 1``: CUDA-core split-K GEMV (:mod:`.gemv`) — the pass over the weight is all that matters.
* up to ``SPLITK_MAX_M`` (and to 128 on wide or deep layers): tensor-core GEMM with split-K, the nibble-plane
  kernel (:func:`.gemm.gemm_planes`; for M <= 16 its words tile copied by TMA; from M = 33 with ``x`` as the MMA's
  left operand), split along K so that its programs fill one wave of resident programs (:func:`wave_split`).
* beyond: dequantize to the activation dtype + cuBLAS (:mod:`.dequant`); the fused kernel with large tiles
  (``gemm(..., block_m=128)``) exists and is correct but measured slower than cuBLAS on the dequantized weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from awqkit.kernels import dequant, gemm, gemv
from awqkit.kernels.common import Partials, sm_count

SPLITK_MAX_M = 64
# Weights (K x N) from which the M = 1 row GEMV unpacks two nibbles per rotated word (Config.pairs)
PAIRS_MIN_WEIGHTS = 1 << 23
# Output width from which a layer counts as wide (gate_up-like): enough column blocks to fill the GPU without a split
WIDE_N = 16384


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
    swap: bool = True  # tensor-core kernels: the weight is the MMA's left operand ((W^T x^T)^T); False: x is
    # (the nibble-plane kernel then folds (q - z) s: one unpack serves a whole row tile)
    dq: int = 1  # GEMM dequantization: 1 = "1 + q/16" form (block_k = group size), 0 = (q - z) * s per weight,
    # 3 = nibble-plane kernel with the per-step fp32 correction, 4 = nibble-plane kernel with (q - z) s folded
    # into the A operand (gemm.gemm_planes; block_n = 8 x column blocks)
    rows: int = 8  # GEMV: rows loaded ahead
    maxnreg: int = 0  # nibble-plane kernel: register cap per thread (0 = compiler's choice)
    specialize_n: bool = True  # GEMV: the row length compiled in (False: read at run time, for A/B sweeps)
    lookahead: int = 0  # GEMV: steps ahead whose weight rows are prefetched into L2 (0: none)
    lanes: int = 1  # GEMV: rows per step spread over the lanes (1: the row kernel; >1: the lane-split kernel)
    pairs: bool = False  # row GEMV: two nibbles per rotated word (1.5 instead of 2 unpack instructions a weight)
    tma: bool = False  # nibble-plane kernel: the words tile copied into shared memory by TMA, ``stages`` deep
    # (needs N % 32 == 0: 16-byte rows)


def _split_for(tiles: int, k_steps: int, sms: int, programs_per_sm: int) -> int:
    """K slices so that ``tiles * split`` reaches ``programs_per_sm`` programs per SM (at most one per K step)."""
    want = triton.cdiv(programs_per_sm * sms, tiles)
    return max(1, min(want, k_steps))


# Resident warps per SM of the nibble-plane kernel: ~250 registers per thread (ptxas report, every tile of runs
# 7-9; the allocator rounds to 256) x 32 lanes = 8192 of the SM's 65536 registers per warp -> 8 warps. A program of
# ``w`` warps thus has 8 // w resident slots per SM; shared memory (2-3 stages of a <= 16 KB words tile) is not the
# limit for any tile the dispatcher picks.
PLANES_WARPS_PER_SM = 8
# Shared memory an SM gives its resident programs (H100/H200: 228 KB, 1 KB of it reserved per program), and the
# nibble-plane kernel's share of it per program: ``stages`` words tiles and activation tiles, plus ~2 KB of barriers
# and epilogue scratch
SMEM_PER_SM = 227 * 1024


def planes_smem(block_m: int, bn8: int, block_k: int, stages: int) -> int:
    """Bytes of shared memory one nibble-plane program holds (an estimate; the compiler's figure is close)."""
    return stages * (block_k * bn8 * 4 + block_m * block_k * 2) + 2048


# Fewest K steps a split-K program keeps (the cp.async pipeline needs steps to overlap; run 9: qkv slower at 2).
MIN_STEPS_PER_PROGRAM = 4


def wave_split(tiles: int, steps: int, sms: int, resident_per_sm: int, min_steps: int = MIN_STEPS_PER_PROGRAM) -> int:
    """K slices so that ``tiles * split`` programs fill at most ONE wave of resident programs, as fully as it can.

    ``split = floor(sms * resident_per_sm / tiles)``: the largest split whose programs all run at once (a second,
    partial wave costs a whole program's time: run 9, gate_up M = 16: 444 CTAs in 528 slots 51.2 us, 296 CTAs 59.8,
    592 CTAs 62.3), capped so that every program keeps ``min_steps`` K steps. Shapes with more tiles than slots get
    no split."""
    slots = sms * max(1, resident_per_sm)
    split = max(1, slots // max(1, tiles))
    return max(1, min(split, steps // min_steps))


def planes_resident(block_m: int, bn8: int, block_k: int, stages: int, warps: int, maxnreg: int = 0) -> int:
    """Nibble-plane programs resident per SM: what registers (``PLANES_WARPS_PER_SM // warps``, or what ``maxnreg``
    allows) and shared memory let in, at least one."""
    by_regs = PLANES_WARPS_PER_SM // warps if not maxnreg else 65536 // (maxnreg * 32 * warps)
    by_smem = SMEM_PER_SM // planes_smem(block_m, bn8, block_k, stages)
    return max(1, min(by_regs, by_smem))


def planes_config(
    m: int,
    n: int,
    k: int,
    group_size: int,
    sms: int,
    *,
    fold: bool,
    block_m: int,
    bn8: int,
    warps: int,
    pps: float = 0,
    stages: int = 3,
    block_k: int = 64,
    maxnreg: int = 0,
    tma: bool = False,
    x_operand: bool = False,
) -> Config:
    """A nibble-plane launch (:func:`gemm.gemm_planes`), split along K by :func:`wave_split` (one wave of the
    programs that registers — ``PLANES_WARPS_PER_SM // warps``, or what ``maxnreg`` allows — and shared memory let
    reside per SM); ``pps > 0`` instead asks for ~``pps`` programs per SM with >= 2 K steps each (v5's rule, kept for
    sweeps).

    ``bn8`` AutoAWQ column blocks (8 outputs each) per program: 16 per warp keeps one warp's MMA rows its own (16
    rows per warp for mma.sync, 64 per warpgroup for wgmma), so no warp unpacks a plane another warp also unpacks.
    ``x_operand``: ``x`` is the MMA's left operand and the folded planes its right one (``Config.swap=False``)."""
    block_k = min(block_k, group_size)
    steps = max(1, k // block_k)
    tiles = triton.cdiv(n // 8, bn8) * triton.cdiv(m, block_m)
    if pps > 0:
        split = max(1, min(triton.cdiv(int(pps * sms), tiles), steps // 2))
    else:
        split = wave_split(tiles, steps, sms, planes_resident(block_m, bn8, block_k, stages, warps, maxnreg))
    return Config("gemm", block_m=block_m, block_n=8 * bn8, block_k=block_k, split_k=split, num_warps=warps,
                  stages=stages, dq=4 if fold or x_operand else 3, maxnreg=maxnreg, tma=tma,
                  swap=not x_operand)  # fmt: skip


def gemv_config(
    m: int, n: int, k: int, sms: int, *, block_n: int, warps: int, rows: int, pps: int, lanes: int = 1,
    lookahead: int = 0,
) -> Config:
    """A GEMV launch of ``block_n``-column programs, split along K for ~``pps`` programs per SM (at most one slice
    per step of ``rows x lanes`` rows, and a workspace of at most a quarter of the weight's bytes)."""
    split = _split_for(triton.cdiv(n, block_n), max(1, k // (rows * lanes)), sms, pps)
    split = max(1, min(split, k // (32 * m)))
    return Config("gemv", block_n=block_n, split_k=split, num_warps=warps, rows=rows, lanes=lanes, lookahead=lookahead)


def small_m_without_tma(m: int, n: int, k: int, group_size: int, sms: int) -> Config:
    """The rule for 2 <= M <= 16 where TMA cannot stage the weight (N not a multiple of 32), and everywhere before
    session 9 (the benchmark's sweep times it as the baseline of the TMA rule)."""
    if m == 2 and n >= WIDE_N:
        # lane-split GEMV (4 rows per step over the lanes, 16-byte loads), ~8 programs per SM, L2 look-ahead of
        # two steps: session 7's sweep, gate_up 40.9 vs 47.7 us (Llama-3-8B 40.3 vs 42.5) for the 1024-column row
        # kernel
        return gemv_config(m, n, k, sms, block_n=256, warps=1, rows=4, pps=8, lanes=4, lookahead=2)
    return planes_config(m, n, k, group_size, sms, fold=False, block_m=16, bn8=32, warps=2, stages=2)


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, group_size: int, sms: int) -> Config:
    """The configuration for ``[m, k] @ [k, n]`` at ``group_size`` on a GPU with ``sms`` multiprocessors.

    Rules (H100 sweeps, docs/kernels-notes.md, runs 7-10; M <= 16: the H200 sweeps of sessions 7 and 9):

    * M = 1: the CUDA-core split-K row GEMV (~32 one-warp programs per SM of independent row streams, split along
      K down to parts of a group, rows prefetched into L2 a step ahead; layers of >= 8M weights unpack two nibbles
      per rotated word).
    * M <= 16 (N a multiple of 32): the nibble-plane tensor-core kernel with ``(q - z) s`` folded into the operand
      and its words tile copied by TMA, one 16-row tile, 256 columns and 2 warps per program (4 resident per SM),
      split along K to fill one wave of resident programs with >= 4 K steps each (:func:`wave_split`); wide layers
      cap it at 168 registers where the extra resident programs add splits. Other N
      (no 16-byte rows for TMA): M = 2 on wide layers the lane-split GEMV, else the same plane tile with cp.async
      and the per-step fp32 scale/zero correction.
    * M <= 32: the same kernel with ``(q - z) s`` folded into the operand (the correction's cost grows with the
      row tile), 32-row tiles.
    * M <= 64, and M <= 128 on deep layers (K > N), layers with K >= 4096 and wide layers whose tiles fill their
      last wave well: the folded weight as the wgmma's right operand and ``x`` its left one, 64-row tiles
      (:func:`x_operand_config`; scales in the activation dtype, :func:`scales_for`).
    * M <= 128 on other wide layers: folded nibble-plane kernel, 32-row tiles; otherwise dequantize + cuBLAS.
    """
    wide = n >= WIDE_N
    if m == 1:
        # one word (8 columns) per thread and row, the row length compiled in (immediate row offsets), ~32
        # one-warp programs per SM, each step's rows prefetched into L2 one step ahead: session 7's H200 sweep, 8
        # shapes (Qwen2-7B and held-out Llama-3-8B), 6-10 % faster than without the look-ahead on every one
        # Layers of >= 8M weights also unpack two nibbles per rotated word (1.5 instead of 2 unpack instructions a
        # weight, 12 % fewer loop instructions): session 10's H200 sweep, 2.3-5.6 % faster on all 12 such layers of
        # Qwen2-7B, Llama-3-8B and Qwen2.5-14B; on Qwen2.5-1.5B's 2-3M-weight qkv / o, where launch and tail
        # dominate, 5-7 % slower, so those keep the plain unpack
        cfg = gemv_config(m, n, k, sms, block_n=256, warps=1, rows=8, pps=32, lookahead=1)
        return replace(cfg, pairs=k * n >= PAIRS_MIN_WEIGHTS)
    if m <= 16 and n % 32 == 0:
        # nibble-plane kernel, (q - z) s folded into the operand, its words tile staged by TMA three stages deep,
        # 16-row tiles of 256 columns on 2 warps, one-wave split: session 9's H200 sweep, 8 shapes (Qwen2-7B and
        # held-out Llama-3-8B) x M = 2, 4, 8, 16: 1.09-1.36x the rules below on every one, within 5 % of the best
        # of 32 TMA configurations
        cfg = planes_config(m, n, k, group_size, sms, fold=True, block_m=16, bn8=32, warps=2, stages=3, tma=True)
        if n >= WIDE_N:
            # wide layers whose one wave has room for more programs: the same tile capped at 168 registers (12
            # instead of 8 resident warps per SM, no spills). Session 10's sweep: 1.02-1.09x on the gate_up of
            # Qwen2-7B, Llama-3-8B and Qwen2.5-14B at every M = 2-16; where the cap adds no programs (Qwen2.5-1.5B
            # gate_up, split bound by K steps) and on narrow layers (down: more splits, no gain) it is 5-23 % slower
            capped = planes_config(m, n, k, group_size, sms, fold=True, block_m=16, bn8=32, warps=2, stages=3,
                                   maxnreg=168, tma=True)  # fmt: skip
            if capped.split_k > cfg.split_k:
                return capped
        return cfg
    if m <= 16:
        return small_m_without_tma(m, n, k, group_size, sms)
    fold32 = planes_config(m, n, k, group_size, sms, fold=True, block_m=32, bn8=32, warps=2)
    if m <= 32:
        return fold32
    if m <= 128:
        # x as the wgmma's left operand, the folded weight its right one: one unpack serves 64 rows (the plane
        # kernels above unpack it once per 16- or 32-row tile). Session 10's H200 sweep (16 shapes of four models,
        # matched-dtype scales, which scales_for provides) and session 11's (the same with this rule, plus 12 shapes
        # of three models never measured before it was written): 1.06-1.48x the previous rules at M = 64 on every
        # layer but two wide ones, 1.13-1.35x on all 12 new ones; at M = 128 1.05-1.35x on every deep layer
        # (K > N: down projections), 1.08-1.18x on layers with K >= 4096, and 1.37-1.42x on wide layers whose
        # row x column tiles fill >= 70 % of their last wave (0.88-0.93x on those that fill 55-65 %)
        xa, wave_fill = x_operand_config(m, n, k, group_size, sms)
        if m <= SPLITK_MAX_M or (wide and wave_fill >= 0.7) or (not wide and (k > n or k >= 4096)):
            return xa
        if wide:
            return fold32
    return Config("dequant")


def x_operand_config(m: int, n: int, k: int, group_size: int, sms: int) -> tuple[Config, float]:
    """The x-operand kernel's launch: 64-row tiles on one warpgroup, 64-row steps, 3 stages (TMA where N allows),
    16 column blocks capped at 168 registers (3 programs per SM). Wide layers, whose column tiles alone must fill
    the GPU (their K splits are few), take 32 uncapped blocks (2 per SM) where that fills its one wave clearly
    better. Session 10's sweep at M = 64: 16 blocks 1.06-1.48x on every narrow layer (32 blocks: 0.96x on
    Qwen2.5-14B's down, whose splits fill either wave); on wide ones the wave decides, e.g. Qwen2-7B gate_up 296
    of 396 slots with 16 blocks (1.19x; 32 blocks 0.78x), Llama-3-8B gate_up 224 of 396 with 16 (0.96x) against
    224 of 264 with 32 (1.08x). Above M = 64 the 16-block tile only (the sweeps' best there).

    Also returns how full the launch's last wave of resident programs is (1.0: programs fill whole waves)."""

    def launch(bn8: int, maxnreg: int) -> tuple[Config, float, float]:
        cfg = planes_config(m, n, k, group_size, sms, fold=True, block_m=64, bn8=bn8, warps=4, stages=3,
                            maxnreg=maxnreg, tma=n % 32 == 0, x_operand=True)  # fmt: skip
        slots = sms * planes_resident(cfg.block_m, bn8, cfg.block_k, cfg.stages, cfg.num_warps, maxnreg)
        programs = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m) * cfg.split_k
        return cfg, programs / slots, programs / (triton.cdiv(programs, slots) * slots)

    narrow, fill16, last16 = launch(16, 168)
    if n < WIDE_N or m > SPLITK_MAX_M:
        return narrow, last16
    wide, fill32, last32 = launch(32, 0)
    return (wide, last32) if fill32 > 1.05 * fill16 and fill32 <= 1.0 else (narrow, last16)


def scales_for(cfg: Config, x: torch.Tensor, scales: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """The scales a launch of ``cfg`` reads: ``scales``, or for the x-operand kernel a copy in ``x``'s dtype kept in
    ``cache`` (a layer's :class:`~awqkit.kernels.KernelState`; None: no copy).

    That kernel multiplies ``(q - z) s`` in the activation dtype and reads two scales as one 32-bit word. Scales of
    the other 16-bit type (AutoAWQ's fp16 with bf16 activations) it converts per step, which costs ~30 % of its
    loop (SASS: 417 instead of 324 instructions per 64 weights) and measured its whole gain away (session 11). The
    copy is rounded to nearest once, exactly as the kernel's own conversion rounds, so the sums are the same. It
    costs 1/32 of the packed weight's bytes at g128, for the layers that ever run the kernel, and is made again
    after an in-place change of ``scales``; it is never made during CUDA-graph capture (it would live in the graph's
    memory pool): that launch converts per step instead."""
    if cache is None or cfg.swap or cfg.kernel != "gemm" or cfg.dq < 3 or scales.dtype == x.dtype:
        return scales
    version, converted = cache.get(x.dtype, (-1, None))
    # an in-place load into the scales bumps their version; inference tensors (made under torch.inference_mode, as
    # the engine's are) have no version counter, and nothing changes them outside inference mode
    current = None if scales.is_inference() else scales._version
    if converted is not None and version == current:
        return converted
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return scales
    cache[x.dtype] = (current, scales.to(x.dtype))
    return cache[x.dtype][1]


def run_config(
    cfg: Config,
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    partials: bool = False,
    scales_cache: dict | None = None,
) -> torch.Tensor | Partials:
    """Launch ``cfg`` on a 2-D, row-contiguous ``x`` (``partials``: leave split-K sums unreduced, see
    :class:`~awqkit.kernels.common.Partials`; ``scales_cache``: see :func:`scales_for`)."""
    scales = scales_for(cfg, x, scales, scales_cache)
    if cfg.kernel == "gemv":
        return gemv.gemv(
            x, qweight, qzeros, scales, group_size, bias,
            block_n=cfg.block_n, rows=cfg.rows, split_k=cfg.split_k, num_warps=cfg.num_warps,
            specialize_n=cfg.specialize_n, lanes=cfg.lanes, lookahead=cfg.lookahead,
            pairs=cfg.pairs, partials=partials,
        )  # fmt: skip
    if cfg.kernel == "gemm" and cfg.dq >= 3:
        # TMA also needs a 16-byte aligned base, which the rules (shapes only) cannot see: a view into the middle
        # of a larger tensor takes the cp.async path, same tile and the same sums; likewise the x-operand kernel
        # reads two scales as one 32-bit word (a misaligned view takes the weight-operand kernel, same tile)
        tma = cfg.tma and qweight.data_ptr() % 16 == 0
        if not cfg.swap and scales.data_ptr() % 4:
            cfg = replace(cfg, swap=True)
        return gemm.gemm_planes(
            x, qweight, qzeros, scales, group_size, bias,
            block_m=cfg.block_m, block_n=cfg.block_n, block_k=min(cfg.block_k, group_size), split_k=cfg.split_k,
            num_warps=cfg.num_warps, stages=cfg.stages, fold=cfg.dq == 4, maxnreg=cfg.maxnreg, tma=tma,
            x_operand=not cfg.swap, partials=partials,
        )  # fmt: skip
    if cfg.kernel == "gemm":
        block_k = cfg.block_k
        if group_size % block_k and block_k % group_size:
            block_k = group_size
        return gemm.gemm(
            x, qweight, qzeros, scales, group_size, bias,
            block_m=cfg.block_m, block_n=cfg.block_n, block_k=block_k, split_k=cfg.split_k,
            num_warps=cfg.num_warps, stages=cfg.stages, swap=cfg.swap, dq=cfg.dq, partials=partials,
        )  # fmt: skip
    if cfg.kernel == "dequant":
        y = dequant.dequant_matmul(x, qweight, qzeros, scales, group_size, bias)
        return Partials(y[None], None) if partials else y
    raise ValueError(f"unknown kernel {cfg.kernel!r}")


def awq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    partials: bool = False,
    scales_cache: dict | None = None,
) -> torch.Tensor | Partials:
    """``x [M, K] @ W (+ bias)`` for AutoAWQ GEMM tensors, kernel picked by :func:`pick_config` (``partials``:
    split-K sums left for the consumer, :class:`~awqkit.kernels.common.Partials`; ``scales_cache``: the layer's
    converted scales, :func:`scales_for`)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = scales.shape[1]
    if m == 0 or x.dtype not in (torch.float16, torch.bfloat16):  # fp32: no tensor-core path, dequantize + matmul
        cfg = Config("dequant")
    else:
        cfg = pick_config(m, n, k, group_size, sm_count(x.device))
    return run_config(cfg, x, qweight, qzeros, scales, group_size, bias, partials, scales_cache)
