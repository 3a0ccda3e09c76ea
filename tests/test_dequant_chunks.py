"""Dequantize + cuBLAS in column chunks (kernels.dequant, issue 6) on the CPU through Triton's interpreter.

The chunked path dequantizes ``chunk_n`` columns at a time into one reused workspace and lets the GEMM write each
chunk's column slice of the output: against the float reference (the tolerance the one-pass path meets), against the
one-pass path (same weight bits, so equal up to the GEMM's rounding), with N neither a multiple of the chunk nor of
the kernel's 256-column block, fp16 and bf16, group sizes 32/64/128, with and without bias. Plus the L2 rule that
picks a chunk width, and the dispatcher's pass-through.
"""

from __future__ import annotations

import pytest
import torch

from awqkit.formats import gemm as fmt
from tests.test_kernels import TOL, K, _awq, _rel

# the kernel modules as test_kernels left them (built for the interpreter, reloaded if need be)
dequant, dispatch = K.dequant, K.dispatch
Config, dequant_config, pick_config, run_config = (
    dispatch.Config, dispatch.dequant_config, dispatch.pick_config, dispatch.run_config
)  # fmt: skip

EPS = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _problem(m: int, k: int, n: int, g: int, dtype: torch.dtype, bias: bool, seed: int):
    qw, qz, sc = _awq(k, n, g, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)).half() if bias else None
    ref = x.double() @ fmt.dequantize(qw, qz, sc, g, torch.float32).double()
    return qw, qz, sc, x, b, ref if b is None else ref + b.double()


# (group, K, N, chunk_n, bias): N = 8 * odd (520, 1000) or 8 more than a multiple of 256 (776); the last chunk
# narrower than the others and than one 256-column block, or several blocks with a ragged end
CASES = [
    (32, 64, 520, 256, True),  # chunks 256, 256, 8
    (64, 128, 1000, 512, False),  # 512, 488
    (128, 256, 776, 256, True),  # 256, 256, 256, 8
    (32, 96, 1000, 768, False),  # 768, 232; K = 3 blocks of 32
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("g,k,n,chunk,bias", CASES)
def test_chunked_matches_reference_and_one_pass(g, k, n, chunk, bias, dtype):
    qw, qz, sc, x, b, ref = _problem(5, k, n, g, dtype, bias, seed=g + n)
    whole = dequant.dequant_matmul(x, qw, qz, sc, g, b)
    y = dequant.dequant_matmul(x, qw, qz, sc, g, b, chunk_n=chunk)
    assert y.shape == (5, n) and y.dtype == dtype and y.is_contiguous()
    assert _rel(whole, ref) < TOL[dtype]
    assert _rel(y, ref) < TOL[dtype], (g, k, n, chunk, dtype, _rel(y, ref))
    # the same weight bits go into the GEMM: at most the output's rounding apart
    torch.testing.assert_close(y.float(), whole.float(), rtol=2 * EPS[dtype], atol=EPS[dtype] * whole.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunks_dequantize_to_the_same_bits(dtype):
    """Each chunk the kernel writes (column offset, chunk-wide row stride, masked ragged end) is bit for bit the
    matching column slice of the one-pass weight."""
    qw, qz, sc = _awq(64, 1000, 32, 7)
    whole = dequant.dequantize(qw, qz, sc, 32, dtype)
    for c0, cn in [(0, 512), (512, 488), (768, 232), (256, 8)]:
        w = torch.full((64, cn), float("nan"), dtype=dtype)
        dequant._dequant_into(w, qw, qz, sc, 32, c0, block_k=32, block_n=dequant.BLOCK_N, num_warps=4)
        assert torch.equal(w, whole[:, c0 : c0 + cn]), (c0, cn)


def test_chunk_zero_is_the_one_pass_path():
    """chunk_n = 0 (the default), a chunk as wide as N, and the L2 rule on a CPU are the old single pass, exactly."""
    qw, qz, sc, x, b, _ = _problem(3, 64, 520, 32, torch.bfloat16, True, seed=3)
    old = torch.addmm(b.to(x.dtype), x, dequant.dequantize(qw, qz, sc, 32, x.dtype))
    for chunk in (0, 520, 1024, dequant.L2_CHUNK):
        assert torch.equal(dequant.dequant_matmul(x, qw, qz, sc, 32, b, chunk_n=chunk), old), chunk
    assert torch.equal(dequant.dequant_matmul(x, qw, qz, sc, 32, None), x @ dequant.dequantize(qw, qz, sc, 32, x.dtype))
    with pytest.raises(AssertionError):
        dequant.dequant_matmul(x, qw, qz, sc, 32, b, chunk_n=100)  # not a multiple of the 256-column block


def test_dispatch_passes_chunk_n():
    """Config.chunk_n reaches dequant_matmul; the shipped rule still dequantizes in one pass; the proposed rule
    chunks from CHUNK_MIN_M rows on."""
    qw, qz, sc, x, b, ref = _problem(4, 64, 1000, 64, torch.float16, True, seed=5)
    y = run_config(Config("dequant", chunk_n=256), x, qw, qz, sc, 64, b)
    assert torch.equal(y, dequant.dequant_matmul(x, qw, qz, sc, 64, b, chunk_n=256))
    assert _rel(y, ref) < TOL[torch.float16]
    p = run_config(Config("dequant", chunk_n=256), x, qw, qz, sc, 64, b, partials=True)
    assert torch.equal(p.total(torch.float16), y)
    assert Config("dequant").chunk_n == 0 and pick_config(4096, 4608, 3584, 128, 132) == Config("dequant")
    lo = dispatch.CHUNK_MIN_M
    assert dequant_config(lo - 1).chunk_n == 0 and dequant_config(lo).chunk_n == dequant.L2_CHUNK


MIB = 2**20


@pytest.mark.parametrize(
    "k,n,l2,want",
    [
        (3584, 4608, 50 * MIB, 2304),  # H100/H200: 16.7 MB of bf16 per chunk / 7168 B per column, down to 256s
        (3584, 37888, 50 * MIB, 2304),
        (3584, 37888, 60 * MIB, 2816),
        (18944, 3584, 50 * MIB, 1024),  # 440 columns would fit: the 1024-column floor
        (18944, 1024, 50 * MIB, 0),  # the floor covers all of N: one pass
        (512, 1024, 50 * MIB, 0),  # the whole weight (1 MB) fits: one pass
        (3584, 4608, 0, 0),  # no L2 known
    ],
)
def test_l2_rule(k, n, l2, want):
    cols = dequant.chunk_for_l2(k, n, l2)
    assert cols == want
    assert cols == 0 or (cols % dequant.BLOCK_N == 0 and cols >= dequant.MIN_CHUNK_COLS and cols < n)
    assert cols == 0 or k * cols * 2 <= l2 // dequant.L2_SHARE or cols == dequant.MIN_CHUNK_COLS


def test_l2_rule_device():
    """No chunking on a CPU; fp16 and bf16 (2 bytes) pick the same width, fp32 a half as wide one."""
    assert dequant.l2_chunk_n(3584, 37888, torch.device("cpu"), torch.bfloat16) == 0
    assert dequant.chunk_for_l2(3584, 37888, 50 * MIB, 4) == 1024  # 1219 columns of fp32, down to 256s
    assert dequant.chunk_for_l2(1024, 37888, 50 * MIB, 4) == dequant.chunk_for_l2(2048, 37888, 50 * MIB, 2)
