#!/usr/bin/env python3
"""W4A16 kernel benchmark (issue 6): correctness first, then timings against bf16 cuBLAS and torch's int4.

    python3 benchmarks/kernels.py --out benchmarks/results            # check + benchmark → kernels.json, PNG
    python3 benchmarks/kernels.py --out DIR --sweep                    # also sweep tile configs (tuning aid)

Method (docs/kernels-notes.md has the numbers):

* correctness: every path (GEMV, split-K GEMM, GEMM, swapped GEMM, dequantize + cuBLAS, the dispatcher), fp16 and
  bf16, group sizes 32/64/128, odd M and N, bias; random data, relative error against ``x @ dequantize(W)`` in fp32,
  outputs allocated over NaN-poisoned memory so an unwritten element fails;
* timing: each measured call is captured ``reps`` times into one CUDA graph (as the engine runs decode steps) and the
  median replay is divided by the number of calls; the weights rotate over enough copies that every call reads
  ≥ 150 MB of distinct weights per round (3x the 50 MB L2), so no call is served from L2 by its predecessor.
  cuBLAS (``F.linear`` on the bf16 weight) and torch's int4 (``_weight_int4pack_mm``) are timed the same way, same
  run, same inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from awqkit.formats import gemm as fmt  # noqa: E402
from awqkit.kernels.common import set_pdl, sm_count  # noqa: E402
from awqkit.kernels.dispatch import (  # noqa: E402
    WIDE_N,
    Config,
    _split_for,
    gemv_config,
    pick_config,
    planes_config,
    run_config,
    small_m_without_tma,
)
from awqkit.kernels.gemv import k_slices  # noqa: E402
from awqkit.nn import AWQLinear  # noqa: E402

SHAPES = [("qkv", 3584, 4608), ("o", 3584, 3584), ("gate_up", 3584, 37888), ("down", 18944, 3584)]
EXTRA_SHAPES = [  # generality check, not tuned on (Llama-3-8B)
    ("llama8b_qkv", 4096, 6144), ("llama8b_o", 4096, 4096),
    ("llama8b_gate_up", 4096, 28672), ("llama8b_down", 14336, 4096),
]  # fmt: skip
HELDOUT_SHAPES = [  # never swept before a rule shipped (Qwen2.5-14B and Qwen2.5-1.5B): checks of a new rule
    ("qwen14b_qkv", 5120, 7168), ("qwen14b_o", 5120, 5120),
    ("qwen14b_gate_up", 5120, 27648), ("qwen14b_down", 13824, 5120),
    ("qwen1.5b_qkv", 1536, 2048), ("qwen1.5b_o", 1536, 1536),
    ("qwen1.5b_gate_up", 1536, 17920), ("qwen1.5b_down", 8960, 1536),
]  # fmt: skip
NEW_HELDOUT_SHAPES = [  # first measured in session 11, after its rule was written (Qwen3-8B, Llama-3.2-3B, Qwen3-4B)
    ("qwen3_8b_qkv", 4096, 6144), ("qwen3_8b_o", 4096, 4096),
    ("qwen3_8b_gate_up", 4096, 24576), ("qwen3_8b_down", 12288, 4096),
    ("llama3b_qkv", 3072, 5120), ("llama3b_o", 3072, 3072),
    ("llama3b_gate_up", 3072, 16384), ("llama3b_down", 8192, 3072),
    ("qwen3_4b_qkv", 2560, 6144), ("qwen3_4b_o", 4096, 2560),
    ("qwen3_4b_gate_up", 2560, 19456), ("qwen3_4b_down", 9728, 2560),
]  # fmt: skip
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128
ROTATE_BYTES = 150e6
DEV = "cuda"


# ----------------------------------------------------------------------------------------------------------- data
def random_awq(k: int, n: int, g: int, device=None):
    """Random AutoAWQ tensors: every nibble uniform in 0..15, scales in [1e-3, 1.1e-2] (never zero)."""
    device = device or DEV
    qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), dtype=torch.int32, device=device)
    scales = (torch.rand(k // g, n, device=device) * 0.01 + 0.001).half()
    return qweight, qzeros, scales


def weight_bytes(k: int, n: int, g: int) -> int:
    return k * n // 2 + (k // g) * n // 2 + (k // g) * n * 2


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------------ torch int4
def int4_setup(qweight, qzeros, scales, g):
    """torch's tinygemm layout for the same weight: w = (q - 8) * s + (8 - z) * s, bf16 scales and zeros."""
    q = fmt.unpack(qweight).t().contiguous()  # [N, K] 0..15
    z = fmt.unpack(qzeros).t().float()  # [N, K/G]
    s = scales.t().float()
    w_uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w_uint8, 8)
    sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/G, N, 2]
    return packed, sz


