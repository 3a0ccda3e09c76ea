#!/usr/bin/env python3
"""Engine A/B of the M = 1 GEMV rules: batch-1 decode of the Qwen2-7B-shaped int4 engine, one engine per rule.

The kernel benchmark times a GEMV with its split-K reduction; in the engine the qkv and gate_up partials are summed
by the rotary and SiLU kernels instead (``Partials``), so a rule that writes fewer partials can win there while tying
in the kernel benchmark. Each variant replaces :func:`awqkit.kernels.dispatch.pick_config` at M = 1 before its
engine is built (CUDA graphs capture what it picks); the variants run in the order A B C … A B C … so that drift
shows as spread between a variant's repeats, and the greedy tokens of every variant are compared with the first.

    python3 benchmarks/engine_gemv_ab.py --out DIR [--variants shipped,pairs]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# the repository root instead of this folder, whose kernels.py would shadow the `kernels` package that newer
# Transformers imports (hub kernels)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

from awqkit import QuantConfig, quantize_rtn  # noqa: E402
from awqkit.engine import Engine, SamplingParams  # noqa: E402
from awqkit.formats.save import save_checkpoint  # noqa: E402
from awqkit.kernels import dispatch  # noqa: E402
from benchmarks.engine import profile_decode, prompts_for, qwen2_config, random_model, run_engine  # noqa: E402
from benchmarks.shapes import QWEN2_7B  # noqa: E402

WIDE = dispatch.WIDE_N
SHIPPED = dispatch.pick_config


def lanes_wide(m, n, k, g, sms):
    """Wide layers (gate_up) on the lane-split GEMV with ~16 programs per SM: ~14 K slices instead of ~56."""
    if m == 1 and n >= WIDE:
        return dispatch.gemv_config(m, n, k, sms, block_n=256, warps=1, rows=4, pps=16, lanes=4, lookahead=2)
    return None


def lanes_all(m, n, k, g, sms):
    """As ``lanes_wide``, and narrow layers on the 8-lane kernel (~8 programs per SM)."""
    if m == 1 and n < WIDE:
        return dispatch.gemv_config(m, n, k, sms, block_n=128, warps=1, rows=4, pps=8, lanes=8, lookahead=2)
    return lanes_wide(m, n, k, g, sms)


def lanes_long_k(m, n, k, g, sms):
    """As ``lanes_wide``, and the long-K layer (down) on the 4-lane kernel at ~16 programs per SM."""
    if m == 1 and k >= 4 * n:
        return dispatch.gemv_config(m, n, k, sms, block_n=256, warps=1, rows=4, pps=16, lanes=4, lookahead=2)
    return lanes_wide(m, n, k, g, sms)


def pairs(m, n, k, g, sms):
    """The shipped M = 1 row GEMV unpacking two nibbles per rotated word (``Config.pairs``: 1.5 instead of 2
    unpack instructions a weight; 217 instead of 247 loop instructions per 64 weights in SASS)."""
    if m == 1:
        return replace(SHIPPED(m, n, k, g, sms), pairs=True)
    return None


VARIANTS = {"shipped": None, "lanes_wide": lanes_wide, "lanes_long_k": lanes_long_k, "lanes_all": lanes_all,
            "pairs": pairs}  # fmt: skip


def use_variant(rule) -> None:
    """Make ``dispatch.pick_config`` answer with ``rule`` where it has an answer, else with the shipped rules."""

    def pick(m, n, k, g, sms):
        return (rule(m, n, k, g, sms) if rule else None) or SHIPPED(m, n, k, g, sms)

    dispatch.pick_config = pick if rule else SHIPPED


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, the first is the reference")
    args = ap.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    first = next(iter(variants))
    os.makedirs(args.out, exist_ok=True)
    device, dtype = torch.device("cuda"), torch.bfloat16
    config = qwen2_config(QWEN2_7B)
    work = Path(tempfile.mkdtemp(prefix="awqkit-ab-"))
    model = random_model(config, "cuda", dtype)
    ckpt = save_checkpoint(model, work / "ckpt", quantize_rtn(model, QuantConfig(group_size=128)), dtype=dtype)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    prompt = prompts_for(1, 128, config.vocab_size, seed=1)
    check = prompts_for(2, 64, config.vocab_size, seed=7)
    greedy = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    rows, tokens = [], {}
    for rep in range(args.repeats):
        for name, rule in variants.items():
            use_variant(rule)
            engine = Engine.from_checkpoint(ckpt, device=device, dtype=dtype, max_num_seqs=2, max_model_len=512)
            run_engine(engine, prompt, 8)
            r = run_engine(engine, prompt, args.new)
            if rep == 0:
                tokens[name] = [o.token_ids for o in engine.generate(check, greedy)]
                prof = profile_decode(engine)[:10]
            else:
                prof = None
            rows.append(dict(variant=name, repeat=rep, decode_tok_s=r["decode_tok_s"], profile=prof))
            print(f"{name:14s} repeat {rep}: {r['decode_tok_s']:7.1f} tok/s", flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    use_variant(None)
    same = {name: t == tokens[first] for name, t in tokens.items()}
    doc = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows, reference=first,
               tokens_match_reference=same, time=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip
    with open(os.path.join(args.out, "engine_gemv_ab.json"), "w") as f:
        json.dump(doc, f, indent=1)
    for name in variants:
        v = [r["decode_tok_s"] for r in rows if r["variant"] == name]
        print(f"{name:14s} {' '.join(f'{x:7.1f}' for x in v)}  greedy tokens as {first}: {same[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
