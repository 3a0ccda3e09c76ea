"""The engine against Transformers on the same (dequantized) weights, its batching, sampling and text streaming.

CPU, float32: every comparison with Transformers is on identical weights, so greedy tokens must match exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from awqkit import QuantConfig, quantize_rtn
from awqkit.engine import Engine, NoFreeSlotError, SamplingParams
from awqkit.engine.config import ModelConfig, rope_tables
from awqkit.engine.detok import IncrementalDetokenizer, TextStream
from awqkit.engine.sampling import SamplingBatch, apply_penalties, filter_top_k_top_p, sample, uniform_noise
from awqkit.errors import ConfigError
from awqkit.formats.load import load_quantized_model
from awqkit.formats.save import save_checkpoint
from tests.conftest import random_token_blocks, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core runner, waking a second OpenMP thread for every small op costs more
    than the op (10x slower end to end, measured). One thread keeps the file fast anywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny random model of each family (Qwen2: q/k/v bias; Qwen3: q/k norm), RTN g32, saved by awqkit."""
    model = tiny_model(request.param)
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("engine") / f"tiny-{request.param}", quant)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    model = tiny_model("llama", seed=1)
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("engine") / "tiny-llama", quant)


@pytest.fixture(scope="module")
def llama_engine(llama_checkpoint) -> Engine:
    return Engine.from_checkpoint(llama_checkpoint, max_num_seqs=4, max_model_len=160, prefill_chunk=64)


@pytest.fixture(scope="module")
def overlapped_engine(llama_checkpoint) -> Engine:
    """The same engine with the decode run one step ahead of the host, as on a GPU (see Engine's docstring)."""
    return Engine.from_checkpoint(
        llama_checkpoint, max_num_seqs=4, max_model_len=160, prefill_chunk=64, overlap_decode=True
    )


@pytest.fixture(scope="module")
def smollm_engine(smollm_rtn_checkpoint) -> Engine:
    return Engine.from_checkpoint(smollm_rtn_checkpoint, max_num_seqs=4, max_model_len=256)


