"""Triton W4A16 kernels (issue 6) on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Small shapes (the interpreter runs every program in Python), random data that is never zero, compared with the float
reference ``x @ gemm.dequantize(...)`` by relative error: every path (GEMV with and without split-K, sub-group
split-K, tensor-core GEMM in both dequantization forms and both operand orders, dequantize + matmul, the
dispatcher and ``kernels.awq_linear``), fp16 and bf16, group sizes 32/64/128, odd M, N not a multiple of the block,
leading batch dims and bias. The GPU-only inline-PTX variant is checked by ``benchmarks/kernels.py`` on the device.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates anything

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from awqkit.formats import gemm as fmt  # noqa: E402


def _kernel_modules():
    """awqkit.kernels with its @triton.jit functions built for the interpreter (re-imported if another test module
    imported them earlier without TRITON_INTERPRET)."""
    import awqkit.kernels as kernels

    gemv_mod = sys.modules["awqkit.kernels.gemv"]
    if type(gemv_mod._gemv_kernel).__name__ != "InterpretedFunction":
        for name in ("common", "gemv", "gemm", "dequant", "dispatch"):
            importlib.reload(sys.modules[f"awqkit.kernels.{name}"])
        kernels = importlib.reload(kernels)
    return kernels


K = _kernel_modules()
from awqkit.kernels.dispatch import Config, pick_config, run_config  # noqa: E402
from awqkit.nn import AWQLinear  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def _awq(k: int, n: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    intweight = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen)
    scales = torch.rand(n, k // g, generator=gen) * 0.02 + 0.001
    return fmt.pack_linear(intweight, zeros, scales)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all()
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def _check(cfg: Config, m: int, k: int, n: int, g: int, dtype: torch.dtype, bias: bool, seed: int = 0) -> None:
    qw, qz, sc = _awq(k, n, g, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.randn(n).half() if bias else None
    ref = x.double() @ fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    if b is not None:
        ref = ref + b.double()
    y = run_config(cfg, x, qw, qz, sc, g, b)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel(y, ref) < TOL[dtype], (cfg, m, k, n, g, dtype, _rel(y, ref))


# (config, M, K, N): N = 8 * odd, never a multiple of the block
PATHS = {
    "gemv": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=1), 1, 128, 200),
    "gemv_splitk": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=2), 3, 128, 72),
    "gemv_subgroup_splitk": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=16), 2, 64, 40),
    "gemv_even_n": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=2), 1, 128, 512),  # unmasked loads
    "gemv_runtime_n": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=2, specialize_n=False), 2, 128, 200),
    # row GEMV unpacking two nibbles per rotated word: several chunks a slice, sub-group slices, four rows
    "gemv_pairs": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=1, pairs=True), 1, 512, 200),
    "gemv_pairs_subgroup": (Config("gemv", block_n=256, num_warps=1, rows=8, split_k=16, pairs=True), 4, 256, 520),
    # lane-split GEMV: 4 or 8 rows per step over the lanes; one group chunk per slice, or several
    "gemv_lanes": (Config("gemv", block_n=256, num_warps=1, split_k=2, lanes=4, lookahead=2), 1, 256, 200),
    "gemv_lanes_chunks": (Config("gemv", block_n=128, num_warps=1, split_k=1, lanes=8), 2, 256, 136),
    "gemv_lanes_even_n": (Config("gemv", block_n=256, num_warps=1, split_k=4, lanes=4), 1, 256, 512),
    "gemm_one_plus_swap": (Config("gemm", block_m=16, block_n=64, split_k=2), 5, 128, 136),
    "gemm_one_plus": (Config("gemm", block_m=16, block_n=64, split_k=1, swap=False), 17, 128, 72),
    "gemm_dq0": (Config("gemm", block_m=16, block_n=64, block_k=32, split_k=2, swap=False, dq=0), 7, 128, 136),
    "gemm_dq0_swap": (Config("gemm", block_m=16, block_n=64, block_k=64, swap=True, dq=0), 33, 128, 72),
    "dequant_matmul": (Config("dequant"), 19, 128, 136),
    # nibble-plane kernel: per-step correction (dq=3) and folded (q - z) s (dq=4); block_n = 8 x column blocks
    "planes_corr_splitk": (
        Config("gemm", block_m=16, block_n=128, block_k=64, split_k=2, num_warps=1, dq=3),
        5,
        256,
        200,
    ),
    "planes_corr": (Config("gemm", block_m=16, block_n=256, block_k=64, split_k=1, num_warps=2, dq=3), 17, 128, 72),
    "planes_fold_splitk": (
        Config("gemm", block_m=32, block_n=128, block_k=64, split_k=3, num_warps=1, dq=4),
        33,
        256,
        136,
    ),
    "planes_fold": (Config("gemm", block_m=64, block_n=512, block_k=32, split_k=1, num_warps=8, dq=4), 7, 128, 40),
    # the words tile through TMA (N % 32 == 0)
    "planes_corr_tma": (
        Config("gemm", block_m=16, block_n=256, block_k=64, split_k=2, num_warps=2, stages=3, dq=3, tma=True),
        3,
        256,
        224,
    ),
    "planes_fold_tma": (
        Config("gemm", block_m=32, block_n=128, block_k=32, split_k=1, num_warps=1, stages=2, dq=4, tma=True),
        19,
        128,
        160,
    ),
    # x as the MMA's left operand, the folded planes its right one: row tiles walked M fastest, split-K, TMA
    "planes_xa_splitk": (
        Config("gemm", block_m=32, block_n=128, block_k=32, split_k=2, num_warps=4, stages=2, dq=4, swap=False),
        70,
        128,
        136,
    ),
    "planes_xa_tma": (
        Config("gemm", block_m=64, block_n=128, block_k=64, split_k=1, num_warps=4, stages=3, dq=4, swap=False,
               tma=True),  # fmt: skip
        33,
        128,
        224,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path(path, dtype):
    cfg, m, k, n = PATHS[path]
    g = {"gemv": 32, "gemv_splitk": 64, "gemm_one_plus": 64, "planes_corr_splitk": 128, "planes_fold_splitk": 64}.get(
        path, 32 if "dq0" in path or path.startswith("planes") else 128
    )
    if k % g:
        g = 32
    _check(cfg, m, k, n, g, dtype, bias=path.endswith("swap") or path.startswith("gemv"))


def test_tma_path_takes_a_misaligned_weight():
    """A qweight view whose base is not 16-byte aligned (TMA's requirement) still runs the dispatcher's TMA config,
    through the cp.async staging, and matches the reference."""
    k, n, g = 256, 224, 64
    qw, qz, sc = _awq(k, n, g, 31)
    storage = torch.empty(qw.numel() + 1, dtype=qw.dtype)
    shifted = storage[1:].view(k, n // 8)  # 4 bytes past an aligned base
    shifted.copy_(qw)
    assert shifted.data_ptr() % 16 != 0
    cfg = pick_config(4, n, k, g, 132)
    assert cfg.tma
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(32)).to(torch.bfloat16)
    ref = x.double() @ fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    assert _rel(run_config(cfg, x, shifted, qz, sc, g), ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gemv_pairs_keeps_fp32_sums(dtype):
    """The two-nibbles-per-rotation unpack puts half the nibbles 2**-8 below the activation part of each fp32 sum: its
    split-K partials (before any rounding to the activation dtype) stay within 2e-5 of the float64 reference, against
    ~2e-3 for the bf16 rounding of the output, on activations with outlier channels."""
    k, n, g = 1024, 256, 64
    qw, qz, sc = _awq(k, n, g, 21)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(22))
    x[0, ::37] *= 30  # salient channels, as AWQ sees them
    x = x.to(dtype)
    ref = x.double() @ fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    cfg = Config("gemv", block_n=256, num_warps=1, rows=8, split_k=4, pairs=True)
    parts = run_config(cfg, x, qw, qz, sc, g, partials=True).parts
    assert parts.dtype == torch.float32 and parts.shape[0] > 1
    assert _rel(parts.double().sum(0), ref) < 2e-5


@pytest.mark.parametrize("g", [32, 64, 128])
def test_group_sizes(g):
    _check(Config("gemv", block_n=256, num_warps=1, rows=8, split_k=2), 1, 256, 40, g, torch.bfloat16, True, g)
    _check(Config("gemm", block_m=16, block_n=64, split_k=2), 3, 256, 56, g, torch.float16, False, g)
    _check(Config("gemm", block_m=16, block_n=64, block_k=64, dq=0), 2, 256, 56, g, torch.bfloat16, True, g)
    _check(Config("gemm", block_m=16, block_n=128, block_k=64, split_k=2, num_warps=1, dq=3), 4, 256, 72, g,
           torch.bfloat16, True, g)  # fmt: skip
    _check(Config("gemm", block_m=32, block_n=128, block_k=64, split_k=2, num_warps=1, dq=4), 9, 256, 72, g,
           torch.float16, False, g)  # fmt: skip


def test_dequantize_matches_format():
    qw, qz, sc = _awq(128, 72, 32, 3)
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(K.dequantize(qw, qz, sc, 32, dtype), fmt.dequantize(qw, qz, sc, 32, dtype))
    # bf16: one ulp (Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest)
    w, ref = K.dequantize(qw, qz, sc, 32, torch.bfloat16).float(), fmt.dequantize(qw, qz, sc, 32, torch.float32)
    assert torch.allclose(w, ref, rtol=2**-7, atol=0)


def test_awq_linear_leading_dims_and_bias():
    """The module entry point: [batch, seq, K] input, bias, output in x's dtype and shape."""
    qw, qz, sc = _awq(128, 72, 64, 4)
    bias = torch.randn(72).half()
    layer = AWQLinear.from_packed(qw, qz, sc, 64, bias)
    layer._kernel_state = K.prepare(layer)
    for shape in [(1, 1, 128), (2, 3, 128)]:
        x = torch.randn(*shape).bfloat16()
        y = K.awq_linear(x, layer)
        assert y.shape == (*shape[:-1], 72) and y.dtype == torch.bfloat16
        ref = layer._reference_forward(x.double()).double()
        assert _rel(y, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("path", ["gemv_splitk", "planes_fold_splitk", "gemm_dq0", "gemv", "dequant_matmul"])
def test_partials_sum_to_the_output(path):
    """``partials=True`` leaves the split-K sums (and the bias) to the consumer: their total is the finished output;
    unsplit paths hand over the output itself as one part."""
    cfg, m, k, n = PATHS[path]
    qw, qz, sc = _awq(k, n, 32, 5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6)).bfloat16()
    b = torch.randn(n).bfloat16()
    y = run_config(cfg, x, qw, qz, sc, 32, b)
    p = run_config(cfg, x, qw, qz, sc, 32, b, partials=True)
    split = cfg.split_k > 1
    assert p.parts.shape == ((p.parts.shape[0], m, n)) and (p.parts.shape[0] > 1) == split
    assert p.parts.dtype == (torch.float32 if split else torch.bfloat16) and (p.bias is b if split else p.bias is None)
    assert _rel(p.total(torch.bfloat16), y.double()) < 1e-2 if split else torch.equal(p.total(torch.bfloat16), y)
    layer = AWQLinear.from_packed(qw, qz, sc, 32, b)
    layer._kernel_state = K.prepare(layer)
    pl = K.awq_linear(x.reshape(1, m, k), layer, partials=True)
    assert pl.parts.shape[1:] == (1, m, n)


def test_prepare_keeps_checkpoint_tensors():
    """No repack: prepare() keeps AutoAWQ's tensors (bit for bit) and state_dict() stays a checkpoint."""
    qw, qz, sc = _awq(64, 16, 32, 5)
    layer = AWQLinear.from_packed(qw, qz, sc, 32)
    state = K.prepare(layer)
    assert torch.equal(state.qweight, qw) and torch.equal(state.qzeros, qz) and torch.equal(state.scales, sc)
    sd = layer.state_dict()
    assert torch.equal(sd["qweight"], qw) and torch.equal(sd["qzeros"], qz) and torch.equal(sd["scales"], sc)


def test_dispatch_rules():
    """Every M bucket maps to a kernel; the shapes are arbitrary (no lookup table) and N may be odd."""
    kinds = {pick_config(m, 3592, 4096, 128, 132).kernel for m in (1, 2, 4, 8, 16, 32, 64, 128, 4096)}
    assert kinds == {"gemv", "gemm", "dequant"}
    for m in (2, 5, 16, 17, 40, 64, 100):  # split-K slices keep >= 4 whole steps of one group; programs: one wave
        for k, n, g in [(3584, 4608, 128), (18944, 3584, 128), (4096, 28672, 64), (512, 1000, 32), (14336, 4096, 128)]:
            cfg = pick_config(m, n, k, g, 132)
            if cfg.kernel == "gemm" and cfg.dq >= 3:
                assert g % cfg.block_k == 0 and cfg.split_k <= max(1, k // cfg.block_k // 4), (m, k, n, g, cfg)
                tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
                per_sm = 65536 // (cfg.maxnreg * 32 * cfg.num_warps) if cfg.maxnreg else 8 // cfg.num_warps
                slots = 132 * per_sm
                assert cfg.split_k == 1 or tiles * cfg.split_k <= slots, (m, k, n, g, cfg)
    cfg = pick_config(1, 1000, 256, 64, 132)
    assert cfg.kernel == "gemv" and cfg.split_k >= 1


def test_dispatch_end_to_end_small():
    """awq_matmul picks and runs a kernel for odd M on a small layer."""
    qw, qz, sc = _awq(128, 40, 32, 6)
    w = fmt.dequantize(qw, qz, sc, 32, torch.float32).double()
    for m in (1, 3, 9):
        x = torch.randn(m, 128).half()
        assert _rel(K.awq_matmul(x, qw, qz, sc, 32), x.double() @ w) < TOL[torch.float16]


@pytest.mark.parametrize("m", [1, 2])
def test_dispatch_wide_layer_gemvs(m):
    """M = 1 and 2 on a wide layer (N >= 16384, an odd multiple of 8, so no TMA): the row GEMV with its L2
    look-ahead, and the lane-split GEMV, as the dispatcher picks them, against the float reference."""
    k, n, g = 32, 16392, 32
    cfg = pick_config(m, n, k, g, 132)
    assert cfg.kernel == "gemv" and (cfg.lanes, cfg.lookahead) == ((1, 1) if m == 1 else (4, 2))
    _check(cfg, m, k, n, g, torch.bfloat16, bias=True, seed=11)


def test_dispatch_pairs_and_register_cap_rules():
    """M = 1 unpacks two nibbles per rotated word on layers of >= 8M weights only; at 2 <= M <= 16 the plane tile is
    capped at 168 registers only on wide layers where the extra resident programs add K splits."""
    assert pick_config(1, 4608, 3584, 128, 132).pairs and pick_config(1, 37888, 3584, 128, 132).pairs
    assert not pick_config(1, 2048, 1536, 128, 132).pairs  # 3M weights: launch and tail dominate
    for m in (2, 8, 16):
        capped = pick_config(m, 37888, 3584, 128, 132)
        assert capped.maxnreg == 168 and capped.split_k > 3, capped  # 3 splits fill the uncapped wave
        assert pick_config(m, 17920, 1536, 128, 132).maxnreg == 0  # wide, but the split is bound by K steps
        assert pick_config(m, 3584, 18944, 128, 132).maxnreg == 0  # narrow


def test_x_operand_takes_misaligned_scales(monkeypatch):
    """A scales view whose base is not 4-byte aligned (the x-operand kernel reads scale pairs as 32-bit words)
    still runs, through the weight-operand kernel, and matches the reference."""
    gemm_mod = sys.modules["awqkit.kernels.dispatch"].gemm  # the module run_config calls
    launched = []

    def spy(*args, x_operand=False, **kwargs):
        launched.append(x_operand)
        return real(*args, x_operand=x_operand, **kwargs)

    real = gemm_mod.gemm_planes
    monkeypatch.setattr(gemm_mod, "gemm_planes", spy)
    k, n, g = 256, 224, 64
    qw, qz, sc = _awq(k, n, g, 32)
    storage = torch.empty(sc.numel() + 1, dtype=sc.dtype)
    shifted = storage[1:].view(sc.shape)  # 2 bytes past an aligned base
    shifted.copy_(sc)
    x = torch.randn(40, k).to(torch.bfloat16)
    ref = x.double() @ fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    cfg = Config("gemm", block_m=64, block_n=128, block_k=64, split_k=2, num_warps=4, stages=3, dq=4, swap=False)
    assert shifted.data_ptr() % 4
    assert _rel(run_config(cfg, x, qw, qz, shifted, g), ref) < TOL[torch.bfloat16]
    assert launched == [False]  # the weight-operand kernel, not the x-operand one
    assert _rel(run_config(cfg, x, qw, qz, sc, g), ref) < TOL[torch.bfloat16] and launched == [False, True]


@pytest.mark.parametrize("m", [2, 5, 16])
def test_dispatch_small_m_tma(m):
    """2 <= M <= 16 with N a multiple of 32: the folded nibble-plane kernel with its words staged by TMA, as the
    dispatcher picks it (split along K), against the float reference, fp16 and bf16."""
    k, n, g = 1024, 224, 64
    cfg = pick_config(m, n, k, g, 132)
    assert (cfg.kernel, cfg.dq, cfg.tma, cfg.block_m) == ("gemm", 4, True, 16) and cfg.split_k > 1
    for dtype in (torch.float16, torch.bfloat16):
        _check(cfg, m, k, n, g, dtype, bias=True, seed=12)


@pytest.mark.parametrize("m", [40, 100])
def test_dispatch_x_operand_with_converted_scales(m):
    """From M = 33 (to 64 on any layer, to 128 on deep ones, K > N) the dispatcher picks the x-operand kernel; an
    AWQLinear keeps AutoAWQ's fp16 scales and converts them once to bf16 activations' dtype for it (not for fp16
    activations, nor for the M = 1 GEMV, which reads the checkpoint's scales). Output against the float reference."""
    k, n, g = 512, 224, 64
    cfg = pick_config(m, n, k, g, 132)
    assert (cfg.kernel, cfg.dq, cfg.swap, cfg.block_m, cfg.tma) == ("gemm", 4, False, 64, True), cfg
    qw, qz, sc = _awq(k, n, g, 40 + m)
    layer = AWQLinear.from_packed(qw, qz, sc, g)
    layer._kernel_state = K.prepare(layer)
    w = fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    gen = torch.Generator().manual_seed(m)
    x1 = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    assert _rel(K.awq_linear(x1, layer), x1.double() @ w) < TOL[torch.bfloat16]
    assert layer._kernel_state.converted_scales == {}  # the GEMV: no copy
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(m, k, generator=gen).to(dtype)
        assert _rel(K.awq_linear(x, layer), x.double() @ w) < TOL[dtype]
    converted = layer._kernel_state.converted_scales
    assert list(converted) == [torch.bfloat16] and torch.equal(converted[torch.bfloat16][1], sc.to(torch.bfloat16))
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, sc)  # the checkpoint's tensor stays
    # new weights loaded in place (same storage, so the kernel state sees them): the copy follows
    qw2, qz2, sc2 = _awq(k, n, g, 99)
    layer.load_state_dict({"qweight": qw2, "qzeros": qz2, "scales": sc2})
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w2 = fmt.dequantize(qw2, qz2, sc2, g, torch.float32).double()
    assert _rel(K.awq_linear(x, layer), x.double() @ w2) < TOL[torch.bfloat16]
    assert torch.equal(converted[torch.bfloat16][1], sc2.to(torch.bfloat16))


def test_dispatch_x_operand_rule():
    """Where the x-operand kernel runs (33 <= M <= 64; M <= 128 on deep layers) and its column tile: 16 blocks,
    or 32 on a wide layer whose one wave they fill clearly better (Llama-3-8B gate_up, not Qwen2-7B's)."""
    qwen_gate_up, llama_gate_up, down, qkv = (37888, 3584), (28672, 4096), (3584, 18944), (4608, 3584)
    for m in (33, 64):
        for n, k in (qwen_gate_up, llama_gate_up, down, qkv):
            assert not pick_config(m, n, k, 128, 132).swap
        assert pick_config(m, *qwen_gate_up, 128, 132).block_n == 128
        assert pick_config(m, *llama_gate_up, 128, 132).block_n == 256
        assert pick_config(m, *down, 128, 132).block_n == 128
    for m in (65, 128):
        assert not pick_config(m, *down, 128, 132).swap  # deep
        assert not pick_config(m, *qwen_gate_up, 128, 132).swap  # wide, 592 tiles: 75 % of the second wave
        assert pick_config(m, *llama_gate_up, 128, 132).swap  # wide, 448 tiles: 13 %, the 32-row plane tile
        assert not pick_config(m, 6144, 4096, 128, 132).swap  # K >= 4096
        assert pick_config(m, *qkv, 128, 132).kernel == "dequant"
    assert pick_config(32, *down, 128, 132).swap and pick_config(129, *down, 128, 132).kernel == "dequant"


def test_converted_scales_of_inference_tensors():
    """The engine builds its layers under torch.inference_mode, whose tensors keep no version counter: the copy is
    made once and reused (session 11's first GPU server run failed here on ``_version``)."""
    from awqkit.kernels.dispatch import scales_for

    cfg = Config("gemm", block_m=64, block_n=128, block_k=64, dq=4, swap=False)
    with torch.inference_mode():
        scales = torch.rand(4, 16).half()
        x = torch.randn(40, 256).to(torch.bfloat16)
        cache: dict = {}
        first = scales_for(cfg, x, scales, cache)
        assert first.dtype == torch.bfloat16 and torch.equal(first, scales.to(torch.bfloat16))
        assert scales_for(cfg, x, scales, cache) is first
    assert scales_for(cfg, x, scales, cache) is first  # outside inference mode too
    assert scales_for(Config("gemm", dq=4), x, scales, cache) is scales  # the weight-operand kernel: no copy
