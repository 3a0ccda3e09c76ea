"""Engine speed on a GPU: awqkit-int4 vs awqkit-bf16 vs Transformers (bf16, static cache + compile).

A Qwen2-7B-shaped model with random weights (values do not change the speed), built on the GPU in bf16, RTN-quantized
(g128) and saved with awqkit's ``save_checkpoint``; the int4 engine is loaded back with ``Engine.from_checkpoint``
(that time, plus graph capture, is the reported start-up). The float rows use the same bf16 tensors in memory.

Per batch size: decode tok/s summed over the batch (steps after every request has its first token), prefill tok/s
(prompt tokens / time until the last request's first token), TTFT (mean time from submission to a request's first
token), peak GPU memory. Also: int4 start-up and peak memory with a 4,096-token context, a per-kernel profile of the
int4 batch-1 decode step, and correctness checks of the GPU paths against Transformers.

    python benchmarks/engine.py --out benchmarks/results/engine.json
    python benchmarks/engine.py --small --device cpu --skip-hf   # the script's own smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# the repository root instead of this folder, whose kernels.py would shadow the `kernels` package that newer
# Transformers imports (hub kernels)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

from awqkit import QuantConfig, quantize_rtn  # noqa: E402
from awqkit.engine import Engine, SamplingParams  # noqa: E402
from awqkit.formats.save import save_checkpoint  # noqa: E402
from awqkit.kernels.common import set_pdl  # noqa: E402
from benchmarks.shapes import QWEN2_7B  # noqa: E402

SMALL = dict(
    QWEN2_7B,
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=512,
    vocab_size=1024,
    max_position_embeddings=4096,
)


def qwen2_config(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**shape)


def random_model(config, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # random norms and biases, so nothing is trivially 1 or 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def cuda_tensors(top: int) -> list[str]:
    """The largest CUDA tensors the garbage collector can reach (shape, dtype, GB), for memory accounting."""
    seen, found = set(), []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                found.append((obj.untyped_storage().nbytes(), f"{tuple(obj.shape)} {obj.dtype}"))
        except Exception:  # objects that fail isinstance/attribute access mid-collection
            continue
    found.sort(reverse=True)
    return [f"{what}: {nbytes / 1e9:.3f} GB" for nbytes, what in found[:top]]


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Submit every prompt at once and step to the end; timings from the host clock (each step syncs)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    reset_peak(engine.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    first: dict[str, float] = {}
    all_first = None
    decoded = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.completion_tokens == 1:
                first[o.request_id] = now - t0
            elif all_first is not None:
                decoded += 1
        if all_first is None and len(first) == len(prompts):
            all_first = now
    end = time.perf_counter()
    batch = len(prompts)
    return {
        "batch": batch,
        "prompt_tokens": len(prompts[0]),
        "new_tokens": new_tokens,
        "decode_tok_s": decoded / (end - all_first) if end > all_first else float("nan"),
        "prefill_tok_s": batch * len(prompts[0]) / (all_first - t0),
        "ttft_ms": 1000 * statistics.mean(first.values()),
        "peak_gpu_gb": peak_gb(engine.device),
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if engine.device.type == "cuda" else 0.0,
        "total_s": end - t0,
    }


def engine_rows(name: str, engine: Engine, batches: list[int], prompt: int, new: int) -> list[dict]:
    rows = []
    for b in batches:
        prompts = prompts_for(b, prompt, engine.model.cfg.vocab_size, seed=b)
        run_engine(engine, prompts, 8)  # warm-up: prefill shapes, allocator
        row = {"engine": name, **run_engine(engine, prompts, new)}
        print(
            f"  {name:12s} batch {b:3d}: decode {row['decode_tok_s']:8.1f} tok/s  prefill "
            f"{row['prefill_tok_s']:8.0f} tok/s  ttft {row['ttft_ms']:7.1f} ms  peak {row['peak_gpu_gb']:.2f} GB",
            flush=True,
        )
        rows.append(row)
    return rows


def hf_rows(model, batches: list[int], prompt: int, new: int, budget_s: float) -> list[dict]:
    """Transformers generate, static cache (its generate then compiles the decode step: mode reduce-overhead)."""
    device = next(model.parameters()).device
    model.generation_config.cache_implementation = "static"
    rows, start = [], time.perf_counter()
    for b in batches:
        if time.perf_counter() - start > budget_s:
            print(f"  hf-bf16 batch {b}: skipped (time budget {budget_s:.0f} s spent)", flush=True)
            continue
        ids = torch.tensor(prompts_for(b, prompt, model.config.vocab_size, seed=b), device=device)
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)  # compiles
        warm = time.perf_counter() - t
        reset_peak(device)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        sync(device)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        sync(device)
        full = time.perf_counter() - t
        assert out.shape[1] == prompt + new
        row = {
            "engine": "hf-bf16",
            "batch": b,
            "prompt_tokens": prompt,
            "new_tokens": new,
            "decode_tok_s": b * (new - 1) / (full - ttft),
            "prefill_tok_s": b * prompt / ttft,
            "ttft_ms": 1000 * ttft,
            "peak_gpu_gb": peak_gb(device),
            "warmup_compile_s": warm,
        }
        print(
            f"  hf-bf16      batch {b:3d}: decode {row['decode_tok_s']:8.1f} tok/s  prefill "
            f"{row['prefill_tok_s']:8.0f} tok/s  ttft {row['ttft_ms']:7.1f} ms  peak {row['peak_gpu_gb']:.2f} GB"
            f"  (first call {warm:.0f} s)",
            flush=True,
        )
        rows.append(row)
    return rows


def long_context(engine: Engine, context: int, new: int = 32) -> dict:
    """Peak memory and speed with a prompt that fills the context."""
    prompt = prompts_for(1, context - new, engine.model.cfg.vocab_size, seed=7)
    row = run_engine(engine, prompt, new)
    return {
        "context": context,
        "peak_gpu_gb": row["peak_gpu_gb"],
        "decode_tok_s": row["decode_tok_s"],
        "prefill_tok_s": row["prefill_tok_s"],
        "ttft_ms": row["ttft_ms"],
    }


def profile_decode(engine: Engine, steps: int = 32) -> list[dict]:
    """Time per kernel per token of the batch-1 decode step (CUDA graph replays), largest first."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True)
    engine.add_request("profile", prompts_for(1, 128, engine.model.cfg.vocab_size)[0], params)
    for _ in range(4):
        engine.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort("profile")
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t = totals.setdefault(e.name, [0.0, 0])
            t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            t[1] += 1
    rows = [
        {"kernel": k[:90], "us_per_token": v[0] / steps, "launches_per_token": v[1] / steps} for k, v in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_token"])


# --- correctness on the device -------------------------------------------------------------------------------


def check_correctness(device: torch.device, dtype: torch.dtype, workdir: Path) -> dict:
    """A small Qwen2 and Qwen3 (bf16, RTN g128) on the device: graphs vs eager, engine vs Transformers."""
    from transformers import AutoConfig

    from awqkit.formats.load import load_quantized_model

    out = {}
    for family in ("qwen2", "qwen3"):
        cfg = AutoConfig.for_model(
            family,
            vocab_size=4096,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            max_position_embeddings=2048,
            tie_word_embeddings=family == "qwen3",
        )
        model = random_model(cfg, str(device), torch.float32)
        ref_float = {k: v.to(dtype) for k, v in model.state_dict().items()}
        quant = quantize_rtn(model, QuantConfig(group_size=128))
        path = save_checkpoint(model, workdir / f"check-{family}", quant, overwrite=True)
        del model
        prompts = prompts_for(3, 40, 4096, seed=1)
        prompts[1] = prompts[1][:17]
        params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
        graphs = Engine.from_checkpoint(path, device=device, dtype=dtype, max_num_seqs=4, max_model_len=512)
        eager = Engine.from_checkpoint(
            path, device=device, dtype=dtype, max_num_seqs=4, max_model_len=512, cuda_graphs=False
        )
        got_graph = [r.token_ids for r in graphs.generate(prompts, params)]
        got_eager = [r.token_ids for r in eager.generate(prompts, params)]
        alone = [graphs.generate([p], params)[0].token_ids for p in prompts]
        reference = load_quantized_model(path, device=device, dtype=dtype)
        ids = torch.tensor([prompts[0]], device=device)
        with torch.inference_mode():
            ref_logits = reference(ids).logits[0].float()
            eng_logits = graphs.model(ids, torch.arange(40, device=device)[None], 0, 40, logits="all")[0].float()
            ref_tokens = reference.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, 40:
            ].tolist()
        rel = rel_err(eng_logits, ref_logits)
        agree = next((i for i, (a, b) in enumerate(zip(got_graph[0], ref_tokens)) if a != b), len(ref_tokens))
        out[family] = {
            "graph_vs_eager_tokens_equal": got_graph == got_eager,
            # the graph pads the batch of 3 to a captured size of 4: cuBLAS (lm_head) and split-K reductions may
            # round the real rows differently; random weights make near-ties common, so a late part is numerics
            "graph_vs_eager_common_prefix": [common_prefix(a, b) for a, b in zip(got_graph, got_eager)],
            "batch_vs_alone_tokens_equal": got_graph == alone,
            # where batched and solo greedy paths part (bf16 near-ties: batched matmuls round differently); a bug
            # would show at token 0, a near-tie late and in one prompt
            "batch_vs_alone_common_prefix": [common_prefix(a, b) for a, b in zip(got_graph, alone)],
            "logits_rel_err_vs_transformers": rel,
            "greedy_tokens_agreeing_with_transformers": f"{agree}/{len(ref_tokens)}",
        }
        # the float path: the engine and Transformers in bf16 on the same weights, each against Transformers in fp32
        float_engine = Engine.from_tensors(
            cfg, None, ref_float, device=device, dtype=dtype, max_num_seqs=2, max_model_len=256
        )
        hf_float = random_model(cfg, str(device), dtype)
        hf_float.load_state_dict(ref_float)
        with torch.inference_mode():
            fl = float_engine.model(ids, torch.arange(40, device=device)[None], 0, 40, logits="all")[0].float()
            hl = hf_float(ids).logits[0].float()
            exact = hf_float.float()(ids).logits[0]
        out[family]["float_logits_rel_err_vs_fp32: engine, transformers"] = [rel_err(fl, exact), rel_err(hl, exact)]
        out[family]["prefill_graphs_vs_eager"] = check_prefill_graphs(graphs)
        print(f"  check {family}: {out[family]}", flush=True)
        del graphs, eager, reference, float_engine, hf_float
        gc.collect()
    if device.type == "cuda":
        out["decode_attention_vs_sdpa_max_abs_err"] = check_decode_attention(device, dtype)
        print(f"  decode attention kernel vs SDPA: {out['decode_attention_vs_sdpa_max_abs_err']}", flush=True)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# bf16: the padded block runs other matmul shapes (and kernels) than the eager one; a wrong slot, position or padding