def float_reference(path: Path) -> torch.nn.Module:
    """The Transformers model of a checkpoint with each AWQLinear replaced by a Linear of its dequantized weight."""
    from awqkit.nn import AWQLinear

    model = load_quantized_model(path)
    for name, module in list(model.named_modules()):
        if isinstance(module, AWQLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantized_weight()
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, linear)
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def record_logits(engine: Engine, monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Capture the logits each request is sampled from (by request id)."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = engine._sample

    def spy(reqs, logits):
        for r, row in zip(reqs, logits):
            seen.setdefault(r.id, []).append(row.float().clone())
        return original(reqs, logits)

    monkeypatch.setattr(engine, "_sample", spy)
    return seen


# --- against Transformers -------------------------------------------------------------------------------------


def test_greedy_matches_transformers(family_checkpoint):
    engine = Engine.from_checkpoint(family_checkpoint, max_num_seqs=2, max_model_len=128)
    reference = load_quantized_model(family_checkpoint)
    prompt = random_token_blocks(1, 20, seed=3)[0]
    assert engine.generate([prompt], GREEDY)[0].token_ids == hf_greedy(reference, prompt, GREEDY.max_new_tokens)
    with torch.inference_mode():
        expected = reference(torch.tensor([prompt])).logits[0]
        got = engine.model(torch.tensor([prompt]), torch.arange(20)[None], 0, 20, logits="all")[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_autoawq_fixture_logits():
    """AutoAWQ's own checkpoint (4.x config) gives the logits AutoAWQ's dequantization gives."""
    from safetensors.torch import load_file

    ref = load_file(FIXTURES / "autoawq-tiny-llama-g64.reference.safetensors")
    engine = Engine.from_checkpoint(FIXTURES / "autoawq-tiny-llama-g64", max_num_seqs=2, max_model_len=64)
    ids = ref["input_ids"]
    with torch.inference_mode():
        got = engine.model(ids, torch.arange(ids.shape[1])[None].expand_as(ids), 0, ids.shape[1], logits="all")
    torch.testing.assert_close(got, ref["logits"], rtol=1e-3, atol=1e-3)


def test_smollm_greedy_matches_transformers(smollm_engine, smollm_rtn_checkpoint):
    reference = float_reference(smollm_rtn_checkpoint)
    prompt = smollm_engine.encode("The capital of France is")
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    result = smollm_engine.generate([prompt], params)[0]
    assert result.token_ids == hf_greedy(reference, prompt, 12)
    assert result.text == smollm_engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (len(prompt), 12, "length")


# --- batching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama_engine", "overlapped_engine"])
def test_batch_matches_single(which, request, monkeypatch):
    """Sequences of different lengths decoding in one batch give the tokens and logits they give alone."""
    llama_engine = request.getfixturevalue(which)
    prompts = [random_token_blocks(1, n, seed=n)[0] for n in (5, 17, 40)]
    seen = record_logits(llama_engine, monkeypatch)
    batched = llama_engine.generate(prompts, GREEDY)
    batch_logits = list(seen.values())
    seen.clear()
    for prompt, result, logits in zip(prompts, batched, batch_logits):
        alone = llama_engine.generate([prompt], GREEDY)[0]
        assert alone.token_ids == result.token_ids
        (alone_logits,) = seen.values()
        seen.clear()
        torch.testing.assert_close(torch.stack(logits), torch.stack(alone_logits), rtol=1e-4, atol=1e-4)


def test_more_prompts_than_slots(llama_engine):
    prompts = random_token_blocks(7, 9, seed=5)
    results = llama_engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
    assert [len(r.token_ids) for r in results] == [5] * 7
    assert results[0].token_ids == llama_engine.generate([prompts[0]], GREEDY)[0].token_ids[:5]
    assert llama_engine.num_free_slots() == 4 and not llama_engine.has_unfinished()


def test_long_prompt_crosses_prefill_chunk(llama_engine):
    prompt = random_token_blocks(1, 150, seed=9)[0]  # chunk 64: three forwards, the last a partial one
    chunked = llama_engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    llama_engine.prefill_chunk = 1000
    try:
        whole = llama_engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    finally:
        llama_engine.prefill_chunk = 64
    assert chunked.token_ids == whole.token_ids


def test_step_api(llama_engine):
    """The server's primitives: slots, step outputs, joining mid-flight, abort, length limits."""
    engine = llama_engine
    a, b = random_token_blocks(2, 12, seed=11)
    engine.add_request("a", a, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    first = engine.step()  # prefill "a" → its first token
    assert [(o.request_id, o.completion_tokens, o.finished) for o in first] == [("a", 1, False)]
    engine.add_request("b", b, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert engine.num_free_slots() == 2
    second = {o.request_id: o for o in engine.step()}  # "b" prefills while "a" decodes
    assert second["a"].completion_tokens == 2 and second["b"].completion_tokens == 1
    third = {o.request_id: o for o in engine.step()}
    assert third["a"].finished and third["a"].finish_reason == "length" and third["a"].prompt_tokens == 12
    assert engine.num_free_slots() == 3
    engine.abort("b")
    assert engine.num_free_slots() == 4 and not engine.has_unfinished()
    with pytest.raises(ConfigError, match="160"):
        engine.add_request("c", [1] * 150, SamplingParams(max_new_tokens=11))
    for i in range(4):
        engine.add_request(f"full{i}", [1, 2, 3], SamplingParams(max_new_tokens=4))
    with pytest.raises(NoFreeSlotError):
        engine.add_request("one-too-many", [1, 2, 3], SamplingParams(max_new_tokens=4))
    for i in range(4):
        engine.abort(f"full{i}")


def run_mixed_load(engine: Engine) -> dict[str, tuple[list[int], str | None]]:
    """Requests of several lengths and sampling modes joining, finishing and being aborted mid-flight, with slots
    reused at once; returns each request's tokens and finish reason."""
    prompts = random_token_blocks(6, 10, seed=31)
    sampled = SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    penalised = SamplingParams(max_new_tokens=7, temperature=0, frequency_penalty=1.5, ignore_eos=True)
    stop_free = engine.generate([prompts[3]], GREEDY)[0].token_ids
    stopping = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(stop_free[4],), ignore_eos=True)
    plan = [("greedy", 0, GREEDY), ("sampled", 1, sampled), ("penalised", 2, penalised), ("stops", 3, stopping)]
    results: dict[str, tuple[list[int], str | None]] = {}

    def record(outputs):
        for out in outputs:
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + out.new_token_ids, out.finish_reason)

    for rid, i, params in plan:
        engine.add_request(rid, prompts[i], params)
    for _ in range(3):
        record(engine.step())
    engine.abort("greedy")  # its slot is taken at once by a new request
    engine.add_request("late", prompts[4], SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        record(engine.step())
    results.pop("greedy")  # cut short by the abort: how many tokens it got depends on the step it was aborted in
    return results


def test_overlapped_decode_gives_the_same_results(llama_engine, overlapped_engine):
    """Decoding one step ahead (tokens fed back on the device, read a step later) changes nothing a caller sees:
    tokens, seeded sampling, penalties, stop tokens, length limits, and a slot reused right after an abort."""
    expected = run_mixed_load(llama_engine)
    assert run_mixed_load(overlapped_engine) == expected
    assert expected["stops"][1] == "stop" and expected["late"] == (expected["late"][0], "length")
    assert [len(expected[r][0]) for r in ("sampled", "penalised", "late")] == [9, 7, 5]


def test_overlapped_decode_reports_a_step_later(overlapped_engine):
    """The step that launches a decode returns the previous one's tokens; a finished request's extra row is
    dropped, and nothing is ever fed past max_new_tokens."""
    engine = overlapped_engine
    prompt = random_token_blocks(1, 12, seed=13)[0]
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True))
    counts = [[o.completion_tokens for o in engine.step()] for _ in range(4)]
    assert counts == [[1], [], [2], [3]]  # prefill; decode launched; its token; the last (nothing launched after)
    assert not engine.has_unfinished() and engine._inflight is None


def test_batched_prefill_in_scattered_slots(llama_engine):
    """Prompts that join in slots 1 and 3 (0 and 2 busy decoding) prefill in one padded batch, exactly as alone."""
    engine = llama_engine
    p = [random_token_blocks(1, n, seed=20 + n)[0] for n in (6, 9, 14, 30)]
    alone = [engine.generate([q], GREEDY)[0].token_ids for q in p]
    long = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    for rid, prompt in zip("abcd", [p[0], p[1], p[0], p[1]]):
        engine.add_request(rid, prompt, long)
    tokens: dict[str, list[int]] = {}

    def record(outputs):
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        return {out.request_id for out in outputs}

    record(engine.step())
    engine.abort("b")
    engine.abort("d")
    engine.add_request("x", p[2], GREEDY)
    engine.add_request("y", p[3], GREEDY)
    # x (14 tokens) and y (30 tokens) prefill in one forward, rows padded to 30, while a and c decode
    assert record(engine.step()) == {"a", "c", "x", "y"}
    while engine.has_unfinished():
        record(engine.step())
    assert tokens["x"] == alone[2] and tokens["y"] == alone[3]
    assert tokens["a"] == tokens["c"] == alone[0][:6]


def test_stop_token_ids(llama_engine):
    prompt = random_token_blocks(1, 10, seed=4)[0]
    free = llama_engine.generate([prompt], GREEDY)[0].token_ids
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i])
    if stop_at == 0:
        stop_at = next(i for i, t in enumerate(free) if i > 0 and t not in free[:i])
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[free[stop_at]], ignore_eos=True)
    stopped = llama_engine.generate([prompt], params)[0]
    assert stopped.token_ids == free[: stop_at + 1] and stopped.finish_reason == "stop"


