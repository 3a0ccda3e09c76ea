"""The GPU's rotary + KV-write and SiLU kernels that finish the qkv / gate_up linears (:mod:`awqkit.engine.fused`),
run by Triton's interpreter against the model's PyTorch functions on :meth:`Partials.total`.

Data lie on a 2**-16 grid (finer than fp16 or bf16 resolve, coarse enough that the fp32 sum of the splits is exact
in any order): the kernel's total is then the reference's bit for bit, and what is compared is where (and how) it is
rounded and what is computed from it.
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")

from awqkit.engine import fused  # noqa: E402
from awqkit.engine import model as M  # noqa: E402
from awqkit.kernels.common import Partials  # noqa: E402

# splits, bias, tokens: the plain case (a finished output), fp32 partials with and without a bias, and more splits
# than a program loads in one step (the loop over steps and its masked last step)
CASES = [(1, False, 3), (1, True, 3), (3, False, 3), (3, True, 3), (130, True, 1)]
# the kernels' float32 maths against eager's in the activation dtype (bf16: the interpreter also rounds toward zero)
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def _grid(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale * 2**16).round() / 2**16


def _partials(splits: int, bias: bool, n: int, cols: int, dtype: torch.dtype, g: torch.Generator) -> Partials:
    """A linear's output ``[n, cols]`` as the kernels hand it on: fp32 splits (+ bias), or one split in ``dtype``."""
    if splits == 1 and not bias:
        return Partials(_grid(1, n, cols, g=g).to(dtype), None)
    # splits of about equal size whose total is about one: what a split-K GEMV leaves
    parts = _grid(splits, n, cols, g=g, scale=splits**-0.5)
    return Partials(parts, _grid(cols, g=g, scale=0.5).to(dtype) if bias else None)


def _rope_inputs(n: int, d: int, dtype: torch.dtype, qk_norm: bool, g: torch.Generator):
    angles = torch.rand(n, d // 2, generator=g) * 6.3
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    norms = [(torch.rand(d, generator=g) + 0.5).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    rows, positions = torch.tensor([4, 1, 5][:n]), torch.tensor([15, 0, 7][:n])
    return (cos, sin, *norms, 1e-6), rows, positions


def _cache(hkv: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(6, 2, hkv, 16, d, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("splits,bias,n", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_and_cache_finishes_the_qkv_linear(dtype, splits, bias, n, qk_norm):
    """Rotary + KV write on a GQA qkv output given as split-K partials: q, the written k/v rows and the rest of the
    cache as eager's ``rope_and_cache(Partials.total(dtype))``, with and without Qwen3's per-head norms."""
    g = torch.Generator().manual_seed(splits + 10 * n)
    H, Hkv, D = 4, 2, 64
    qkv = _partials(splits, bias, n, (H + 2 * Hkv) * D, dtype, g)
    args, rows, positions = _rope_inputs(n, D, dtype, qk_norm, g)
    total = qkv.total(dtype)
    q, k, v = (t.view(n, -1, D) for t in total.split([H * D, Hkv * D, Hkv * D], dim=-1))
    caches = [_cache(Hkv, D, dtype) for _ in range(3)]
    got = fused.rope_and_cache(qkv, H, Hkv, *args, caches[0], rows, positions)
    want = M.rope_and_cache(q, k, v, *args, caches[1], rows, positions)
    assert got.shape == (n, H, D) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[1], **TOL[dtype])  # the written rows and everything else
    if dtype != torch.bfloat16:  # (the interpreter truncates to bf16 where PyTorch rounds to nearest)
        # the total is rounded to the activation dtype before the rotary maths, as the unfused path rounds it:
        # exactly the result of the plain kernel on the finished output
        same = fused.rope_and_cache(Partials(total[None], None), H, Hkv, *args, caches[2], rows, positions)
        assert torch.equal(got, same) and torch.equal(caches[0], caches[2])


@pytest.mark.parametrize("splits,bias,n", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_finishes_the_gate_up_linear(dtype, splits, bias, n):
    """SiLU-and-multiply on a gate_up output given as split-K partials, 77 columns (not a multiple of any block):
    eager's ``silu_mul(Partials.total(dtype))`` up to one rounding of the result (eager also rounds the SiLU)."""
    g = torch.Generator().manual_seed(splits + 10 * n)
    inter = 77
    gate_up = _partials(splits, bias, n, 2 * inter, dtype, g)
    total = gate_up.total(dtype)
    got = fused.silu_mul(gate_up, dtype)
    want = M.silu_mul(total)
    assert got.shape == (n, inter) and got.dtype == dtype
    if dtype == torch.bfloat16:  # the interpreter truncates gate, up and the result: a few bf16 units apart
        torch.testing.assert_close(got, want, **TOL[dtype])
        return
    # eager: round(round(silu(gate)) * up); the kernel: round(silu(gate) * up) from the same rounded gate and up,
    # one unit in the last place apart at most
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want.float().abs()))).clamp_min(2**-24)
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert torch.equal(got, fused.silu_mul(Partials(total[None], None), dtype))


def test_linear_partials_of_a_finished_output():
    """Off the GPU kernels (a float Linear, a CPU AWQ layer) a linear hands on its output as the one split."""
    from awqkit.nn import AWQLinear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    linear = M.Linear(torch.randn(40, 64, generator=g), torch.randn(40, generator=g))
    p = M.linear_partials(linear, x)
    assert p.bias is None and p.parts.shape == (1, 3, 40) and torch.equal(p.parts[0], linear(x))
    qw = torch.randint(-(2**31), 2**31 - 1, (64, 5), generator=g, dtype=torch.int32)  # [K, N / 8]
    awq = AWQLinear.from_packed(qw, torch.zeros(2, 5, dtype=torch.int32), torch.rand(2, 40, generator=g), 32)
    p = M.linear_partials(awq, x)
    assert p.bias is None and torch.equal(p.parts[0], awq(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_check_keeps_the_partials_kernels(dtype):
    """The start-up self-check runs both kernels on split-K partials with a bias and keeps them when they agree."""
    ops = M.Ops(compile=False, fused_norm=True, fused_partials=True)
    ops.check(torch.device("cpu"), dtype)
    assert ops.partials and ops.rope_and_cache is fused.rope_and_cache and ops.silu_mul is fused.silu_mul


def test_ops_check_falls_back_to_eager(monkeypatch, caplog):
    """A consumer kernel that gets the partials wrong (here: ignores the bias) turns the partials path off."""
    kernel = fused.silu_mul
    monkeypatch.setattr(fused, "silu_mul", lambda p, dtype: kernel(Partials(p.parts, None), dtype))
    ops = M.Ops(compile=False, fused_norm=True, fused_partials=True)
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        ops.check(torch.device("cpu"), torch.bfloat16)
    assert not ops.partials and ops.rope_and_cache is M.rope_and_cache and ops.silu_mul is M.silu_mul
    assert "disagree with eager" in caplog.text
