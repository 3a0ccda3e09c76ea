"""``Engine``: requests in, tokens and text out — continuous batching over a fixed set of KV-cache slots.

Each request owns one slot (a row of the KV cache) from ``add_request`` until it finishes or is aborted. A ``step``
does two things, in the manner of vLLM's chunked prefill:

1. prefill: up to ``prefill_chunk`` prompt tokens of the requests still reading their prompt (oldest first, in one
   padded batch: several short prompts share one pass over the weights; a long prompt is spread over several steps).
   A request whose prompt is done gets its first token here.
2. decode: one token for every request that had one before the step, all in one batch (one CUDA-graph replay on GPU),
   whatever their lengths: rows are slots, lengths are positions.

On a GPU the decode runs one step ahead of the host (``overlap_decode``): a step launches the next decode, feeding
it the tokens the previous one sampled straight from device memory, and only then waits for the previous step's
tokens and does the host's share of the work — stop checks, detokenisation, and whatever the caller does with the
outputs (the server's streaming) — while the GPU computes. The price is one speculative row: a request that turns
out to have finished (stop token, stop string) was already fed to the next step, whose output for it is dropped.
A request that reaches ``max_new_tokens`` is never fed again, so no request writes past its context.
The engine is not thread-safe: drive it from one thread (the server's scheduler does).
"""

from __future__ import annotations

import itertools
import json
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from awqkit.engine.config import ModelConfig
from awqkit.engine.detok import TextStream
from awqkit.engine.graphs import EagerDecoder, GraphDecoder, PrefillRunner
from awqkit.engine.model import build_model
from awqkit.engine.sampling import SamplingBatch, SamplingParams, sample
from awqkit.engine.transfer import to_device
from awqkit.errors import AwqkitError, ConfigError
from awqkit.formats.config import QuantConfig

DEFAULT_MAX_MODEL_LEN = 4096


class NoFreeSlotError(AwqkitError, RuntimeError):
    """``add_request`` found every slot taken: check ``num_free_slots()`` first, or wait for a request to finish."""