# --- sampling ----------------------------------------------------------------------------------------------------


def test_seed_reproducible_and_batch_independent(llama_engine):
    prompt, other = random_token_blocks(2, 8, seed=6)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    first = llama_engine.generate([prompt], params)[0].token_ids
    assert llama_engine.generate([prompt], params)[0].token_ids == first
    assert (
        llama_engine.generate([other, prompt], [SamplingParams(temperature=0.7, max_new_tokens=16), params])[
            1
        ].token_ids
        == first
    )
    others = {
        tuple(llama_engine.generate([prompt], SamplingParams(max_new_tokens=16, seed=s))[0].token_ids) for s in range(4)
    }
    assert len(others) > 1


def test_top_k_1_is_greedy(llama_engine):
    prompt = random_token_blocks(1, 8, seed=7)[0]
    greedy = llama_engine.generate([prompt], GREEDY)[0].token_ids
    top1 = llama_engine.generate(
        [prompt], SamplingParams(max_new_tokens=24, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    )[0].token_ids
    assert top1 == greedy


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = filter_top_k_top_p(logits, torch.tensor([0, 3, 1]), torch.tensor([0.7, 1.0, 1.0])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False], [False, False, False, True]]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    n = 4000
    batch = SamplingBatch.build([SamplingParams()] * n, [7] * n, list(range(n)), torch.device("cpu"))
    tokens = sample(torch.log(probs).expand(n, 4), batch)
    freq = torch.bincount(tokens, minlength=4) / n
    assert torch.allclose(freq, probs, atol=0.03) and freq[3] == 0
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), 1000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02 and not torch.equal(u[0], u[1])


