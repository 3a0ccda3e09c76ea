"""Load test of awqkit's OpenAI-compatible server: concurrent streaming clients with random disconnects.

Starts ``python -m awqkit.server`` as a subprocess on 127.0.0.1, runs each prompt alone once (greedy) to learn its
expected output, then, for each concurrency level, lets N clients send R streaming requests each (greedy, so every
answer is known) and drop a random fraction of them mid-stream. It reports requests/s, generated tokens/s, time to
first token and inter-token latency percentiles (client side), lost / failed / mixed responses, whether every slot
was freed, and the server's RSS before and after. Bounded: R requests per client and ``--time-limit`` seconds.

A finished answer that differs from its prompt's solo answer is *mixed* when it is closer to another prompt's answer
(tokens went to the wrong stream) and *diverged* otherwise (same start, then a different greedy choice: batched and
solo matmuls round differently, which bf16 on a GPU can make visible). Mixed must be 0.

    python benchmarks/server_load.py                                   # CPU, embedded default, 64 x 20
    python benchmarks/server_load.py --random-7b --device cuda --concurrency 1,8,32,64 --requests-per-client 8 \\
        --max-tokens 128 --out benchmarks/results/server_load_h100.json

``--random-7b`` writes a Qwen2-7B-shaped AWQ checkpoint (int4, group 128, random packed weights; speed does not
depend on the values) with a synthetic word-level tokenizer covering its 152,064 ids, and serves that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # awqkit from this checkout, installed or not
RESULTS = REPO / "benchmarks" / "results"

from benchmarks.shapes import QWEN2_7B  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Three primary colors are",
    "A haiku about the sea:",
    "A spider has eight legs because",
    "Twelve times twelve equals",
    "In Spanish, 'good morning' is",
    "A synonym for 'happy' is",
    "A compiler is a program that",
    "Romeo and Juliet was written by",
    "Copper is used for",
    "Water boils at",
    "The cat sat on the",
    "The sky is blue because",
    "A good name for a puppy is",
    "Photosynthesis is the process",
    "One, two, three, four,",
]

# For a quick CPU check of the --random-7b path.
QWEN2_SMALL = dict(QWEN2_7B, vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def embedded_checkpoint(cache: Path) -> Path:
    """The embedded default (SmolLM2-135M-Instruct), round-to-nearest g64, with its tokenizer (cached)."""
    out = cache / "smollm2-135m-rtn-g64"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer

    from awqkit import AutoAWQForCausalLM, QuantConfig, quantize_rtn
    from awqkit.embedded import default_model

    src = default_model()
    tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    awq = AutoAWQForCausalLM.from_pretrained(
        src.directory, gguf_file=src.gguf_file, device_map="cpu", torch_dtype=torch.float32
    )
    awq.quant_config = quantize_rtn(awq.model, QuantConfig(group_size=64))
    awq.is_quantized = True
    path = awq.save_quantized(out)
    tok.save_pretrained(path)
    return Path(path)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer whose token ``i`` is the word ``w<i>``: every id decodes to visible text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token=f"w{vocab_size - 1}")


def random_awq_checkpoint(out: Path, shape: dict, group_size: int = 128, seed: int = 0) -> Path:
    """A Qwen2 checkpoint in AutoAWQ GEMM format with random packed int4 weights, without building a float model."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import Qwen2Config

    from awqkit.formats.config import QuantConfig
    from awqkit.formats.save import hf_config_dict, write_checkpoint_dir

    # random numbers are drawn on the GPU when there is one (seconds instead of minutes for 7B), then saved from the CPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(seed)
    cfg = Qwen2Config(**shape)
    h, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd

    def packed(shape: tuple[int, int]) -> torch.Tensor:
        """Random int32 words: every bit pattern is eight valid 4-bit values."""
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32, device=device).cpu()

    def normal(shape: tuple[int, int], std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device) * std).half().cpu()

    def awq(name: str, k: int, n: int, bias: bool = False) -> dict[str, torch.Tensor]:
        # (q - z) has std ~6.5 for uniform nibbles: this scale keeps each layer's output at the input's size
        scale = 1.0 / (6.5 * k**0.5)
        t = {
            f"{name}.qweight": packed((k, n // 8)),
            f"{name}.qzeros": packed((k // group_size, n // 8)),
            f"{name}.scales": torch.full((k // group_size, n), scale, dtype=torch.float16),
        }
        if bias:
            t[f"{name}.bias"] = torch.zeros(n, dtype=torch.float16)
        return t

    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal((cfg.vocab_size, h), 0.02),
        "lm_head.weight": normal((cfg.vocab_size, h), h**-0.5),
        "model.norm.weight": torch.ones(h, dtype=torch.float16),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors |= awq(f"{p}.self_attn.q_proj", h, h, bias=True)
        tensors |= awq(f"{p}.self_attn.k_proj", h, kv, bias=True)
        tensors |= awq(f"{p}.self_attn.v_proj", h, kv, bias=True)
        tensors |= awq(f"{p}.self_attn.o_proj", h, h)
        tensors |= awq(f"{p}.mlp.gate_proj", h, inter)
        tensors |= awq(f"{p}.mlp.up_proj", h, inter)
        tensors |= awq(f"{p}.mlp.down_proj", inter, h)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    tok = synthetic_tokenizer(cfg.vocab_size)
    cfg.eos_token_id = tok.eos_token_id
    path = write_checkpoint_dir(out, tensors, hf_config_dict(cfg, QuantConfig(group_size=group_size)))
    tok.save_pretrained(path)
    del tensors
    if device == "cuda":
        torch.cuda.empty_cache()  # the server, a separate process, needs the memory
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m awqkit.server`` on 127.0.0.1."""

    def __init__(self, checkpoint: Path, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "awqkit.server", str(checkpoint), "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def metric(self, name: str, label: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Record:
    prompt: int
    outcome: str = "lost"  # ok | mixed | diverged | disconnected | failed | lost
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def stream_once(
    client: httpx.AsyncClient, url: str, model: str, prompt, max_tokens: int, drop_after: int | None
) -> Record:
    """One streaming completion; with ``drop_after`` the client closes the connection after that many chunks."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = Record(prompt=-1)
    t0 = time.perf_counter()
    last = None
    done = finished = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.outcome, rec.error = "failed", f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.outcome, rec.error = "failed", str(chunk["error"])[:200]
                    return rec
                if not chunk["choices"]:
                    rec.tokens = chunk["usage"]["completion_tokens"]
                    continue
                choice = chunk["choices"][0]
                if choice["text"]:
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft = now - t0
                    else:
                        rec.itl.append(now - last)
                    last = now
                    rec.text += choice["text"]
                if choice["finish_reason"] is not None:
                    finished = True
                if drop_after is not None and len(rec.itl) + 1 >= drop_after:
                    rec.outcome = "disconnected"
                    return rec  # leaving the block closes the connection mid-stream
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        rec.outcome, rec.error = "lost", f"{type(exc).__name__}: {exc}"[:200]
        return rec
    rec.outcome = "ok" if (done and finished) else "lost"
    return rec


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def classify(rec: Record, expected: list[str]) -> None:
    """ok if equal to the solo answer; mixed if it looks like another prompt's; diverged otherwise.

    Mixed: closer to another prompt's answer from the start, or, after the point where it leaves its own answer,
    continuing with a piece (16 characters) of another prompt's answer (tokens routed to the wrong stream midway).
    """
    if rec.outcome != "ok":
        return
    own = expected[rec.prompt]
    if rec.text == own:
        return
    others = [e for j, e in enumerate(expected) if j != rec.prompt]
    mine = common_prefix(rec.text, own)
    if max((common_prefix(rec.text, e) for e in others), default=0) > mine:
        rec.outcome = "mixed"
        return
    tail = rec.text[mine : mine + 16]
    rec.outcome = "mixed" if len(tail) == 16 and any(tail in e for e in others) else "diverged"


def pct(values: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values) * 1000.0
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in qs}


async def run_level(
    server: Server,
    model: str,
    prompts: list,
    expected: list[str],
    concurrency: int,
    requests_per_client: int,
    max_tokens: int,
    disconnect_prob: float,
    deadline: float,
    seed: int,
) -> dict:
    rng = random.Random(seed)

    def plan_one() -> tuple[int, int | None]:
        prompt = rng.randrange(len(prompts))
        drop = rng.randint(1, max(1, max_tokens - 1)) if rng.random() < disconnect_prob else None
        return prompt, drop

    plans = [[plan_one() for _ in range(requests_per_client)] for _ in range(concurrency)]
    records: list[Record] = []
    not_run = 0
    gen_before = server.metric("awqkit_generation_tokens_total")
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(600.0, connect=30.0)

    async def client_loop(client: httpx.AsyncClient, plan) -> None:
        nonlocal not_run
        for idx, drop in plan:
            if time.monotonic() > deadline:
                not_run += 1
                continue
            rec = await stream_once(client, server.url, model, prompts[idx], max_tokens, drop)
            rec.prompt = idx
            classify(rec, expected)
            records.append(rec)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client, plan) for plan in plans))
    wall = time.perf_counter() - t0

    # every slot must be free again once the clients are gone
    freed_in = None
    t1 = time.monotonic()
    while time.monotonic() - t1 < 30:
        if server.metric("awqkit_num_requests_running") == 0 and server.metric("awqkit_num_requests_waiting") == 0:
            freed_in = round(time.monotonic() - t1, 3)
            break
        await asyncio.sleep(0.1)
    generated = server.metric("awqkit_generation_tokens_total") - gen_before

    counts = {k: sum(r.outcome == k for r in records) for k in ("ok", "disconnected", "mixed", "diverged", "failed")}
    counts["lost"] = sum(r.outcome == "lost" for r in records)
    received = sum(len(r.itl) + (r.ttft is not None) for r in records)
    completed = [r for r in records if r.outcome in ("ok", "diverged", "mixed")]
    diverged_at = [common_prefix(r.text, expected[r.prompt]) / max(1, len(expected[r.prompt]))
                   for r in records if r.outcome == "diverged"]  # fmt: skip
    itl = [x for r in records for x in r.itl]
    errors = sorted({r.error for r in records if r.error})[:5]
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "not_run_time_limit": not_run,
        **counts,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 2),
        "completed_requests_per_s": round(len(completed) / wall, 2),
        "generated_tok_s": round(generated / wall, 1),
        "received_tok_s": round(received / wall, 1),
        "ttft_ms": pct([r.ttft for r in records if r.ttft is not None]),
        "itl_ms": pct(itl),
        "itl_mean_ms": round(float(np.mean(itl)) * 1000, 2) if itl else None,
        "diverged_common_prefix_frac_p50": round(float(np.median(diverged_at)), 3) if diverged_at else None,
        "slots_freed_after_s": freed_in,
        "errors": errors,
    }


