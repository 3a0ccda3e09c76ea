"""Programmatic dependent launch (kernels.common): when it is on, and where the kernels wait.

A kernel launched with PDL may start while its predecessor still runs, so it must wait (griddepcontrol.wait) before
it reads what another kernel wrote or writes anything. The GPU benchmark checks the results bit for bit with PDL on
and off; here the switch logic and the compiled code's order are checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.test_engine import _run_python

triton = pytest.importorskip("triton")


def test_pdl_is_off_on_cpu_and_switchable(monkeypatch):
    from awqkit.kernels import common

    cpu = torch.device("cpu")
    for mode in (None, 0, 1, 2):
        common.set_pdl(mode)
        assert common.pdl_mode(cpu) == 0
        assert common.pdl_launch(cpu) == {"PDL": False}  # no launch_pdl without the wait, and never on a CPU
    common.set_pdl(None)
    monkeypatch.setenv("AWQKIT_PDL", "0")
    assert common.pdl_mode(cpu) == 0


def test_pdl_follows_env_and_override_on_hopper(monkeypatch):
    """With a (pretended) sm_90 device: on by default, off with AWQKIT_PDL=0, and set_pdl wins over both."""
    from awqkit.kernels import common

    monkeypatch.setattr(common, "_pdl_hardware", lambda index: True)
    monkeypatch.setattr(common, "interpreting", lambda: False)
    gpu = torch.device("cuda", 0)
    monkeypatch.delenv("AWQKIT_PDL", raising=False)
    assert common.pdl_mode(gpu) == 1 and common.pdl_launch(gpu) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("AWQKIT_PDL", "0")
    assert common.pdl_mode(gpu) == 0 and common.pdl_launch(gpu) == {"PDL": False}
    common.set_pdl(2)
    try:
        assert common.pdl_mode(gpu) == 2
    finally:
        common.set_pdl(None)


_GEMV_PTX = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
V = importlib.import_module("awqkit.kernels.gemv")
sig = {"x_ptr": "*bf16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*bf16", "out_ptr": "*fp32", "bias_ptr": "*bf16",
       **{n: "i32" for n in ("M", "N", "N8", "K", "k_split", "stride_xm", "stride_os", "stride_om")}}
for pdl, prefetch in ((False, 0), (True, 8)):
    consts = dict(BM=1, BN=256, ROWS=8, G=128, GCH=32, TO_WORKSPACE=True, HAS_BIAS=False, ASM=True, ROW_WORDS=576,
                  EVEN_N=True, PDL=pdl, PREFETCH=prefetch, LOOKAHEAD=0, PAIRS=False)
    k = triton.compile(ASTSource(fn=V._gemv_kernel, signature={**sig, **{c: "constexpr" for c in consts}},
                                 constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 1, "launch_pdl": pdl})
    lines = k.asm["ptx"].splitlines()
    def first(pat):
        return next((i for i, line in enumerate(lines) if pat in line), None)
    wait, trigger = first("griddepcontrol.wait"), first("griddepcontrol.launch_dependents")
    pf = first("prefetch.global")
    if not pdl:
        assert wait is None and trigger is None and pf is None
        continue
    # prefetches of the weight first, then the wait, then the trigger, and only then any load or store
    assert pf < wait < trigger < first("ld.global") and trigger < first("st.global"), (pf, wait, trigger)
    assert sum("prefetch.global.L2" in line for line in lines) == prefetch
print("gemv pdl ok")
"""


def test_gemv_waits_before_loading_activations_and_prefetches_weights_first():
    pytest.importorskip("triton.backends.nvidia")
    assert "gemv pdl ok" in _run_python(_GEMV_PTX, TRITON_INTERPRET="0")