def test_penalties_move_logits_the_right_way():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    prompt_seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0, 0, 2, 0]])

    def penalized(**kw):
        batch = SamplingBatch.build([SamplingParams(**kw)], [0], [0], torch.device("cpu"))
        return apply_penalties(logits, batch, prompt_seen, counts)[0].tolist()

    # repetition: seen tokens (prompt or output) move toward less likely, from either sign
    assert penalized(repetition_penalty=2.0) == [1.0, -4.0, 0.5, 0.5]
    # presence / frequency: output tokens only, once / per occurrence
    assert penalized(presence_penalty=1.0) == [2.0, -2.0, 0.0, 0.5]
    assert penalized(frequency_penalty=1.0) == [2.0, -2.0, -1.0, 0.5]


def test_penalties_in_generation(llama_engine):
    """Greedy with a strong frequency penalty repeats fewer tokens than plain greedy."""
    prompt = random_token_blocks(1, 6, seed=8)[0]
    plain = llama_engine.generate([prompt], SamplingParams(max_new_tokens=40, temperature=0, ignore_eos=True))[0]
    params = SamplingParams(
        max_new_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True
    )
    penalized = llama_engine.generate([prompt], params)[0]
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"frequency_penalty": -2.5},
        {"seed": -1},
        {"stop": [""]},
        {"stop": [3]},
        {"stop_token_ids": [-1]},
        {"ignore_eos": "yes"},
    ],
)
def test_bad_sampling_params(kwargs):
    with pytest.raises(ConfigError, match="SamplingParams"):
        SamplingParams(**kwargs)


def test_sampling_params_normalise():
    p = SamplingParams(stop="END", stop_token_ids=[5], temperature=0)
    assert p.stop == ("END",) and p.stop_token_ids == (5,) and p.greedy


# --- text --------------------------------------------------------------------------------------------------------


def test_incremental_detokenizer_multibyte(smollm_engine):
    tok = smollm_engine.tokenizer
    text = "Café naïve — 世界 🎉🎉 ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)  # some tokens are only part of a character