def int4_mm(x, packed, sz, g):
    return torch.ops.aten._weight_int4pack_mm(x, packed, g, sz)


# ---------------------------------------------------------------------------------------------------------- timing
def time_calls(calls, target_ms: float = 3.0, replays: int = 15) -> float:
    """Median µs per call: ``calls`` (one per weight copy) captured ``reps`` times into a CUDA graph."""
    for c in calls:  # compile / autotune / cuBLAS handles, outside the graph
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in calls:
        c()
    torch.cuda.synchronize()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    reps = max(1, min(200, math.ceil(target_ms / est_ms)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    return statistics.median(times) * 1e3 / (reps * len(calls))


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / nbytes))


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus written (the method's ceiling)."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=DEV).uniform_()
    b = torch.empty_like(a)
    us = time_calls([lambda: b.copy_(a)], target_ms=20, replays=10)
    return 2 * a.numel() * 4 / (us * 1e-6) / 1e9


# ----------------------------------------------------------------------------------------------------- correctness
CHECK_CASES = [  # (M, K, N): quick; N an odd multiple of 8 tests the column masks
    (1, 1024, 1000),
    (1, 1024, 2048),  # every column block full: the GEMV's unmasked loads
    (3, 512, 776),
    (7, 1024, 1288),
    (16, 768, 520),
    (33, 512, 1160),
    (100, 1024, 904),
    (64, 1024, 1536),  # N a multiple of 32: the TMA paths at M > 1
    (300, 512, 648),
]
CHECK_PATHS = [
    ("gemv", Config("gemv", block_n=1024, num_warps=2, rows=8, split_k=3)),
    ("gemv_subgroup", Config("gemv", block_n=256, num_warps=1, rows=8, split_k=40)),
    ("gemv_nosplit", Config("gemv", block_n=512, num_warps=1, rows=4, split_k=1)),
    ("gemv_runtime_n", Config("gemv", block_n=256, num_warps=1, rows=8, split_k=40, specialize_n=False)),
    ("gemv_lookahead", Config("gemv", block_n=256, num_warps=1, rows=8, split_k=7, lookahead=2)),
    ("gemv_pairs", Config("gemv", block_n=256, num_warps=1, rows=8, split_k=7, lookahead=1, pairs=True)),
    ("gemv_lanes4", Config("gemv", block_n=256, num_warps=1, split_k=12, lanes=4, lookahead=2)),
    ("gemv_lanes8_chunks", Config("gemv", block_n=128, num_warps=1, split_k=2, lanes=8)),
    ("gemm_splitk", Config("gemm", block_m=16, block_n=256, split_k=3, num_warps=4)),
    ("gemm_splitk_noswap", Config("gemm", block_m=16, block_n=128, split_k=2, swap=False)),
    ("gemm_m64", Config("gemm", block_m=64, block_n=128, num_warps=8)),
    ("gemm_m128", Config("gemm", block_m=128, block_n=128, num_warps=8, stages=3)),
    ("gemm_dq0", Config("gemm", block_m=64, block_n=128, block_k=64, num_warps=4, stages=3, swap=False, dq=0)),
    ("gemm_dq0_swap", Config("gemm", block_m=64, block_n=128, block_k=64, num_warps=4, stages=3, dq=0)),
    ("dequant", Config("dequant")),
    ("planes_w1", Config("gemm", block_m=16, block_n=128, block_k=64, split_k=3, num_warps=1, stages=3, dq=3)),
    ("planes_w2", Config("gemm", block_m=16, block_n=256, block_k=64, split_k=2, num_warps=2, stages=2, dq=3)),
    ("planes_w4", Config("gemm", block_m=16, block_n=512, block_k=128, split_k=1, num_warps=4, stages=4, dq=3)),
    ("planes_fold_w2", Config("gemm", block_m=32, block_n=256, block_k=64, split_k=3, num_warps=2, stages=3, dq=4)),
    ("planes_fold_w8", Config("gemm", block_m=64, block_n=512, block_k=64, split_k=2, num_warps=8, stages=3, dq=4)),
    ("planes_tma", Config("gemm", block_m=16, block_n=256, block_k=128, split_k=3, num_warps=2, stages=3, dq=3,
                          tma=True)),  # fmt: skip
    ("planes_fold_tma", Config("gemm", block_m=16, block_n=512, block_k=64, split_k=2, num_warps=4, stages=4, dq=4,
                               tma=True)),  # fmt: skip
    # x as the MMA's left operand, the folded weight its right one (wgmma on Hopper; not dispatched yet)
    ("planes_xa", Config("gemm", block_m=64, block_n=256, block_k=64, split_k=2, num_warps=4, stages=3, dq=4,
                         swap=False)),  # fmt: skip
    ("planes_xa_tma", Config("gemm", block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8, stages=3, dq=4,
                             swap=False, tma=True)),  # fmt: skip
]


def poison() -> None:
    """Fill cached allocator blocks (both pools) with NaN so that new outputs start as NaN, not stale results."""
    big = torch.full((64 << 20,), float("nan"), device=DEV)
    small = [torch.full((1 << 17,), float("nan"), device=DEV) for _ in range(32)]
    del big, small


def _check_worker(task) -> list[dict]:
    """One (group size, dtype): every path and case, plus AWQLinear with leading dims. Runs in a pool worker."""
    g, dtype_name = task
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(g)
    tol = 2e-3 if dtype == torch.float16 else 1.2e-2
    results = []
    for m, k, n in CHECK_CASES:
        qw, qz, sc = random_awq(k, n, g)
        w = fmt.dequantize(qw, qz, sc, g, torch.float32)
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        bias = torch.randn(n, device=DEV).half()
        ref = x.float() @ w + bias.float()
        for name, cfg in CHECK_PATHS:
            if cfg.kernel == "gemv" and m > (4 if cfg.lanes == 1 else 2):
                continue
            if cfg.tma and n % 32:  # TMA needs 16-byte rows; the dispatcher never picks it there
                continue
            poison()
            err = rel_err(run_config(cfg, x, qw, qz, sc, g, bias), ref)
            results.append(dict(path=name, g=g, dtype=dtype_name, M=m, K=k, N=n, err=err, ok=err < tol))
        layer = AWQLinear.from_packed(qw, qz, sc, g)
        layer.prepare_for_kernels()
        x3 = torch.randn(1, m, k, device=DEV, dtype=dtype)
        poison()
        err = rel_err(layer(x3).reshape(m, n), x3.reshape(m, k).float() @ w)
        results.append(dict(path="AWQLinear", g=g, dtype=dtype_name, M=m, K=k, N=n, err=err, ok=err < tol))
    return results


def _warm_worker(jobs) -> int:
    """Compile configs (Triton caches them on disk for the timing process) on stand-ins of the same divisibility
    (the real K; N = 512, or the real N for the GEMV, which compiles it in)."""
    for cfg, m, k, n in jobs:
        qw, qz, sc = random_awq(k, n, GROUP)
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        for pdl in (None, 0):  # both launch modes are timed (programmatic dependent launch on, and off)
            set_pdl(pdl)
            try:
                run_config(cfg, x, qw, qz, sc, GROUP)
            except Exception:  # reported by the timing process
                pass
    set_pdl(None)
    return len(jobs)


def summarize_checks(results, log) -> bool:
    bad = [r for r in results if not r["ok"]]
    worst = {}
    for r in results:
        key = (r["path"], r["dtype"])
        worst[key] = max(worst.get(key, 0.0), r["err"])
    for (p, d), e in sorted(worst.items()):
        log(f"  correctness {p:18s} {d:9s} worst rel err {e:.2e}")
    log(f"correctness: {len(results) - len(bad)}/{len(results)} ok")
    for r in bad[:20]:
        log(f"  FAIL {r}")
    return not bad


def capture(fn):
    """``(graph, output)``: ``fn`` run once on a side stream (compilation and allocator warm-up stay out of the graph),
    then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def check_graph_capture(log) -> bool:
    """Capture awq_linear at M=1 and M=16 (split-K paths) in a graph, replay with new inputs, compare."""
    qw, qz, sc = random_awq(3584, 4608, GROUP)
    layer = AWQLinear.from_packed(qw, qz, sc, GROUP, torch.randn(4608, device=DEV).half())
    layer.prepare_for_kernels()
    ok = True
    for m in (1, 16, 64):
        x = torch.randn(m, 3584, device=DEV, dtype=torch.bfloat16)
        g, y = capture(lambda x=x: layer(x))
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        ref = layer._reference_forward(x.float()).float()
        err = rel_err(y, ref)
        ok &= err < 1.2e-2
        log(f"  graph capture M={m}: rel err after replay on new input {err:.2e}")
    return ok


def check_pdl_chain(log) -> bool:
    """Programmatic dependent launch lets a kernel start before the one it depends on ends; a wait misplaced in any
    kernel would show as a race. Every kernel here is deterministic, so a chain of layers (each eating the previous
    one's output, sizes alternating so that buffers are reused) must give bit-identical outputs with PDL on and off,
    eagerly and replayed from a CUDA graph, at M = 1 (GEMV + reduction), 4, 16 (tensor-core split-K), 64 and 300
    (dequantize + cuBLAS)."""
    torch.manual_seed(1)
    dims = [3584, 4608, 3584, 18944, 3584]
    layers = []
    for k, n in zip(dims[:-1], dims[1:]):
        layer = AWQLinear.from_packed(*random_awq(k, n, GROUP), GROUP, torch.randn(n, device=DEV).half())
        layer.prepare_for_kernels()
        layers.append(layer)

    def chain(x):  # nothing between the layers: every kernel follows a kernel that may still be running
        for layer in layers:
            x = layer(x)
        return x

    ok = True
    for m in (1, 4, 16, 64, 300):
        x = torch.randn(m, dims[0], device=DEV, dtype=torch.bfloat16)
        outs = {}
        for pdl in (0, None):
            set_pdl(pdl)
            eager = chain(x)
            g, y = capture(lambda x=x: chain(x))
            poison()
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
            outs[pdl] = (eager.clone(), y.clone())
            del g
        set_pdl(None)
        same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[None]))
        same &= torch.equal(outs[None][0], outs[None][1])
        ok &= bool(same) and bool(torch.isfinite(outs[None][0]).all())
        log(f"  PDL chain M={m}: on == off (eager and graph) bitwise: {bool(same)}")
    return ok


# ---------------------------------------------------------------------------------------------------------- sweeps
SWEEP_MS = (1, 2)  # most important first: a deadline cuts the tail


def gemv_candidates(m: int, n: int, k: int, sms: int) -> list[tuple[str, Config]]:
    """GEMV configurations to time against the shipped rule: at M = 1 the row kernel with one or two words per
    thread (256 or 512 columns per one-warp program), with and without its rows prefetched into L2 a step ahead, at
    ~16-32 programs per SM, and with the look-ahead also unpacking two nibbles per rotated word (``pairs``); the
    lane-split kernel (4 or 8 rows per step over the lanes) at ~8-16 programs per SM."""
    out = []
    if m == 1:
        for block_n in (256, 512):
            for pps in (16, 24, 32):
                for la in (0, 1):
                    cfg = gemv_config(m, n, k, sms, block_n=block_n, warps=1, rows=8, pps=pps, lookahead=la)
                    out.append((f"row bn{block_n} pps{pps} la{la} split{cfg.split_k}", cfg))
                    if la:  # two nibbles per rotated word (Config.pairs)
                        out.append((f"row pairs bn{block_n} pps{pps} la1 split{cfg.split_k}", replace(cfg, pairs=True)))
    for lanes, block_n in ((4, 256), (8, 128)):
        for pps in (8, 16):
            cfg = gemv_config(m, n, k, sms, block_n=block_n, warps=1, rows=4, pps=pps, lanes=lanes, lookahead=2)
            out.append((f"lanes{lanes} bn{block_n} pps{pps} la2 split{cfg.split_k}", cfg))
    return out


def planes_tma_candidates(m: int, n: int, k: int, sms: int) -> list[tuple[str, Config]]:
    """The nibble-plane tensor-core kernel with its words tile staged by TMA: 16-row tiles, 32 or 64 column blocks
    (2 or 4 warps), 64- or 128-row steps, 3-4 stages, per-step correction (dq=3) or folded (q - z) s (dq=4),
    split along K to fill one wave of the programs that registers (~255 a thread) and shared memory let reside."""
    out = []
    if m <= 16:
        shapes = [(16, bn8, warps, bk, stages, dq, 0) for bn8, warps in ((32, 2), (64, 4)) for bk in (64, 128)
                  for stages in (3, 4) for dq in (3, 4)]  # fmt: skip
        # the shipped tile capped at 168 registers (no spills in SASS): 12 resident warps per SM instead of 8
        shapes += [(16, 32, 2, 64, stages, 4, 168) for stages in (3, 4)]
    else:  # larger row tiles: folded (q - z) s only (the per-step correction grows with the row tile)
        shapes = [(bm, bn8, warps, 64, stages, 4, 0) for bm in (32, 64) if bm <= m
                  for bn8, warps in ((32, 2), (32, 4), (64, 4), (64, 8)) for stages in (3, 4)]  # fmt: skip
    for bm, bn8, warps, bk, stages, dq, maxnreg in shapes:
        cfg = planes_config(m, n, k, GROUP, sms, fold=dq == 4, block_m=bm, bn8=bn8, warps=warps, stages=stages,
                            block_k=bk, maxnreg=maxnreg, tma=True)  # fmt: skip
        label = f"planes_tma dq{dq} bm{bm} bn8{bn8} w{warps} bk{bk} st{stages}{f' reg{maxnreg}' if maxnreg else ''}"
        out.append((f"{label} split{cfg.split_k}", cfg))
    return out


def planes_xa_candidates(m: int, n: int, k: int, sms: int) -> list[tuple[str, Config]]:
    """The nibble-plane kernel with ``x`` as the MMA's left operand (one unpack per 64- or 128-row tile, wgmma):
    64-row tiles on one warpgroup or 128-row tiles on two, 16 or 32 column blocks, 64- or 128-row steps, 2-4
    stages, TMA or cp.async staging, split along K to fill one wave (configurations that spill in SASS left out)."""
    if m < 32:
        return []
    # (rows, column blocks, warps, step, stages, registers): SASS of Triton 3.6 for sm_90, 64-row steps (128 spill):
    # 255 registers for 32 column blocks (2 four-warp programs per SM), 168 for 16 (3 per SM); 8 warps: 177 for a
    # 64-row tile of 32 column blocks (two warpgroups of 128 columns), 255 for 64 column blocks
    shapes = [(64, 32, 4, 64, 3, 0), (64, 32, 4, 64, 2, 0), (64, 16, 4, 64, 3, 168), (64, 16, 4, 64, 4, 168),
              (64, 32, 8, 64, 3, 0), (64, 64, 8, 64, 3, 0), (128, 32, 8, 64, 3, 0), (128, 32, 8, 64, 2, 0),
              (128, 16, 8, 64, 3, 0)]  # fmt: skip
    out = []
    for bm, bn8, warps, bk, stages, regs in shapes:
        for tma in (True, False) if (bm, bn8, stages) == (64, 32, 3) else (True,):
            cfg = planes_config(m, n, k, GROUP, sms, fold=True, block_m=bm, bn8=bn8, warps=warps, stages=stages,
                                block_k=bk, maxnreg=regs, tma=tma, x_operand=True)  # fmt: skip
            label = f"planes_xa bm{bm} bn8{bn8} w{warps} bk{bk} st{stages}{' tma' if tma else ''}"
            out.append((f"{label} split{cfg.split_k}", cfg))
            if (bm, bn8, stages, tma) == (64, 32, 3, True) and k // bk >= 8 * cfg.split_k:  # twice the wave's split
                out.append((f"{label} split{2 * cfg.split_k}", replace(cfg, split_k=2 * cfg.split_k)))
    return out


def session8_rule(m: int, n: int, k: int, sms: int) -> list[tuple[str, Config]]:
    """What :func:`pick_config` chose for 2 <= M <= 16 before the TMA-staged plane kernel (session 9), as a
    candidate: the A/B of the rule change on any shape."""
    return [("session8 rule", small_m_without_tma(m, n, k, GROUP, sms))] if 2 <= m <= 16 else []


def session10_rule(m: int, n: int, k: int, sms: int) -> list[tuple[str, Config]]:
    """What :func:`pick_config` chose for 33 <= M <= 128 before the x-operand kernel was dispatched (session 11), as
    a candidate: the A/B of that rule change on any shape."""
    if not 32 < m <= 128:
        return []
    wide = n >= WIDE_N
    if m <= 64 and wide:  # v3's cp.async (q - z) s kernel, 64x64 tiles
        tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
        split = _split_for(tiles, k // 128, sms, 2)
        cfg = Config("gemm", block_m=64, block_n=64, block_k=128, split_k=split, num_warps=4, stages=4, swap=False,
                     dq=0)  # fmt: skip
    elif m <= 64 or wide:
        cfg = planes_config(m, n, k, GROUP, sms, fold=True, block_m=32, bn8=32, warps=2)
    else:
        cfg = Config("dequant")
    return [("session10 rule", cfg)]


def sweep_jobs(shapes, sms: int, ms=SWEEP_MS) -> list[tuple]:
    """(name, K, N, M, Config, label): the shipped :func:`pick_config` ("base", timed three times spread over the
    shape's jobs, whose spread is the noise) against the GEMV candidates (M <= 2) and the TMA-staged nibble-plane
    kernel (M <= 16)."""
    jobs = []
    for name, k, n in shapes:
        for m in ms:
            base = pick_config(m, n, k, GROUP, sms)
            cands = (gemv_candidates(m, n, k, sms) if m <= 2 else []) + session8_rule(m, n, k, sms)
            cands += session10_rule(m, n, k, sms)
            # from M = 32 the row-tile kernels: x as the MMA's left operand (session 10; the swapped plane kernel's
            # TMA tiles there were swept in session 9)
            cands += planes_tma_candidates(m, n, k, sms) if m <= 16 else planes_xa_candidates(m, n, k, sms)
            third = max(1, len(cands) // 3)
            for i, (label, cfg) in enumerate(cands):
                if i % third == 0:
                    jobs.append((name, k, n, m, base, "base"))
                jobs.append((name, k, n, m, cfg, label))
    return jobs


def warm_jobs(configs) -> list[tuple]:
    """Distinct compilations behind ``configs`` [(Config, M, K, N)], as (Config, M, K, N) stand-ins for
    :func:`_warm_worker`.

    A compiled kernel depends on the constexprs (tiles, warps, stages, whether split-K writes a workspace, the GEMV's
    rows and the rows of its group chunk, which follow from the split) and on divisibility by 16 of K and N, which
    every benchmark shape shares."""
    seen, jobs = set(), []
    for cfg, m, k, n in configs:
        gemv_kernel = cfg.kernel == "gemv"
        chunk = k_slices(k, GROUP, cfg.split_k, cfg.rows * cfg.lanes)[0] if gemv_kernel else 0
        mcls = m if gemv_kernel and m <= 8 else 1
        width = n if gemv_kernel else 512  # the GEMV compiles the row length in
        key = (replace(cfg, split_k=min(cfg.split_k, 2)), mcls, min(chunk, GROUP), width)
        if key not in seen:
            seen.add(key)
            jobs.append((cfg if gemv_kernel else key[0], max(mcls, 1 if cfg.kernel != "gemm" else 16), k, width))
    return jobs


def sweep(jobs, log, deadline: float) -> list[dict]:
    """Time every job; the data the dispatcher's rules were written from."""
    out = []
    by_shape = {}
    for j in jobs:
        by_shape.setdefault((j[0], j[1], j[2]), []).append(j)
    for i, ((name, k, n), js) in enumerate(by_shape.items()):
        shape_deadline = time.time() + (deadline - time.time()) / (len(by_shape) - i)  # equal share per shape
        qw, qz, sc = random_awq(k, n, GROUP)
        ncopy = copies_for(weight_bytes(k, n, GROUP))
        copies = [(qw, qz, sc)] + [(qw.clone(), qz.clone(), sc.clone()) for _ in range(ncopy - 1)]
        caches = [{} for _ in copies]  # each copy's converted scales, as a layer's KernelState keeps them
        w = fmt.dequantize(qw, qz, sc, GROUP, torch.float32)
        xs, refs = {}, {}
        best, base = {}, {}
        for _, _, _, m, cfg, label in js:
            if time.time() > shape_deadline:
                log(f"  sweep {name}: deadline reached, stopping")
                break
            if m not in xs:  # one activation and its float reference per M (setdefault would build them per job)
                xs[m] = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                refs[m] = xs[m].float() @ w
            x, ref = xs[m], refs[m]
            try:
                err = rel_err(run_config(cfg, x, qw, qz, sc, GROUP, scales_cache=caches[0]), ref)
                calls = [lambda c=c, d=d, cfg=cfg, x=x: run_config(cfg, x, *c, GROUP, scales_cache=d)
                         for c, d in zip(copies, caches)]  # fmt: skip
                us = time_calls(calls, target_ms=2.0, replays=7)
            except Exception as e:  # a config that does not compile (e.g. too much shared memory) is skipped
                log(f"  sweep {name} M={m} {label}: {type(e).__name__}: {str(e)[:120]}")
                continue
            if not err < 1.2e-2:
                log(f"  FAIL sweep {name} M={m} {label}: rel err {err:.2e}")
            out.append(dict(name=name, K=k, N=n, M=m, label=label, us=us, rel_err=err, config=str(cfg)))
            if label == "base":
                base[m] = min(base.get(m, float("inf")), us)
            else:
                best[m] = min(best.get(m, (float("inf"), "")), (us, label))
        for m, (us, label) in sorted(best.items()):
            b = base.get(m, float("nan"))
            log(f"  sweep {name:16s} M={m:5d} base {b:8.2f}  best {us:8.2f} us  x{b / us:4.2f}  {label}")
        del copies, w, refs
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------------- benchmark
def benchmark(shapes, ms, log) -> list[dict]:
    rows = []
    for name, k, n in shapes:
        torch.manual_seed(0)
        qw, qz, sc = random_awq(k, n, GROUP)
        wbytes = weight_bytes(k, n, GROUP)
        layers = []
        for i in range(copies_for(wbytes)):
            c = (qw, qz, sc) if i == 0 else (qw.clone(), qz.clone(), sc.clone())
            layer = AWQLinear.from_packed(*c, GROUP)
            layer.prepare_for_kernels()
            layers.append(layer)
        w_bf16 = fmt.dequantize(qw, qz, sc, GROUP, torch.float32).t().contiguous().to(torch.bfloat16)  # [N, K]
        dense = [w_bf16] + [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2) - 1)]
        try:
            packed, sz = int4_setup(qw, qz, sc, GROUP)
            i4 = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies_for(wbytes) - 1)]
        except Exception as e:
            log(f"  torch int4 unavailable for {name}: {type(e).__name__}: {e}")
            i4 = None
        for m in ms:
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            ref = x.float() @ w_bf16.float().t()
            y = layers[0](x)
            err = rel_err(y, ref)
            calls = [lambda lay=lay, x=x: lay(x) for lay in layers]
            awq_us = time_calls(calls)
            set_pdl(0)  # the same kernels launched the ordinary way: what programmatic dependent launch gains
            nopdl_us = time_calls(calls)
            set_pdl(None)
            cublas_us = time_calls([lambda w=w, x=x: F.linear(x, w) for w in dense])
            int4_us, int4_err = None, None
            if i4 is not None:
                try:
                    int4_err = rel_err(int4_mm(x, *i4[0], GROUP), ref)
                    if int4_err < 2e-2:
                        int4_us = time_calls([lambda p=p, s=s, x=x: int4_mm(x, p, s, GROUP) for p, s in i4])
                except Exception as e:  # e.g. an M the kernel rejects
                    log(f"  torch int4 {name} M={m}: {type(e).__name__}: {str(e)[:100]}")
            cfg = pick_config(m, n, k, GROUP, sm_count(x.device))
            gbps = (wbytes + 2 * m * (k + n)) / (awq_us * 1e-6) / 1e9
            row = dict(name=name, K=k, N=n, M=m, awqkit_us=round(awq_us, 3), cublas_bf16_us=round(cublas_us, 3),
                       torch_int4_us=None if int4_us is None else round(int4_us, 3), awqkit_GBps=round(gbps, 1),
                       awqkit_no_pdl_us=round(nopdl_us, 3),
                       awqkit_rel_err=err, torch_int4_rel_err=int4_err, config=str(cfg))  # fmt: skip
            rows.append(row)
            i4s = f"{int4_us:9.2f}" if int4_us is not None else "     null"
            log(f"  {name:16s} M={m:5d} awqkit {awq_us:9.2f} (no PDL {nopdl_us:8.2f})  cublas {cublas_us:9.2f}  "
                f"int4 {i4s}  x{cublas_us / awq_us:5.2f}  {gbps:6.0f} GB/s  err {err:.1e}  {cfg}")  # fmt: skip
        del layers, dense, i4
        torch.cuda.empty_cache()
    return rows


