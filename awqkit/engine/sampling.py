"""``SamplingParams`` and the batched sampler.

The sampler works on a batch of rows with per-row settings, in the order vLLM uses: penalties → temperature →
top-k → top-p → draw. The draw is the exponential race (argmax of ``p_i / E_i`` with ``E_i ~ Exp(1)`` is a sample
from ``p``), with ``E`` made by hashing ``(seed, step, token id)``: a request's random numbers depend only on its own
seed and how many tokens it has produced, so a seeded request gives the same text alone or in any batch, on any device
(up to the logits' own rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from awqkit.engine.transfer import to_device
from awqkit.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    Attributes:
        max_new_tokens: stop after this many generated tokens (finish reason ``"length"``).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1 = off).
        top_k: keep the ``top_k`` most likely tokens (0 = off).
        repetition_penalty: Transformers' / CTRL's: logits of tokens seen in the prompt or the output are divided by it
            when positive, multiplied when negative (1 = off, > 1 discourages repeats).
        presence_penalty: OpenAI's: subtracted once from the logit of every token already generated (-2 .. 2).
        frequency_penalty: OpenAI's: subtracted per occurrence of a token already generated (-2 .. 2).
        seed: makes sampling reproducible for this request (None: a fresh random seed).
        stop: strings that end generation; the text returned stops before them.
        stop_token_ids: token ids that end generation (in addition to the model's end-of-sequence ids).
        ignore_eos: keep going past the end-of-sequence tokens (stop_token_ids still apply).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | str = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"SamplingParams: {what}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(f"{name} must be a finite number, got {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"{name} must be an integer, got {value!r}")
            return value

        if integer("max_new_tokens") < 1:
            raise bad(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if number("temperature") < 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if integer("top_k") < 0:
            raise bad(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if number("repetition_penalty") <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and (integer("seed") < 0 or self.seed >= 2**63):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids)
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.ignore_eos, bool):
            raise bad(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class SamplingBatch:
    """Per-row sampling settings as device tensors (rows = the requests being sampled this step)."""

    temperature: torch.Tensor  # [n] float32
    top_p: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] int64
    repetition_penalty: torch.Tensor  # [n] float32
    presence_penalty: torch.Tensor  # [n] float32
    frequency_penalty: torch.Tensor  # [n] float32
    seeds: torch.Tensor  # [n] int64
    steps: torch.Tensor  # [n] int64: tokens generated so far by each row's request
    truncate: bool  # whether any row uses top-k or top-p (the sort is skipped otherwise)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int], device: torch.device):
        def col(values, dtype):
            return to_device(values, dtype, device)

        f32 = torch.float32
        return cls(
            col([p.temperature for p in params], f32),
            col([p.top_p for p in params], f32),
            col([p.top_k for p in params], torch.int64),
            col([p.repetition_penalty for p in params], f32),
            col([p.presence_penalty for p in params], f32),
            col([p.frequency_penalty for p in params], f32),
            col(seeds, torch.int64),
            col(steps, torch.int64),
            any(p.top_k > 0 or p.top_p < 1 for p in params),
        )


def apply_penalties(
    logits: torch.Tensor, batch: SamplingBatch, prompt_seen: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens; presence/frequency penalties over output tokens.

    Args:
        logits: ``[n, V]`` float32.
        prompt_seen: ``[n, V]`` bool, the tokens of each row's prompt.
        counts: ``[n, V]`` int, how often each token was generated.
    """
    seen = prompt_seen | (counts > 0)
    rep = batch.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    counts = counts.to(logits.dtype)
    return logits - batch.frequency_penalty[:, None] * counts - batch.presence_penalty[:, None] * (counts > 0)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set the logits outside each row's top-k, then outside its top-p nucleus, to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    probs = sorted_logits.softmax(-1)
    # drop a token when the more likely ones already reach top_p (the most likely token always stays)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Hash Prospector's low-bias 2-round) on int64 tensors; multipliers < 2**31 so the
    products never overflow int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & _MASK32
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[n, vocab]`` uniforms in (0, 1), a pure function of (seed, step, token id)."""
    row = _mix32(_mix32(seeds ^ (seeds >> 32)) + _mix32(steps + 0x9E3779B9))
    col = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x61C88647)
    bits = _mix32(row[:, None] ^ col[None, :]) >> 8  # 24 random bits
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, batch: SamplingBatch | None, penalties: tuple | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits [n, V]``.

    Args:
        batch: per-row settings; None means every row is greedy without penalties (argmax only).
        penalties: ``(prompt_seen, counts)`` rows when some row has penalties, else None.
    """
    if batch is None:
        return logits.argmax(-1)
    logits = logits.float()
    if penalties is not None:
        logits = apply_penalties(logits, batch, *penalties)
    greedy = logits.argmax(-1)
    temperature = batch.temperature
    logits = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if batch.truncate:
        logits = filter_top_k_top_p(logits, batch.top_k, batch.top_p)
    # exponential race: argmax(log p - log E) with E = -log U ~ Exp(1) draws from softmax(logits)
    exp_noise = -torch.log(uniform_noise(batch.seeds, batch.steps, logits.shape[-1]))
    drawn = (logits - torch.log(exp_noise)).argmax(-1)
    return torch.where(temperature > 0, drawn, greedy)