def test_stop_string_held_back():
    class Chars:  # one token per character
        def decode(self, ids, **_):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), [], stop=("STOP",))
    deltas, stopped = [], False
    for ch in "abST!xST":
        delta, stopped = stream.push(ord(ch))
        deltas.append(delta)
    assert "".join(deltas) == "abST!x" and not stopped  # "ST" still held: it may become "STOP"
    assert [stream.push(ord(c)) for c in "OP"] == [("", False), ("", True)]
    assert stream.text == "abST!x"  # cut before the stop string; the held-back "ST" was never sent


def test_stream_and_stop_strings(smollm_engine):
    prompt = "Once upon a time"
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    full = smollm_engine.generate([prompt], params)[0]
    assert "".join(smollm_engine.stream(prompt, params)) == full.text
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip()
    with_stop = SamplingParams(max_new_tokens=12, temperature=0, stop=["never appears", stop])
    deltas = list(smollm_engine.stream(prompt, with_stop))
    assert "".join(deltas) == full.text[: full.text.index(stop)]
    cut = smollm_engine.generate([prompt], with_stop)[0]
    assert cut.finish_reason == "stop" and cut.text == "".join(deltas)


def test_chat(smollm_engine):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    result = smollm_engine.chat([{"role": "user", "content": "Say hi."}], params)
    assert result.completion_tokens >= 1 and result.finish_reason in ("stop", "length")
    assert smollm_engine.model_name == "smollm2-135m-rtn-g64" and smollm_engine.dtype == torch.float32


# --- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    ],
)
def test_rope_scaling_matches_transformers(rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tests.conftest import tiny_config

    hf_config = tiny_config("llama", rope_parameters={"rope_theta": 10000.0, **rope})
    cfg = ModelConfig.from_hf(hf_config)
    cos, sin = rope_tables(cfg, 400)
    positions = torch.arange(400)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    # dynamic: exact while the context stays within max_position_embeddings (512 here)
    torch.testing.assert_close(cos, hf_cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=1e-6, atol=1e-6)


def test_transformers_4_config_spelling():
    from types import SimpleNamespace

    old = SimpleNamespace(
        model_type="qwen2",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        rope_theta=1e6,
        rope_scaling={"type": "linear", "factor": 2.0},
        sliding_window=4096,
        use_sliding_window=False,
        tie_word_embeddings=True,
    )
    cfg = ModelConfig.from_hf(old)
    assert cfg.rope == {"type": "linear", "factor": 2.0, "rope_theta": 1e6, "rope_type": "linear"}
    assert cfg.head_dim == 16 and cfg.sliding_windows == (None, None)


# --- the GPU decode-attention kernel, off the GPU ------------------------------------------------------------------

_KERNEL_CHECK = r"""
import torch, torch.nn.functional as F
from awqkit.engine.attention import decode_attention
torch.manual_seed(0)
for B, H, Hkv, D, kv_len, window in [(2, 8, 2, 32, 256, None), (3, 28, 4, 64, 512, None), (2, 4, 4, 32, 256, 50)]:
    cache = torch.randn(B, 2, Hkv, kv_len + 40, D)
    q = torch.randn(B, H, D)
    lengths = torch.randint(1, kv_len + 1, (B,))
    lengths[0] = kv_len + 40  # clamped to kv_len
    keys, values = cache[:, 0, :, :kv_len], cache[:, 1, :, :kv_len]
    got = decode_attention(q, keys, values, lengths, window)
    for b in range(B):
        n = min(int(lengths[b]), kv_len)
        lo = max(0, n - window) if window else 0
        k, v = (t[b, :, lo:n].repeat_interleave(H // Hkv, 0) for t in (keys, values))
        ref = F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]
        assert torch.allclose(got[b], ref, atol=1e-5), (B, H, kv_len, window, (got[b] - ref).abs().max())
print("interpreter ok")
"""

_KERNEL_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from awqkit.engine import attention as A
ints = ["stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh", "stride_vl",
        "kv_len", "chunk", "window", "splits"]
sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "len_ptr": "*i64", "out_ptr": "*fp32",
       "lse_ptr": "*fp32", **{n: "i32" for n in ints}, "scale": "fp32"}
