"""Graph-captured prefill (``awqkit.engine.graphs.PrefillRunner``), on a CPU: the padded-bucket forward that a graph
replays must give the unpadded forward's logits and KV-cache contents, and touch no other slot's cache.

CPU, float32, tiny models built directly with ``build_model`` (no checkpoint round trip): the graphs themselves are
checked on a GPU by ``benchmarks/engine.py``'s start-up checks.
"""

from __future__ import annotations

import pytest
import torch

from awqkit.engine.config import ModelConfig
from awqkit.engine.graphs import PrefillRunner, pad_prefill, prefill_size, prefill_views
from awqkit.engine.model import Transformer, build_model
from tests.conftest import tiny_model

MAX_SEQS, MAX_LEN, CHUNK = 6, 300, 64  # context buckets 256, 300; token buckets 16, 32, 64; <= 128 padded tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second OpenMP thread costs more than it saves on a busy 2-core runner (see test_engine.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def engine_model(family: str, **overrides) -> Transformer:
    """A tiny random model of ``family`` as the engine's decoder (float32, CPU), its cache full of finite noise:
    the keys and values of earlier requests, which every slot may hold."""
    hf = tiny_model(family, seed=3, **overrides)
    tensors = {k: v.detach() for k, v in hf.state_dict().items()}
    cfg = ModelConfig.from_hf(hf.config)
    model = build_model(cfg, None, tensors, torch.device("cpu"), torch.float32, MAX_SEQS, MAX_LEN)
    model.kv_cache.copy_(torch.randn(model.kv_cache.shape, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral"])
def model(request) -> Transformer:
    """Llama; Qwen3 (q/k norms, tied embeddings); Mistral with a 24-token window, which every padded row at the
    scratch position sees nothing of at short contexts (all-masked rows must stay in their rows)."""
    overrides = {"sliding_window": 24} if request.param == "mistral" else {}
    if request.param == "qwen3":
        overrides["tie_word_embeddings"] = True
    return engine_model(request.param, **overrides)


def block(lengths: list[int], starts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The engine's prefill block: row ``i`` holds ``lengths[i]`` tokens at positions ``starts[i] ...``, padded to the
    longest with token 0 at ``MAX_LEN``; returns ``(tokens, positions, last, kv_len)``."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    positions = torch.full((len(lengths), T), MAX_LEN, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        tokens[i, :n] = torch.randint(3, 320, (n,), generator=g)
        positions[i, :n] = torch.arange(s, s + n)
    last = torch.tensor([n - 1 for n in lengths])
    return tokens, positions, last, max(s + n for n, s in zip(lengths, starts))


def slot_list(slots: int | torch.Tensor, rows: int) -> list[int]:
    return list(range(slots, slots + rows)) if isinstance(slots, int) else slots.tolist()


CASES = {
    # B = 1 at an int slot: tokens 21 -> 32, context 51 -> 256
    "one-row": ([21], [30], 2),
    # B = 3 in scattered slots, rows of different lengths (19, 7, 12) after different contexts: rows 3 -> 4 (the
    # padded row takes slot 0, which holds another request's cache), tokens 19 -> 32, context 107 -> 256
    "scattered": ([19, 7, 12], [0, 100, 40], torch.tensor([5, 1, 3])),
    # B = 2 at consecutive slots 3, 4: tokens 40 -> 64, context 280 -> the last bucket (300 = max_model_len)
    "long-context": ([40, 33], [240, 200], 3),
    # B = 5 single tokens (prompts' last tokens): rows 5 -> 8, tokens 1 -> 16
    "five-rows": ([1, 1, 1, 1, 1], [9, 0, 250, 3, 77], torch.tensor([4, 0, 1, 5, 2])),
}


@pytest.mark.parametrize("case", CASES)
def test_padded_prefill_matches_unpadded(model, case):
    """The bucket's padded forward gives the unpadded forward's last-token logits and the same cache contents at every
    real position; slots outside the block (slot 0 under a padded row included) keep theirs bit for bit."""
    lengths, starts, slots = CASES[case]
    tokens, positions, last, kv_len = block(lengths, starts, seed=len(lengths))
    runner = PrefillRunner(model, MAX_SEQS, MAX_LEN, CHUNK)
    b, t, kv = runner.bucket(*tokens.shape, kv_len)
    assert (b, t, kv) != (*tokens.shape, kv_len), "the case must exercise padding"
    before = model.kv_cache.clone()
    with torch.inference_mode():
        want = model(tokens, positions, slots, kv_len, logits="last", last=last)
        want_cache = model.kv_cache.clone()
        model.kv_cache.copy_(before)
        got = runner.run_padded(tokens, positions, slots, kv_len, last=last)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    real = slice(0, MAX_LEN)  # every cache position but the scratch one, which padding writes and nobody reads
    torch.testing.assert_close(model.kv_cache[..., real, :], want_cache[..., real, :], rtol=1e-5, atol=1e-5)
    layers = model.cfg.num_layers
    by_slot = model.kv_cache.view(layers, MAX_SEQS, *model.kv_cache.shape[1:])
    untouched = [s for s in range(MAX_SEQS) if s not in slot_list(slots, len(lengths))]
    assert untouched
    original = before.view_as(by_slot)
    for s in untouched:
        assert torch.equal(by_slot[:, s, ..., real, :], original[:, s, ..., real, :]), f"slot {s} was written"
    # and the block did write its real positions (the comparison above is not vacuous)
    s0 = slot_list(slots, len(lengths))[0]
    assert not torch.equal(by_slot[:, s0, ..., starts[0], :], original[:, s0, ..., starts[0], :])


def test_default_last_is_each_rows_final_column(model):
    """Without ``last`` the padded forward takes column ``T - 1`` of the unpadded block, as the model does."""
    tokens, positions, _, kv_len = block([10, 10], [5, 60], seed=7)
    runner = PrefillRunner(model, MAX_SEQS, MAX_LEN, CHUNK)
    before = model.kv_cache.clone()
    with torch.inference_mode():
        want = model(tokens, positions, torch.tensor([1, 4]), kv_len)
        model.kv_cache.copy_(before)
        got = runner.run_padded(tokens, positions, torch.tensor([1, 4]), kv_len)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_calls_the_model_unpadded(model):
    """On a CPU (graphs or not) a call is the model's own forward on the block as given: no padding, same result;
    "none" returns None after writing the same cache."""
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    tokens, positions, last, kv_len = block([19, 7, 12], [0, 100, 40], seed=3)
    slots = torch.tensor([5, 1, 3])
    runner = PrefillRunner(model, MAX_SEQS, MAX_LEN, CHUNK, cuda_graphs=True)
    before = model.kv_cache.clone()
    try:
        with torch.inference_mode():
            want = model(tokens, positions, slots, kv_len, logits="last", last=last)
            want_cache = model.kv_cache.clone()
            model.kv_cache.copy_(before)
            got = runner(tokens, positions, slots, kv_len, logits="last", last=last)
            model.kv_cache.copy_(before)
            none = runner(tokens, positions, slots, kv_len, logits="none")
    finally:
        hook.remove()
    assert shapes == [(3, 19)] * 3
    assert torch.equal(got, want) and none is None
    assert torch.equal(model.kv_cache, want_cache)
    assert runner.stats["eager"] == 2 and runner.stats["replays"] == 0


def test_buckets():
    model = engine_model("llama")
    runner = PrefillRunner(model, MAX_SEQS, MAX_LEN, CHUNK)
    assert runner.bucket(1, 1, 1) == (1, 16, 256)
    assert runner.bucket(1, 17, 256) == (1, 32, 256)
    assert runner.bucket(3, 29, 257) == (4, 32, 300)
    assert runner.bucket(2, 64, 300) == (2, 64, 300)
    assert runner.bucket(5, 16, 10) == (6, 16, 256)  # rows: 1, 2, 4, then max_num_seqs
    assert runner.bucket(3, 33, 10) is None  # 4 x 64 padded tokens > 2 x prefill_chunk
    assert runner.bucket(1, 65, 10) is None  # longer than a chunk
    assert runner.bucket(7, 1, 10) is None  # more rows than slots
    assert runner.bucket(1, 1, 301) is None  # beyond the cache


def test_pad_prefill_layout():
    """One flat block: tokens, positions, slots, last; padding is token 0 at the scratch position, slot 0, column 0."""
    tokens = torch.tensor([[5, 6, 7], [8, 9, 0]])
    positions = torch.tensor([[10, 11, 12], [0, 1, 50]])
    buf = torch.full((prefill_size(4, 4) + 3,), -1, dtype=torch.long)
    pad_prefill(buf, tokens, positions, 2, None, 4, 4, scratch=50)
    tok, pos, slots, last = prefill_views(buf, 4, 4)
    assert tok.tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [0] * 4, [0] * 4]
    assert pos.tolist() == [[10, 11, 12, 50], [0, 1, 50, 50], [50] * 4, [50] * 4]
    assert slots.tolist() == [2, 3, 0, 0] and last.tolist() == [2, 2, 0, 0]
    assert buf[prefill_size(4, 4) :].tolist() == [-1] * 3  # nothing written past the block
    pad_prefill(buf, tokens, positions, torch.tensor([4, 1]), torch.tensor([2, 1]), 2, 4, scratch=50)
    tok, pos, slots, last = prefill_views(buf, 2, 4)
    assert slots.tolist() == [4, 1] and last.tolist() == [2, 1]