# gives errors of order one
PREFILL_TOLERANCE = 0.02


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest value (as ``awqkit.engine.model._close``)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def prefill_block(lengths: list[int], starts: list[int], pad: int, vocab: int, seed: int) -> tuple:
    """The engine's prefill block: row ``i`` holds ``lengths[i]`` random tokens at positions ``starts[i] ...``, padded
    to the longest with token 0 at ``pad``; returns ``(tokens, positions, last, kv_len)`` on the host."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    positions = torch.full((len(lengths), T), pad, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        tokens[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        positions[i, :n] = torch.arange(s, s + n)
    return tokens, positions, torch.tensor([n - 1 for n in lengths]), max(s + n for n, s in zip(lengths, starts))


def check_prefill_graphs(engine: Engine) -> dict:
    """Graph-captured prefill (``PrefillRunner``) vs the eager forward from the same KV cache: last-token logits and
    the cache at every position but the scratch one, for B = 1, T = 100 and B = 3 in scattered slots (rows of 37, 20
    and 5 tokens after different contexts; the padded fourth row takes slot 0, which must keep its cache). Each case
    runs twice through the graph: the capture's replay, then a second replay with the inputs already on the device.
    ``ok`` is False on any mismatch or error (``main`` then exits non-zero). On a CPU it checks the padded forward the
    graphs would replay (``run_padded``)."""
    from awqkit.engine.graphs import PrefillRunner

    model, device, L = engine.model, engine.device, engine.max_model_len
    cases = {
        "B1_T100": ([100], [0], 0),
        "B3_T37_scattered_slots": ([37, 20, 5], [0, 150, 60], torch.tensor([3, 1, 2])),
    }
    out: dict = {"ok": False}
    try:
        runner = PrefillRunner(
            model, engine.max_num_seqs, L, engine.prefill_chunk, pool=getattr(engine._decoder, "pool", None)
        )
        with torch.inference_mode():
            # earlier requests' keys and values in every slot (finite noise), which the block must attend to or keep
            model.kv_cache.copy_(torch.randn(model.kv_cache.shape, generator=torch.Generator().manual_seed(1)))
            for seed, (name, (lengths, starts, slots)) in enumerate(cases.items()):
                out[name] = _prefill_case(engine, runner, lengths, starts, slots, seed)
        out["runner_stats"] = dict(runner.stats)
        errs = [v for case in cases for k, v in out[case].items() if k.endswith("_err")]
        out["ok"] = all(err <= PREFILL_TOLERANCE for err in errs) and all(out[case]["none_is_None"] for case in cases)
        if device.type == "cuda":
            out["ok"] = out["ok"] and runner.stats["captures"] == 2 and runner.stats["eager"] == 0
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported like a mismatch
        import traceback

        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _prefill_case(engine: Engine, runner, lengths: list[int], starts: list[int], slots, seed: int) -> dict:
    model, device, L = engine.model, engine.device, engine.max_model_len
    tokens, positions, last, kv_len = prefill_block(lengths, starts, L, engine.vocab_size, seed)
    on_device = [x.to(device) if isinstance(x, torch.Tensor) else x for x in (tokens, positions, slots)]
    before = model.kv_cache.clone()
    want = model(*on_device, kv_len, logits="last", last=last.to(device)).float()
    want_cache = model.kv_cache[..., :L, :].clone()
    model.kv_cache.copy_(before)
    if device.type == "cuda":
        got = runner(tokens, positions, slots, kv_len, logits="last", last=last).float()  # host inputs: capture
        got_cache = model.kv_cache[..., :L, :].clone()
        none = runner(*on_device, kv_len, logits="none")  # the same graph, inputs on the device
        again = runner(*on_device, kv_len, logits="last", last=last.to(device)).float()
        torch.cuda.synchronize()
    else:
        got = again = runner.run_padded(tokens, positions, slots, kv_len, last=last).float()
        got_cache, none = model.kv_cache[..., :L, :].clone(), None
    return {
        "logits_rel_err": rel_err(got, want),
        "logits_max_err": max_err(got, want),
        "second_replay_logits_max_err": max_err(again, want),
        "cache_max_err": max_err(got_cache, want_cache),
        "none_is_None": none is None,
    }


def prefill_check_failures(checks: dict) -> list[str]:
    """The families whose prefill-graph check failed (see :func:`check_prefill_graphs`)."""
    return [
        family
        for family, c in checks.items()
        if isinstance(c, dict) and "prefill_graphs_vs_eager" in c and not c["prefill_graphs_vs_eager"].get("ok")
    ]


def check_decode_attention(device: torch.device, dtype: torch.dtype) -> dict:
    """The split-context decode kernel vs SDPA (float32) on random caches of several shapes, lengths, windows."""
    import torch.nn.functional as F

    from awqkit.engine.attention import decode_attention

    errs = {}
    for B, H, Hkv, D, kv_len, window in [
        (1, 28, 4, 128, 512, None),
        (8, 28, 4, 128, 4096, None),
        (32, 32, 8, 128, 512, None),
        (4, 16, 4, 64, 1024, 300),
    ]:
        cache = torch.randn(B, 2, Hkv, kv_len + 64, D, device=device, dtype=dtype)
        q = torch.randn(B, H, D, device=device, dtype=dtype)
        lengths = torch.randint(1, kv_len + 1, (B,), device=device)
        keys, values = cache[:, 0, :, :kv_len], cache[:, 1, :, :kv_len]
        got = decode_attention(q, keys, values, lengths, window).float()
        worst = 0.0
        for b in range(B):
            n = int(lengths[b])
            lo = max(0, n - window) if window else 0
            k = keys[b, :, lo:n].float().repeat_interleave(H // Hkv, 0)
            v = values[b, :, lo:n].float().repeat_interleave(H // Hkv, 0)
            ref = F.scaled_dot_product_attention(q[b].float()[:, None], k, v)[:, 0]
            worst = max(worst, (got[b] - ref).abs().max().item())
        errs[f"B{B}_H{H}_kv{kv_len}_w{window}"] = worst
    return errs


def memory_diagnostics(engine: Engine) -> dict:
    """Peak extra memory of one 512-token prefill chunk at the end of the context, per attention backend, and of
    one decode step (the engine must be idle)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, device = engine.model, engine.device
    L = engine.max_model_len
    out = {"allocated_gb": torch.cuda.memory_allocated() / 1e9, "reserved_gb": torch.cuda.memory_reserved() / 1e9}
    tokens = torch.randint(100, 1000, (1, 512), device=device)
    positions = torch.arange(L - 512, L, device=device)[None]
    backends = {
        "default": None,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    with torch.inference_mode():
        for name, backend in backends.items():
            base = torch.cuda.memory_allocated()
            reset_peak(device)
            try:
                if backend is None:
                    model(tokens, positions, 0, L, logits="last")
                else:
                    with sdpa_kernel([backend]):
                        model(tokens, positions, 0, L, logits="last")
                torch.cuda.synchronize()
                out[f"prefill_chunk_extra_gb_{name}"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            except RuntimeError as e:
                out[f"prefill_chunk_extra_gb_{name}"] = f"{type(e).__name__}: {str(e)[:80]}"
        base = torch.cuda.memory_allocated()
        reset_peak(device)
        engine._decoder([1], [L - 1], [0], L)
        torch.cuda.synchronize()
        out["decode_step_extra_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    return out


# --- main ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/engine.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--context", type=int, default=4096, help="context for the int4 memory row")
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke test of this script)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--hf-budget-s", type=float, default=150.0, help="stop starting hf-bf16 batches after this")
    ap.add_argument("--workdir", default=None, help="where to save the int4 checkpoint (default: a temp dir)")
    ap.add_argument("--context-only", action="store_true", help="stop after the long-context memory row")
    ap.add_argument("--skip-no-pdl", action="store_true", help="no int4 rows with programmatic dependent launch off")
    ap.add_argument("--hf-only", action="store_true",
                    help="only the hf-bf16 rows (batches an earlier --hf-budget-s skipped)")  # fmt: skip
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="awqkit-engine-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import transformers

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "Qwen2-7B shape, random weights" if not args.small else "small Qwen2, random weights",
        "rows": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    config = qwen2_config(SMALL if args.small else QWEN2_7B)
    if args.hf_only:
        hf = random_model(config, str(device), dtype)
        result["rows"] = hf_rows(hf, args.batches, args.prompt, args.new, float("inf"))
        save()
        return
    if not args.skip_check:
        print("correctness on the device:", flush=True)
        try:
            result["checks"] = check_correctness(device, dtype, workdir)
        except Exception as e:  # report and go on to the timings
            import traceback

            traceback.print_exc()
            result["checks"] = {"error": f"{type(e).__name__}: {e}"}
        save()
        failed = prefill_check_failures(result["checks"])
        if failed:  # a wrong prefill would make every timing below meaningless
            sys.exit(f"prefill graphs disagree with the eager forward ({', '.join(failed)}): see {out_path}")

    t = time.perf_counter()
    model = random_model(config, str(device), dtype)
    float_cpu = {k: v.to("cpu", copy=True) for k, v in model.state_dict().items()}
    quant = quantize_rtn(model, QuantConfig(group_size=128))
    ckpt = save_checkpoint(model, workdir / "qwen2-7b-shape-rtn-g128", quant, overwrite=True, dtype=torch.bfloat16)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    print(
        f"built, quantized and saved the int4 checkpoint in {time.perf_counter() - t:.0f} s; "
        f"{torch.cuda.memory_allocated() / 1e9 if device.type == 'cuda' else 0:.2f} GB still allocated",
        flush=True,
    )

    # int4: start-up and the long-context memory row (one slot), then the batch rows. What the process holds on the
    # GPU before the engine exists (the checks' and the checkpoint build's leftovers) is not the engine's: measure it
    # and report the engine's peak without it too.
    baseline = torch.cuda.memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        result["gpu_before_engine"] = {"allocated_gb": baseline, "largest_tensors": cuda_tensors(8)}
        print(f"before the engine: {result['gpu_before_engine']}", flush=True)
    t = time.perf_counter()
    engine = Engine.from_checkpoint(ckpt, device=device, dtype=dtype, max_num_seqs=1, max_model_len=args.context)
    sync(device)
    startup_long = time.perf_counter() - t
    if device.type == "cuda":
        print(
            f"int4 engine, 1 slot x {args.context}: {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated after "
            f"start-up ({startup_long:.1f} s)",
            flush=True,
        )
    result["context_4096"] = {"engine": "awqkit-int4", "startup_s": startup_long, **long_context(engine, args.context)}
    result["context_4096"]["peak_gpu_gb_engine"] = result["context_4096"]["peak_gpu_gb"] - baseline
    print(f"int4, {args.context} context: {result['context_4096']}", flush=True)
    if device.type == "cuda":
        result["context_4096"]["memory"] = memory_diagnostics(engine)
        print(f"  memory: {result['context_4096']['memory']}", flush=True)
    save()
    if args.context_only:
        return
    del engine
    gc.collect()

    max_len = max(512, args.prompt + args.new)

    def batch_engine() -> Engine:
        return Engine.from_checkpoint(
            ckpt, device=device, dtype=dtype, max_num_seqs=max(args.batches), max_model_len=max_len
        )

    t = time.perf_counter()
    engine = batch_engine()
    sync(device)
    result["startup_s"] = {"awqkit-int4": time.perf_counter() - t}
    result["decode_attention_kernel"] = bool(getattr(engine.model, "decode_kernel", False))
    print(f"int4 start-up (load + capture, {max(args.batches)} slots): {result['startup_s']['awqkit-int4']:.1f} s")
    result["rows"] += engine_rows("awqkit-int4", engine, args.batches, args.prompt, args.new)
    save()
    if device.type == "cuda":
        result["profile_int4_batch1"] = profile_decode(engine)[:25]
        print("int4 batch-1 decode, per kernel (us per token):")
        for r in result["profile_int4_batch1"][:15]:
            print(f"  {r['us_per_token']:8.1f} us  x{r['launches_per_token']:5.1f}  {r['kernel']}")
        save()
    if device.type == "cuda" and not args.skip_no_pdl:
        # the same engine with every kernel launched the ordinary way: what programmatic dependent launch gains, and
        # a race check (every kernel is deterministic, so greedy tokens must be identical with PDL on and off)
        check_prompts = prompts_for(4, args.prompt, config.vocab_size, seed=99)
        greedy = SamplingParams(max_new_tokens=48, temperature=0, ignore_eos=True)
        with_pdl = [r.token_ids for r in engine.generate(check_prompts, greedy)]
        del engine
        gc.collect()
        set_pdl(0)
        engine = batch_engine()
        without = [r.token_ids for r in engine.generate(check_prompts, greedy)]
        result["pdl_tokens_identical"] = with_pdl == without
        print(f"greedy tokens with PDL == without: {with_pdl == without}", flush=True)
        result["rows"] += engine_rows("awqkit-int4-no-pdl", engine, args.batches, args.prompt, args.new)
        # with PDL a kernel's programs wait, resident, for their predecessor, so the profile above overlaps; without
        # it every kernel's duration is its own: the per-kernel breakdown of a token
        result["profile_int4_batch1_no_pdl"] = profile_decode(engine)[:25]
        print("int4 batch-1 decode without PDL, per kernel (us per token):")
        for r in result["profile_int4_batch1_no_pdl"][:15]:
            print(f"  {r['us_per_token']:8.1f} us  x{r['launches_per_token']:5.1f}  {r['kernel']}")
        set_pdl(None)
        save()
    del engine
    gc.collect()

    t = time.perf_counter()
    engine = Engine.from_tensors(
        config,
        None,
        float_cpu,
        device=device,
        dtype=dtype,
        max_num_seqs=max(args.batches),
        max_model_len=max_len,
        model_name="bf16",
    )
    sync(device)
    result["startup_s"]["awqkit-bf16"] = time.perf_counter() - t
    result["rows"] += engine_rows("awqkit-bf16", engine, args.batches, args.prompt, args.new)
    save()
    del engine
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    if not args.skip_hf:
        hf = random_model(config, str(device), dtype)
        hf.load_state_dict(float_cpu)
        try:
            result["rows"] += hf_rows(hf, args.batches, args.prompt, args.new, args.hf_budget_s)
        except Exception as e:  # keep the engine rows
            import traceback

            traceback.print_exc()
            result["hf_error"] = f"{type(e).__name__}: {e}"
        save()

    print_table(result)
    save()


def print_table(result: dict) -> None:
    print(f"\n{result['device']}, torch {result['torch']}")
    print("| engine | batch | decode tok/s | prefill tok/s | TTFT ms | peak GPU GB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["rows"]:
        print(
            f"| {r['engine']} | {r['batch']} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | "
            f"{r['ttft_ms']:.1f} | {r['peak_gpu_gb']:.2f} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
