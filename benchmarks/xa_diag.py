"""Diagnostic of session 10 (``results/xa_diag_session10.json``): the x-operand kernel's pieces on the GPU with
scales in the activation dtype — the joined ``(q - z) s`` tile (asm and plain Triton) against the dequantized
weight, and the kernel (cp.async and TMA staging) against ``x @ W``. ::

    python3 benchmarks/xa_diag.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from awqkit.formats import gemm as fmt  # noqa: E402

G = importlib.import_module("awqkit.kernels.gemm")  # the module (the package exports a function of that name)


@triton.jit
def tile_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, lo_ptr, N, N8, BK: tl.constexpr, BN8: tl.constexpr, ASM: tl.constexpr):
    """The kernel's weight tile for one ``[BK, BN8]`` words block of group 0, stored as ``[BK, 8 BN8]``, and its
    first column pair's low half (column ``8 j``)."""
    offs_k = tl.arange(0, BK)
    offs_j = tl.arange(0, BN8)
    mask_j = offs_j < N8
    w = tl.load(qw_ptr + offs_k[:, None] * N8 + offs_j[None, :])
    zw = tl.load(qz_ptr + offs_j)
    l0, h0 = G._folded_pairs(w, zw, s_ptr, 0, offs_j, mask_j, N, 0, 128.0, ASM, False)
    l1, h1 = G._folded_pairs(w, zw, s_ptr, 0, offs_j, mask_j, N, 1, 128.0, ASM, False)
    l2, h2 = G._folded_pairs(w, zw, s_ptr, 0, offs_j, mask_j, N, 2, 128.0, ASM, False)
    l3, h3 = G._folded_pairs(w, zw, s_ptr, 0, offs_j, mask_j, N, 3, 128.0, ASM, False)
    tl.store(lo_ptr + offs_k[:, None] * N8 + offs_j[None, :], l0)
    t = tl.join(tl.join(tl.join(l0, l2), tl.join(l1, l3)), tl.join(tl.join(h0, h2), tl.join(h1, h3)))
    offs_n = tl.arange(0, 8 * BN8)
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], tl.reshape(t, (BK, 8 * BN8)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out_dir = ap.parse_args().out
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    k, n, g = 64, 256, 64
    intw, zeros = torch.randint(0, 16, (n, k)), torch.randint(0, 16, (n, 1))
    qw, qz, sc = [t.cuda() for t in fmt.pack_linear(intw, zeros, torch.rand(n, 1) * 0.02 + 0.001)]
    sc = sc.to(torch.bfloat16)  # the activation dtype
    ref = fmt.dequantize(qw, qz, sc, g, torch.float32)
    res = {}
    for asm in (True, False):
        out = torch.zeros(k, n, dtype=torch.bfloat16, device="cuda")
        lo = torch.zeros(k, n // 8, dtype=torch.bfloat16, device="cuda")
        tile_kernel[(1,)](qw, qz, sc, out, lo, n, n // 8, BK=64, BN8=32, ASM=asm, num_warps=4)
        res[f"tile_asm{asm}_max_err"] = (out.float() - ref).abs().max().item()
        res[f"tile_asm{asm}_lo_max_err"] = (lo.float() - ref[:, 0::8]).abs().max().item()
        res[f"tile_asm{asm}_out_absmax"] = out.float().abs().max().item()
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    yref = x.float() @ ref
    for asm in (True, False):
        for tma in (False, True):
            y = torch.zeros(64, n, dtype=torch.bfloat16, device="cuda")
            wd = G.TensorDescriptor.from_tensor(qw, [64, 32]) if tma else qw
            G._gemm_planes_xa_kernel[(n // 256, 1)](
                x, qw, wd, qz, sc, y, y, 64, n, n // 8, k, k, x.stride(0), 0, n,
                G=g, BM=64, BN8=32, BK=64, STAGES=2, TO_WORKSPACE=False, HAS_BIAS=False, DOT_F32=False, ASM=asm,
                PDL=False, TMA=tma, num_warps=4,
            )  # fmt: skip
            res[f"gemm_asm{asm}_tma{tma}_rel"] = ((y.float() - yref).norm() / yref.norm()).item()
    print(json.dumps(res, indent=1))
    with open(os.path.join(out_dir, "xa_diag.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