@dataclass
class RequestOutput:
    """What one ``step`` produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" (stop token, end of sequence or stop string) or "length"; None while running
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    """A finished generation (``Engine.generate``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Launched:
    """A decode step on its way: the requests of its rows and their sampled tokens' copy to the host."""

    reqs: list[_Request]
    tokens: torch.Tensor  # [len(reqs)], on the host once ``ready`` has completed
    ready: torch.cuda.Event | None  # None: already on the host (CPU)

    @classmethod
    def start(cls, reqs: list[_Request], tokens: torch.Tensor) -> _Launched:
        if tokens.device.type != "cuda":
            return cls(reqs, tokens, None)
        host = tokens.to("cpu", non_blocking=True)  # into pinned memory: the copy is queued, not waited for
        ready = torch.cuda.Event()
        ready.record()
        return cls(reqs, host, ready)

    def wait(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # waits for this step only (not for the one launched after it)
        return self.tokens.tolist()


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    slot: int
    seed: int
    stop_ids: frozenset[int]
    text: TextStream
    cached: int = 0  # tokens whose keys/values are in the cache (or are being written by a launched step)
    output: list[int] = field(default_factory=list)
    inflight: int = 0  # tokens sampled on the device and not yet read back (0 or 1)

    @property
    def decoding(self) -> bool:
        """Prompt cached and a sampled token waiting to be fed back."""
        return bool(self.output)


class Engine:
    """A decoder with a static KV cache of ``max_num_seqs`` slots of ``max_model_len`` tokens.

    Build it with :meth:`from_checkpoint` (or :meth:`from_tensors`). Attributes: ``tokenizer`` (None if the
    checkpoint has none: then prompts must be token ids and text is empty), ``config`` (the Transformers config),
    ``device``, ``dtype``, ``max_model_len``, ``max_num_seqs``, ``model_name``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: set[int],
        model_name: str,
        prefill_chunk: int,
        cuda_graphs: bool,
        overlap_decode: bool | None = None,
    ) -> None:
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device, self.dtype = device, dtype
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.model_name = model_name
        self.prefill_chunk = prefill_chunk
        self.vocab_size = model.cfg.vocab_size
        self._requests: dict[str, _Request] = {}  # insertion order = arrival order
        self._slots: list[_Request | None] = [None] * max_num_seqs
        self._rng = random.Random()
        self._ids = itertools.count()
        # penalty state, per slot, allocated when a request first asks for a penalty
        self._prompt_seen: torch.Tensor | None = None  # [slots, vocab] bool
        self._counts: torch.Tensor | None = None  # [slots, vocab] int32
        # overlapping pays where the device runs ahead of the host; on a CPU it would only add a wasted row
        self.overlap_decode = device.type == "cuda" if overlap_decode is None else overlap_decode
        self._inflight: _Launched | None = None  # the decode step launched and not yet read back
        with torch.inference_mode():
            use_graphs = cuda_graphs and device.type == "cuda"
            self._decoder = (
                GraphDecoder(model, max_num_seqs, max_model_len) if use_graphs else EagerDecoder(model, max_num_seqs)
            )
            # prefill blocks replayed from graphs too (captured per bucket on first use), in the decode graphs' pool
            self._prefiller = PrefillRunner(
                model, max_num_seqs, max_model_len, prefill_chunk, use_graphs, getattr(self._decoder, "pool", None)
            )

    # --- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Load an AWQ (or float) checkpoint directory with its tokenizer.

        Args:
            device: None → CUDA when available, else CPU.
            dtype: activations (and float weights); None → bfloat16 on CUDA, float32 on CPU.
            max_num_seqs: KV-cache slots, the most requests decoding at once.
            max_model_len: prompt + generated tokens per request; None → min(max_position_embeddings, 4096).
            kwargs: ``prefill_chunk`` (512), ``cuda_graphs`` (True), ``overlap_decode`` (None), as for
                :meth:`from_tensors`.
        """
        from awqkit.formats.load import read_checkpoint

        ckpt = read_checkpoint(path)
        return cls.from_tensors(
            ckpt.config,
            ckpt.quant,
            ckpt.tensors,
            tokenizer=_load_tokenizer(ckpt.path),
            device=device,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            eos_token_ids=_generation_eos(ckpt.path),
            model_name=Path(str(path)).name,
            **kwargs,
        )

    @classmethod
    def from_tensors(
        cls,
        config: Any,
        quant: QuantConfig | None,
        tensors: dict[str, torch.Tensor],
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        eos_token_ids: Sequence[int] = (),
        model_name: str = "model",
        prefill_chunk: int = 512,
        cuda_graphs: bool = True,
        overlap_decode: bool | None = None,
    ) -> Engine:
        """Build from in-memory tensors named as in the checkpoint (what :meth:`from_checkpoint` does after reading).

        On CUDA, AWQ layers run the 4-bit kernels of :mod:`awqkit.kernels`. On CPU (or without the kernels) they are
        dequantized once at load: the reference AWQ path would unpack every weight on every call.
        ``overlap_decode``: run the decode one step ahead of the host (module docstring); None → on CUDA only.
        """
        from awqkit import kernels

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype {dtype} is not supported; use torch.bfloat16, torch.float16 or torch.float32")
        cfg = ModelConfig.from_hf(config)
        max_model_len = max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if max_model_len < 2 or max_num_seqs < 1 or prefill_chunk < 1:
            raise ConfigError(
                f"need max_model_len >= 2, max_num_seqs >= 1 and prefill_chunk >= 1; got {max_model_len}, "
                f"{max_num_seqs} and {prefill_chunk}"
            )
        on_gpu = device.type == "cuda"
        dequantize = not (on_gpu and kernels.available() and dtype != torch.float32)
        with torch.inference_mode():
            model = build_model(
                cfg, quant, tensors, device, dtype, max_num_seqs, max_model_len, dequantize=dequantize, compile=on_gpu
            )
        eos = set(eos_token_ids) | _as_ids(getattr(config, "eos_token_id", None))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        return cls(
            model,
            config,
            tokenizer,
            device,
            dtype,
            max_num_seqs,
            max_model_len,
            eos,
            model_name,
            prefill_chunk,
            cuda_graphs,
            overlap_decode,
        )

    # --- continuous batching ------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        """Queue a request into a free slot; its prefill starts at the next ``step``.

        Raises:
            ConfigError: empty prompt, token ids outside the vocabulary, prompt + max_new_tokens over
                ``max_model_len``, a duplicate ``request_id``, or stop strings without a tokenizer.
            NoFreeSlotError: every slot is taken (check :meth:`num_free_slots` first).
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if request_id in self._requests:
            raise ConfigError(f"request id {request_id!r} is already running")
        self._validate(prompt, params)
        slot = next((i for i, r in enumerate(self._slots) if r is None), None)
        if slot is None:
            raise NoFreeSlotError(f"all {self.max_num_seqs} slots are busy; wait for a request to finish")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = _Request(
            request_id, prompt, params, slot, seed, frozenset(stop_ids), TextStream(self.tokenizer, prompt, params.stop)
        )
        if params.has_penalties:
            self._init_penalties(req)
        self._requests[request_id] = self._slots[slot] = req

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ConfigError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ConfigError(f"prompt token ids must be in [0, {self.vocab_size}) for this model")
        if len(prompt) + params.max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the maximum "
                f"context of {self.max_model_len} tokens; shorten the prompt or lower max_new_tokens"
            )
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer, and this checkpoint has none; use stop_token_ids")

    def abort(self, request_id: str) -> None:
        """Drop a request and free its slot now (unknown ids are ignored)."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._slots[req.slot] = None

    def num_free_slots(self) -> int:
        return self._slots.count(None)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Prefill up to ``prefill_chunk`` prompt tokens, then decode one token for every decoding request.

        With ``overlap_decode`` the decode tokens returned are those of the step launched by the previous call, and
        this call's decode is left running on the device (module docstring)."""
        outputs: list[RequestOutput] = []
        decoding = [r for r in self._requests.values() if r.decoding]  # before the prefill adds any
        self._prefill(outputs)
        launched = self._launch_decode(decoding)
        if self.overlap_decode:
            launched, self._inflight = self._inflight, launched
        if launched is not None:
            self._read_decode(launched, outputs)
        return outputs

    def _launch_decode(self, decoding: list[_Request]) -> _Launched | None:
        """Queue one decode step for those of ``decoding`` with tokens left to generate."""
        reqs = [r for r in decoding if len(r.output) + r.inflight < r.params.max_new_tokens]
        if not reqs:
            return None
        rows = max(r.slot for r in reqs) + 1
        row_tokens, row_positions, from_last = [0] * rows, [self.max_model_len] * rows, [0] * rows
        for r in reqs:
            # a token still on the device (sampled by the step in flight) is fed from there, not from the host
            row_tokens[r.slot], row_positions[r.slot], from_last[r.slot] = r.output[-1], r.cached, r.inflight
            r.cached += 1
        logits = self._decoder(row_tokens, row_positions, from_last, max(row_positions[r.slot] for r in reqs) + 1)
        slots = [r.slot for r in reqs]
        rows_t = None if slots == list(range(len(slots))) else to_device(slots, torch.long, logits.device)
        tokens = self._sample(reqs, logits[: len(reqs)] if rows_t is None else logits[rows_t])
        self._decoder.remember(tokens, rows_t)
        for r in reqs:
            r.inflight += 1
        return _Launched.start(reqs, tokens)

    def _read_decode(self, launched: _Launched, outputs: list[RequestOutput]) -> None:
        """Append a decode step's tokens to the requests still running (a finished or aborted one's is dropped)."""
        for req, token in zip(launched.reqs, launched.wait()):
            req.inflight -= 1
            if self._requests.get(req.id) is req:
                outputs.append(self._append(req, token))

    def _prefill(self, outputs: list[RequestOutput]) -> None:
        """One forward over the next prompt chunks of as many prefilling requests as ``prefill_chunk`` allows.

        Rows are padded to the longest chunk, and padding counts against the budget (``rows x longest``), so a
        batch of short prompts shares one pass through the weights while a long prompt still goes in chunks.
        """
        batch: list[tuple[_Request, int]] = []
        longest = 0
        for req in self._requests.values():
            if req.decoding:
                continue
            room = self.prefill_chunk // (len(batch) + 1)  # the longest chunk a batch one row larger can take
            n = min(len(req.prompt) - req.cached, room if batch else self.prefill_chunk)
            if n < 1 or (batch and (len(batch) + 1) * max(longest, n) > self.prefill_chunk):
                break
            batch.append((req, n))
            longest = max(longest, n)
        if not batch:
            return
        pad = self.max_model_len  # the cache's spare position (see Transformer.forward)
        tokens = [r.prompt[r.cached : r.cached + n] + [0] * (longest - n) for r, n in batch]
        positions = [list(range(r.cached, r.cached + n)) + [pad] * (longest - n) for r, n in batch]
        kv_len = max(r.cached + n for r, n in batch)
        done = [(i, r) for i, (r, n) in enumerate(batch) if r.cached + n == len(r.prompt)]
        # host tensors: the prefill runner pads them into one pinned buffer and copies that to the device at once
        slots = batch[0][0].slot if len(batch) == 1 else torch.tensor([r.slot for r, _ in batch])
        logits = self._prefiller(
            torch.tensor(tokens),
            torch.tensor(positions),
            slots,
            kv_len,
            logits="last" if done else "none",
            last=torch.tensor([n - 1 for _, n in batch]) if done else None,
        )
        for req, n in batch:
            req.cached += n
        if done:
            rows = to_device([i for i, _ in done], torch.long, self.device)
            self._sample_and_append([r for _, r in done], logits[rows], outputs)

    def _sample_and_append(self, reqs: list[_Request], logits: torch.Tensor, outputs: list[RequestOutput]) -> None:
        tokens = self._sample(reqs, logits).tolist()
        for req, token in zip(reqs, tokens):
            outputs.append(self._append(req, token))

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """One token per request from ``logits [len(reqs), vocab]``."""
        params = [r.params for r in reqs]
        if all(p.greedy and not p.has_penalties for p in params):
            return sample(logits, None)
        steps = [len(r.output) + r.inflight for r in reqs]  # the index of the token each row samples now
        batch = SamplingBatch.build(params, [r.seed for r in reqs], steps, self.device)
        penalties = None
        if any(p.has_penalties for p in params):
            slots = to_device([r.slot for r in reqs], torch.long, self.device)
            penalties = (self._prompt_seen[slots], self._counts[slots])
        tokens = sample(logits[:, : self.vocab_size], batch, penalties)
        if penalties is not None:
            self._counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        return tokens

    def _init_penalties(self, req: _Request) -> None:
        if self._counts is None:
            shape = (self.max_num_seqs, self.vocab_size)
            self._prompt_seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self._prompt_seen[req.slot] = False
        self._prompt_seen[req.slot, to_device(req.prompt, torch.long, self.device)] = True
        self._counts[req.slot] = 0

    def _append(self, req: _Request, token: int) -> RequestOutput:
        """Record a sampled token; finish the request on a stop token, stop string or length limit."""
        req.output.append(token)
        reason = None
        if token in req.stop_ids:
            reason, delta = "stop", req.text.finish()  # the stop token itself adds no text
        else:
            delta, hit_stop_string = req.text.push(token)
            if hit_stop_string:
                reason = "stop"  # the text is already cut before the stop string, and all of it sent
            elif len(req.output) >= req.params.max_new_tokens:
                reason, delta = "length", delta + req.text.finish()
        if reason is not None:
            self.abort(req.id)
        return RequestOutput(req.id, [token], delta, reason is not None, reason, len(req.prompt), len(req.output))

    # --- conveniences -------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt (text needs the tokenizer; ids pass through)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this checkpoint has no tokenizer; pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt (batched, at most ``max_num_seqs`` at a time); results in prompt order.

        Not for use while a server drives the same engine: it steps every request in the engine.
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        pending = deque((f"_generate-{next(self._ids)}", self.encode(p), sp) for p, sp in zip(prompts, params_list))
        order = [rid for rid, _, _ in pending]
        for _, ids, sp in pending:  # validate every prompt before starting any
            self._validate(ids, sp)
        results: dict[str, GenerationResult] = {}
        try:
            while pending or any(rid in self._requests for rid in order):
                while pending and self.num_free_slots():
                    rid, ids, sp = pending.popleft()
                    self.add_request(rid, ids, sp)
                    results[rid] = GenerationResult("", [], "", len(ids), 0)
                for out in self.step():
                    res = results.get(out.request_id)
                    if res is None:
                        continue
                    res.text += out.text_delta
                    res.token_ids += out.new_token_ids
                    res.completion_tokens = out.completion_tokens
                    if out.finished:
                        res.finish_reason = out.finish_reason
        finally:
            for rid in order:
                self.abort(rid)
        return [results[rid] for rid in order]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one generation as they are produced (multi-byte characters are never split)."""
        rid = f"_stream-{next(self._ids)}"
        self.add_request(rid, self.encode(prompt), params)
        try:
            while rid in self._requests:
                for out in self.step():
                    if out.request_id == rid and out.text_delta:
                        yield out.text_delta
        finally:
            self.abort(rid)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> GenerationResult:
        """One assistant reply to ``messages`` (``[{"role": ..., "content": ...}]``) through the chat template."""
        return self.generate([self.chat_prompt(messages)], params)[0]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids the chat template makes of ``messages``, ending with the assistant turn's header."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"{self.model_name} has no chat template; use generate() with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def _generation_eos(path: Path) -> set[int]:
    """The end-of-sequence ids of ``generation_config.json`` (chat models list their end-of-turn token there)."""
    file = path / "generation_config.json"
    try:
        return _as_ids(json.loads(file.read_text()).get("eos_token_id")) if file.is_file() else set()
    except (ValueError, TypeError):
        return set()


def _load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer, or None when the directory has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