def engine_levels(
    checkpoint: Path,
    prompts: list,
    levels: list[int],
    requests_per_client: int,
    max_tokens: int,
    disconnect_prob: float,
    max_num_seqs: int,
    max_model_len: int,
    device: str | None,
    seed: int,
) -> list[dict]:
    """The same workload driven straight through ``Engine.step`` (no HTTP): what the server adds is the difference.

    Keeps ``concurrency`` requests in flight, replaces each finished one at once, and aborts the same fraction early.
    """
    from awqkit.engine import Engine, SamplingParams

    engine = Engine.from_checkpoint(checkpoint, device=device, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    ids = [engine.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, ignore_eos=True)
    rows = []
    for level, concurrency in enumerate(levels):
        rng = random.Random(seed + level)
        todo, started, done, tokens = concurrency * requests_per_client, 0, 0, 0
        drop_at: dict[str, int] = {}
        produced: dict[str, int] = {}
        step_s: list[float] = []
        t0 = time.perf_counter()
        while done < todo:
            while started - done < concurrency and started < todo:
                rid = f"e{level}-{started}"
                engine.add_request(rid, ids[rng.randrange(len(ids))], params)
                if rng.random() < disconnect_prob:
                    drop_at[rid] = rng.randint(1, max(1, max_tokens - 1))
                started += 1
            ts = time.perf_counter()
            outs = engine.step()
            step_s.append(time.perf_counter() - ts)
            for o in outs:
                tokens += len(o.new_token_ids)
                produced[o.request_id] = produced.get(o.request_id, 0) + len(o.new_token_ids)
                if o.finished:
                    done += 1
                elif produced[o.request_id] >= drop_at.get(o.request_id, max_tokens + 1):
                    engine.abort(o.request_id)
                    done += 1
        wall = time.perf_counter() - t0
        rows.append(
            {
                "concurrency": concurrency,
                "requests": todo,
                "wall_s": round(wall, 2),
                "generated_tok_s": round(tokens / wall, 1),
                "step_ms": pct(step_s),
                "steps": len(step_s),
            }
        )
        print(json.dumps({"engine_only": rows[-1]}), flush=True)
    return rows


async def solo_answers(server: Server, model: str, prompts: list, max_tokens: int) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as client:
        out = []
        for p in prompts:
            rec = await stream_once(client, server.url, model, p, max_tokens, None)
            if rec.outcome != "ok":
                raise RuntimeError(f"solo run failed: {rec.error or rec.outcome}")
            out.append(rec.text)
        return out


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="serve this checkpoint (default: the embedded default, RTN g64)")
    src.add_argument("--random-7b", action="store_true", help="a Qwen2-7B-shaped random int4 checkpoint")
    src.add_argument("--random-small", action="store_true", help="a 2-layer Qwen2 random int4 checkpoint (smoke test)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("AWQKIT_BENCH_CACHE", "/tmp/awqkit-bench")))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the server's choice)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--concurrency", default="64", help="comma-separated client counts, e.g. 1,8,32,64")
    ap.add_argument("--requests-per-client", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the random checkpoints")
    ap.add_argument("--disconnect-prob", type=float, default=0.15)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest concurrency")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--time-limit", type=float, default=900.0, help="no new requests after this many seconds")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    ap.add_argument("--server-cpu-threads", type=int, default=None, help="the server's --cpu-threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-only", action="store_true", help="also drive the engine directly (no HTTP), same load")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    max_num_seqs = args.max_num_seqs or max(levels)

    t_build = time.perf_counter()
    if args.checkpoint:
        ckpt, label = args.checkpoint, args.checkpoint.name
    elif args.random_7b or args.random_small:
        shape = QWEN2_7B if args.random_7b else QWEN2_SMALL
        label = "random-qwen2-7b-int4-g128" if args.random_7b else "random-qwen2-small-int4-g128"
        ckpt = random_awq_checkpoint(args.cache / label, shape)
    else:
        ckpt, label = embedded_checkpoint(args.cache), "smollm2-135m-instruct-rtn-g64"
    build_s = time.perf_counter() - t_build

    random_prompts = args.random_7b or args.random_small
    if random_prompts:
        vocab = (QWEN2_7B if args.random_7b else QWEN2_SMALL)["vocab_size"]
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(1, vocab - 1) for _ in range(args.prompt_tokens)] for _ in range(16)]
    else:
        prompts = list(PROMPTS)

    server_args = ["--max-num-seqs", str(max_num_seqs), "--max-model-len", str(args.max_model_len)]
    server_args += ["--max-queue", str(max(256, max(levels) * 2)), "--log-level", "warning"]
    if args.device:
        server_args += ["--device", args.device]
    if args.dtype:
        server_args += ["--dtype", args.dtype]
    if args.server_cpu_threads:
        server_args += ["--cpu-threads", str(args.server_cpu_threads)]
    log_path = args.cache / f"server-{label}.log"
    args.cache.mkdir(parents=True, exist_ok=True)
    server = Server(ckpt, server_args, log_path)
    result: dict = {}
    try:
        startup_s = server.wait_ready(args.startup_timeout)
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        print(f"server up in {startup_s:.1f}s ({label}, max_num_seqs={max_num_seqs})", flush=True)
        expected = asyncio.run(solo_answers(server, model, prompts, args.max_tokens))
        distinct = len(set(expected))
        rss_before = server.rss_mb()
        deadline = time.monotonic() + args.time_limit
        rows = []
        for i, c in enumerate(levels):
            row = asyncio.run(
                run_level(
                    server,
                    model,
                    prompts,
                    expected,
                    c,
                    args.requests_per_client,
                    args.max_tokens,
                    args.disconnect_prob,
                    deadline,
                    args.seed + i,
                )
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        time.sleep(1.0)
        rss_after = server.rss_mb()
    finally:
        exit_code = server.stop()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_rows = []
    if args.engine_only:
        engine_rows = engine_levels(
            ckpt,
            prompts,
            levels,
            args.requests_per_client,
            args.max_tokens,
            args.disconnect_prob,
            max_num_seqs,
            args.max_model_len,
            args.device,
            args.seed,
        )
    result = {
        "benchmark": "server_load",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "model": label,
        "checkpoint_build_s": round(build_s, 1),
        "server_startup_s": round(startup_s, 1),
        "settings": {
            "requests_per_client": args.requests_per_client,
            "max_tokens": args.max_tokens,
            "prompt": "token ids" if random_prompts else "text",
            "prompt_tokens": args.prompt_tokens if random_prompts else None,
            "disconnect_prob": args.disconnect_prob,
            "max_num_seqs": max_num_seqs,
            "max_model_len": args.max_model_len,
            "server_cpu_threads": args.server_cpu_threads,
            "greedy": True,
            "ignore_eos": True,
            "distinct_expected_outputs": distinct,
        },
        "levels": rows,
        "engine_only_levels": engine_rows,
        "server_rss_mb_before": round(rss_before, 1),
        "server_rss_mb_after": round(rss_after, 1),
        "server_rss_growth_mb": round(rss_after - rss_before, 1),
        "server_exit_code_on_sigterm": exit_code,
        "targets": targets(rows),
    }
    out = args.out or RESULTS / f"server_load_{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=2))
    print(f"wrote {out}")


def targets(rows: list[dict]) -> dict:
    """The issue's targets, evaluated on these rows."""
    out: dict = {"zero_lost_failed_mixed": all(r["lost"] + r["failed"] + r["mixed"] == 0 for r in rows)}
    out["all_slots_freed"] = all(r["slots_freed_after_s"] is not None for r in rows)
    by_c = {r["concurrency"]: r for r in rows}
    if 1 in by_c and 32 in by_c:
        one, many = by_c[1], by_c[32]
        out["tok_s_32_over_1"] = round(many["generated_tok_s"] / max(one["generated_tok_s"], 1e-9), 2)
        out["tok_s_32_over_1_ge_8"] = out["tok_s_32_over_1"] >= 8
        if one["itl_ms"]["p50"] and many["itl_ms"]["p50"]:
            out["itl_p50_32_over_1"] = round(many["itl_ms"]["p50"] / one["itl_ms"]["p50"], 2)
            out["itl_p50_32_over_1_le_2"] = out["itl_p50_32_over_1"] <= 2
    return out


if __name__ == "__main__":
    main()