for pdl in (False, True):  # programmatic dependent launch: griddepcontrol.wait before the first load
    consts = dict(G=7, G_PAD=16, D=128, BLOCK=64, PDL=pdl)
    k = triton.compile(ASTSource(fn=A._partial_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                                 constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "launch_pdl": pdl})
    assert ("griddepcontrol.wait" in k.asm["ptx"]) == pdl
sig = {"part_ptr": "*fp32", "lse_ptr": "*fp32", "o_ptr": "*bf16", "stride_ob": "i32", "stride_oh": "i32",
       "splits": "i32"}
consts = dict(S_PAD=8, G=7, G_PAD=16, D=128, PDL=True)
triton.compile(ASTSource(fn=A._merge_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                         constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print("sm_90 compile ok")
"""


def _run_python(code: str, **env) -> str:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root), **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_decode_attention_kernel_in_triton_interpreter():
    """The split-context decode kernel's maths, on CPU through Triton's interpreter, against SDPA."""
    pytest.importorskip("triton")
    assert "interpreter ok" in _run_python(_KERNEL_CHECK, TRITON_INTERPRET="1")


def test_decode_attention_kernel_compiles_for_hopper():
    """Compiling for sm_90 needs no GPU and catches what the interpreter does not check (types, layouts)."""
    pytest.importorskip("triton.backends.nvidia")
    assert "compile ok" in _run_python(_KERNEL_COMPILE, TRITON_INTERPRET="0")


_NORM_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from awqkit.engine import fused
sig = {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16",
       "n_cols": "i32", "eps": "fp32"}
for has_residual in (True, False):
    consts = dict(HAS_RESIDUAL=has_residual, BLOCK=4096, PDL=has_residual)
    triton.compile(ASTSource(fn=fused._add_rms_norm_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                             constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
# the rope and SiLU kernels on finished outputs (bf16, one split) and on split-K partials (fp32, a bias)
for parts, bias, sb in (("*bf16", False, 1), ("*fp32", True, 64)):
    sig = {"parts_ptr": parts, "bias_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "qn_ptr": "*bf16",
           "kn_ptr": "*bf16", "cache_ptr": "*bf16", "rows_ptr": "*i64", "pos_ptr": "*i64", "q_out_ptr": "*bf16",
           **{n: "i32" for n in ("S", "stride_ps", "stride_pt", "stride_cr", "stride_ckv", "stride_ch", "stride_cp")},
           "eps": "fp32"}
    for has_norm in (True, False):
        consts = dict(H=28, HKV=4, D=128, HAS_NORM=has_norm, HAS_BIAS=bias, SB=sb, PDL=has_norm)
        triton.compile(ASTSource(fn=fused._rope_cache_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                                 constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": max(1, sb * 128 // 1024)})
    sig = {"parts_ptr": parts, "bias_ptr": "*bf16", "out_ptr": "*bf16",
           **{n: "i32" for n in ("S", "n_cols", "stride_ps", "stride_pt")}}
    consts = dict(HAS_BIAS=bias, SB=sb, BLOCK=1024 // sb, PDL=bias)
    triton.compile(ASTSource(fn=fused._silu_mul_kernel, signature={**sig, **{k: "constexpr" for k in consts}},
                             constexprs=consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print("sm_90 compile ok")
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [576, 100])
def test_fused_norm_kernel_matches_eager(dtype, hidden):
    """The GPU's fused residual-add + RMSNorm kernel (run by Triton's interpreter) against the model's PyTorch
    functions, with and without a residual, on a hidden size that is not a power of two."""
    pytest.importorskip("triton")
    from awqkit.engine import fused
    from awqkit.engine import model as M

    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, hidden, generator=g).to(dtype) for _ in range(2))
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)  # 2 bf16 ulps
    got, summed = fused.add_rms_norm(x, residual, weight, 1e-6)
    want, want_sum = M.add_rms_norm(x, residual, weight, 1e-6)
    # the residual stream is rounded to the activation dtype, as eager rounds it (Triton's interpreter rounds bf16
    # toward zero where the GPU rounds to nearest: one unit in the last place apart at most)
    torch.testing.assert_close(summed, want_sum, **tol)
    torch.testing.assert_close(got, want, **tol)
    alone, same = fused.add_rms_norm(x, None, weight, 1e-6)
    assert same is x or torch.equal(same, x)
    torch.testing.assert_close(alone, M.rms_norm(x, weight, 1e-6), **tol)
    ops = M.Ops(compile=False, fused_norm=True)  # what the model calls on a GPU
    ops._check_norms(torch.device("cpu"), dtype, torch.Generator().manual_seed(0))
    assert ops.add_rms_norm is not M.add_rms_norm  # the self-check kept the kernel


def split_in_three(module: torch.nn.Module, x: torch.Tensor):
    """``module(x)`` as a GPU split-K linear hands it to the fused kernels: three random fp32 partial sums of
    ``x @ W`` and the module's bias, still to add."""
    from awqkit.kernels.common import Partials

    bias = getattr(module, "bias", None)
    y = module(x).float() - (0 if bias is None else bias.float())
    g = torch.Generator().manual_seed(y.numel())
    a, b = (torch.randn(y.shape, generator=g) * y.std() for _ in range(2))
    return Partials(torch.stack((a, b, y - a - b)), bias)


@pytest.mark.parametrize("family,splits", [("qwen2", 3), ("qwen3", 3), ("qwen2", 1)])
def test_fused_kernels_in_the_model(family, splits, tmp_path, monkeypatch):
    """The whole decoder with the GPU's fused norm, rope and SiLU kernels (interpreted) gives the eager model's
    logits, prefill and decode, cache included (Qwen2: qkv bias; Qwen3: q/k norm). The linears hand the rope and
    SiLU kernels their output as one split (a CPU linear) or, as a split-K GPU linear does, as three fp32 partial
    sums with the bias left to add."""
    pytest.importorskip("triton")
    from awqkit.engine import fused
    from awqkit.engine import model as M

    model = tiny_model(family)
    path = save_checkpoint(model, tmp_path / family, quantize_rtn(model, QuantConfig(group_size=32)))
    engines = [Engine.from_checkpoint(path, max_num_seqs=2, max_model_len=64) for _ in range(2)]
    ops = engines[1].model.layers[0].attn.ops  # one Ops object serves every layer
    ops.__init__(compile=False, fused_norm=True, fused_partials=True)
    ops.check(torch.device("cpu"), torch.float32)
    assert ops.partials and ops.rope_and_cache is fused.rope_and_cache  # the self-check kept the kernels
    called = set()
    helper = split_in_three if splits == 3 else M.linear_partials

    def spy(module, x):
        called.add(module)
        return helper(module, x)

    monkeypatch.setattr(M, "linear_partials", spy)
    prompts = random_token_blocks(2, 9, seed=2)
    outs = [e.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)) for e in engines]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    with torch.inference_mode():
        tokens, positions = torch.tensor(prompts), torch.arange(9).expand(2, 9)
        logits = [e.model(tokens, positions, 0, 9, logits="all") for e in engines]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert called == {m for layer in engines[1].model.layers for m in (layer.attn.qkv, layer.mlp.gate_up)}


def test_fused_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    assert "compile ok" in _run_python(_NORM_COMPILE, TRITON_INTERPRET="0")