def summarize(rows, shapes, log) -> dict:
    names = [s[0] for s in shapes]
    summary = {}
    for m in sorted({r["M"] for r in rows}):
        rs = [r for r in rows if r["M"] == m and r["name"] in names]
        if len(rs) != len(names):
            continue
        a = sum(r["awqkit_us"] for r in rs)
        c = sum(r["cublas_bf16_us"] for r in rs)
        i4 = None if any(r["torch_int4_us"] is None for r in rs) else sum(r["torch_int4_us"] for r in rs)
        a0 = sum(r["awqkit_no_pdl_us"] for r in rs)
        summary[m] = dict(awqkit_us=a, cublas_us=c, int4_us=i4, speedup=c / a, vs_int4=None if i4 is None else i4 / a,
                          awqkit_no_pdl_us=a0, speedup_no_pdl=c / a0)  # fmt: skip
        per = " ".join(f"{r['name']}:{r['cublas_bf16_us'] / r['awqkit_us']:.2f}" for r in rs)
        i4s = f"{i4:8.1f} (x{i4 / a:4.2f})" if i4 is not None else "    null"
        log(f"M={m:5d} sum awqkit {a:8.1f} us (no PDL {a0:8.1f})  cublas {c:8.1f} us  x{c / a:5.2f}  int4 {i4s}  "
            f"[{per}]")
    return summary


def plot(rows, shapes, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, _, _ in shapes:
        rs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["M"])
        ax.plot([r["M"] for r in rs], [r["cublas_bf16_us"] / r["awqkit_us"] for r in rs], "o-", label=f"awqkit {name}")
        ri = [r for r in rs if r["torch_int4_us"]]
        ax.plot([r["M"] for r in ri], [r["cublas_bf16_us"] / r["torch_int4_us"] for r in ri], "x--", alpha=0.5,
                label=f"torch int4 {name}")  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("M (tokens)")
    ax.set_ylabel("speedup vs bf16 cuBLAS")
    ax.set_title(f"W4A16 g{GROUP}, {torch.cuda.get_device_name()}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep", action="store_true", help="also time many tile configs (tuning data)")
    ap.add_argument("--sweep-seconds", type=float, default=240)
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--extra-shapes", action="store_true", help="also benchmark shapes the rules were not tuned on")
    ap.add_argument("--heldout-only", action="store_true", help="only the held-out shapes (Qwen2.5-14B, -1.5B)")
    ap.add_argument("--new-heldout-only", action="store_true",
                    help="only session 11's held-out shapes (Qwen3-8B, Llama-3.2-3B, Qwen3-4B)")  # fmt: skip
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--sweep-ms", default=",".join(map(str, SWEEP_MS)), help="M values the sweep times")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "kernels_log.txt"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    t_start = time.time()
    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    log(f"int4 schema: {torch.ops.aten._convert_weight_to_int4pack.default._schema}")
    sms = sm_count(torch.device(DEV))
    ms = [int(v) for v in args.ms.split(",")]
    if args.new_heldout_only:
        shapes = NEW_HELDOUT_SHAPES
    elif args.heldout_only:
        shapes = HELDOUT_SHAPES
    else:
        shapes = SHAPES + (EXTRA_SHAPES if args.extra_shapes else [])
    models = [shapes[i : i + 4] for i in range(0, len(shapes), 4)]  # four layers a model
    jobs = sweep_jobs(shapes, sms, [int(v) for v in args.sweep_ms.split(",")]) if args.sweep else []
    # compile everything the run will time in parallel processes first (Triton's disk cache is shared), and run
    # the correctness checks there too: compilation, not the GPU, is the long part of a fresh machine's run
    configs = [(j[4], j[3], j[1], j[2]) for j in jobs]
    if not args.no_bench:
        configs += [(pick_config(m, n, k, GROUP, sms), m, k, n) for _, k, n in shapes for m in ms]
    warm = warm_jobs(configs)
    chunks = [warm[i :: args.workers] for i in range(args.workers)]
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        checks = pool.map_async(_check_worker, [(g, d) for g in (32, 64, 128) for d in ("float16", "bfloat16")])
        warmed = pool.map_async(_warm_worker, chunks)
        check_results = [r for part in checks.get() for r in part]
        log(f"compiled {sum(warmed.get())} configs in workers")
    log(f"checks + compilation done in {time.time() - t_start:.0f} s")
    checks_ok = summarize_checks(check_results, log)
    graph_ok = check_graph_capture(log) and check_pdl_chain(log)
    copy_gbps = copy_bandwidth()
    log(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    ok = checks_ok and graph_ok
    if not args.no_bench:
        rows = benchmark(shapes, ms, log)
        bad = [r for r in rows if not r["awqkit_rel_err"] < 1.2e-2]
        for r in bad:
            log(f"  FAIL benchmark output {r['name']} M={r['M']} rel err {r['awqkit_rel_err']:.2e} {r['config']}")
        ok &= not bad
        summary = summarize(rows, models[0], log)
        for model in models[1:]:
            summarize(rows, model, log)
        doc = dict(**meta, rows=rows, group_size=GROUP, copy_GBps=round(copy_gbps, 1), correctness_ok=ok,
                   summary={str(k): v for k, v in summary.items()})  # fmt: skip
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(doc, f, indent=1)
        plot(rows, models[0], os.path.join(args.out, "kernels_speedup.png"))
    if args.sweep:  # after the benchmark (a deadline never cuts it): tuning data for the next version
        sw = sweep(jobs, log, time.time() + args.sweep_seconds)
        with open(os.path.join(args.out, "kernels_sweep.json"), "w") as f:
            json.dump(dict(**meta, group_size=GROUP, rows=sw), f)
        log(f"sweep done at {time.time() - t_start:.0f} s")
    log(f"total {time.time() - t_start:.0f} s; correctness {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
