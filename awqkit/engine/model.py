"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as a few plain modules, in the shape of gpt-fast's ``model.py``.

One forward serves both phases. It takes a block of rows (KV-cache slots ``slot_start .. slot_start + B``), ``T``
new tokens per row with their positions, writes their keys and values into the cache at those positions and attends
over the first ``kv_len`` cache positions of each row, masked by position: a key is visible to a query iff
``key_pos <= query_pos`` (and within the sliding window, where the model has one). Prefill is ``B = 1, T = chunk``;
decode is ``B = bucket, T = 1``, where rows of different lengths are just different positions. Shapes depend only on
``(B, T, kv_len)``, so a decode step can be captured once per bucket and replayed. Attention is SDPA with a
position mask, except at decode on a GPU, where :mod:`awqkit.engine.attention`'s split-context kernel takes the
per-row lengths instead.

Rows that have nothing to decode in a step are fed position ``max_model_len``: the cache has one spare position
there (a scratch column written by such rows and by nobody's real tokens), and their output is ignored.

The weights are whatever the checkpoint holds: :class:`~awqkit.nn.AWQLinear` (4-bit, q/k/v and gate/up fused so that
each input is read once and each decode step launches two matmuls fewer per layer) or plain float matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from awqkit.engine import attention, fused
from awqkit.engine.config import ModelConfig, rope_tables
from awqkit.errors import CheckpointError
from awqkit.formats import gemm
from awqkit.formats.config import QuantConfig
from awqkit.nn import AWQLinear, fuse_awq_linears

if TYPE_CHECKING:
    from awqkit.kernels.common import Partials

log = logging.getLogger(__name__)

# --- the pointwise pieces of a layer -----------------------------------------------------------------------------
# Written once as plain PyTorch. On CUDA each is torch.compile'd into one kernel, which matters at decode: a step is
# ~12 kernels a layer, and unfused these would be ~35 (the norms, the rotary embedding and the SiLU use hand-written
# kernels there instead, the last two also summing the split-K partials of the linear before them:
# :mod:`awqkit.engine.fused`). On CPU they run eagerly (tests, embedded default).


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as Transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then normalise it: returns ``(norm(residual), residual)``."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    cache: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Per-head q/k norm (Qwen3) and rotary embedding of ``q [N, H, D]``, ``k [N, Hkv, D]``; writes ``k, v`` into
    ``cache [rows, 2, Hkv, positions, D]`` and returns ``q`` (compiled: one kernel, the store included)."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)  # [N, 1, D]: the same for every head
    cache[rows, :, :, positions] = torch.stack((_rotate(k, cos, sin), v), dim=-3)
    return _rotate(q, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _allow_recompiles(limit: int = 64) -> None:
    """Dynamo keeps one cache per function *code*, shared by every engine in the process, and recompiles for each
    dtype, optional norm (None or a tensor), grad mode and size-1 specialisation; its default limit of 8 is reached
    by the second or third model in one process and then ``fullgraph`` raises. Let it keep more."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def _random_partials(
    splits: int, n: int, cols: int, device: torch.device, dtype: torch.dtype, g: torch.Generator
) -> Partials:
    """A linear's output ``[n, cols]`` as the kernels hand it on: ``splits`` fp32 partial sums and a bias, or the
    finished output in ``dtype`` when ``splits == 1``."""
    from awqkit.kernels.common import Partials  # needs Triton, as the fused kernels that take these do

    parts = torch.randn(splits, n, cols, device=device, generator=g)
    if splits == 1:
        return Partials(parts.to(dtype), None)
    return Partials(parts, torch.randn(cols, device=device, generator=g).to(dtype))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= 0.02 * b.abs().max() + 1e-3)


class Ops:
    """The pointwise functions a model uses: compiled (fused kernels) or eager; ``fused_norm``: the norms as
    :mod:`awqkit.engine.fused`'s Triton kernels; ``fused_partials``: the rotary embedding + KV write and the SiLU as
    its kernels that also finish the qkv / gate_up linears (``partials`` is then on: the layers hand those kernels
    the linears' unreduced :class:`~awqkit.kernels.common.Partials`, and ``rope_and_cache`` / ``silu_mul`` take
    them, with :func:`awqkit.engine.fused.rope_and_cache`'s and :func:`~awqkit.engine.fused.silu_mul`'s
    signatures)."""

    def __init__(self, compile: bool, fused_norm: bool = False, fused_partials: bool = False) -> None:
        if compile:
            _allow_recompiles()

        def wrap(fn: Callable) -> Callable:
            if not compile:
                return fn
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)

            def call(*args):
                nonlocal compiled
                try:
                    return compiled(*args)
                except Exception as e:  # a broken compiler install must not stop generation: run eagerly
                    if compiled is fn:
                        raise
                    log.warning("torch.compile failed for %s (%s); running it eagerly", fn.__name__, e)
                    compiled = fn
                    return fn(*args)

            return call

        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        if fused_norm:
            self.rms_norm = lambda x, weight, eps: fused.add_rms_norm(x, None, weight, eps)[0]
            self.add_rms_norm = lambda x, residual, weight, eps: fused.add_rms_norm(x, residual, weight, eps)
        self.rope_and_cache = wrap(rope_and_cache)
        self.silu_mul = wrap(silu_mul)
        self.partials = fused_partials
        if fused_partials:
            self.rope_and_cache, self.silu_mul = fused.rope_and_cache, fused.silu_mul

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compile ``rope_and_cache`` (or run its fused kernel) now and compare it with the eager function, the cache
        write included (the one function that mutates an input), and the norms likewise; with ``partials``, the
        kernels get split-K partials with a bias (and the plain one-split case), SiLU included. Fall back to eager
        where they differ."""
        g = torch.Generator(device=device).manual_seed(0)
        self._check_norms(device, dtype, g)
        if self.rope_and_cache is rope_and_cache:
            return
        try:
            # torch.compile specialises size 1: check both kernels; the fused ones with and without splits
            ok = all(self._check_rope(n, splits, device, dtype, g) for n, splits in ((1, 3), (3, 1), (3, 3)))
            ok = ok and (not self.partials or self._check_silu(device, dtype, g))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here: use the eager functions
            log.warning("rope_and_cache / silu_mul failed on %s (%s); running them eagerly", device, e)
            ok = False
        if not ok:
            log.warning("rope_and_cache / silu_mul disagree with eager on %s; running them eagerly", device)
            if self.partials:
                self.partials, self.silu_mul = False, silu_mul
            self.rope_and_cache = rope_and_cache

    def _check_rope(self, n: int, splits: int, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> bool:
        H, Hkv, D = 4, 2, 32
        if self.partials:
            qkv = _random_partials(splits, n, (H + 2 * Hkv) * D, device, dtype, g)
            y = qkv.total(dtype)
        else:
            y = torch.randn(n, (H + 2 * Hkv) * D, device=device, dtype=dtype, generator=g)
        q, k, v = (t.view(n, -1, D) for t in y.split([H * D, Hkv * D, Hkv * D], dim=-1))
        angles = torch.rand(n, D, device=device, generator=g) * 6.3  # real rotary tables: cos/sin of angles
        norms = [torch.rand(D, device=device, dtype=dtype, generator=g) + 0.5 for _ in range(2)]
        args = (angles.cos(), angles.sin(), *norms, 1e-6)
        caches = [torch.zeros(6, 2, Hkv, 16, D, device=device, dtype=dtype) for _ in range(2)]
        rows, positions = torch.tensor([4, 1, 5][:n], device=device), torch.tensor([15, 0, 7][:n], device=device)
        heads = (qkv, H, Hkv) if self.partials else (q, k, v)
        got = self.rope_and_cache(*heads, *args, caches[0], rows, positions)
        want = rope_and_cache(q, k, v, *args, caches[1], rows, positions)
        # the compiled kernel keeps fp32 intermediates that eager rounds to ``dtype``: allow that rounding
        # (2 % of the largest value), not a wrong write or a wrong rotation (errors of order one)
        return _close(got, want) and _close(*caches)

    def _check_silu(self, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> bool:
        gate_up = _random_partials(3, 2, 2 * 72, device, dtype, g)  # 72 columns: a partial block
        return _close(self.silu_mul(gate_up, dtype), silu_mul(gate_up.total(dtype)))

    def _check_norms(self, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> None:
        x, residual = (torch.randn(3, 576, device=device, dtype=dtype, generator=g) for _ in range(2))
        weight = torch.rand(576, device=device, dtype=dtype, generator=g) + 0.5
        try:
            got, want = self.add_rms_norm(x, residual, weight, 1e-5), add_rms_norm(x, residual, weight, 1e-5)
            ok = all(_close(a, b) for a, b in zip(got, want))
            ok = ok and _close(self.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5))
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here: use the eager functions
            log.warning("the norm kernel failed on %s (%s)", device, e)
            ok = False
        if not ok:
            log.warning("fused norms disagree with eager on %s; running them eagerly", device)
            self.rms_norm, self.add_rms_norm = rms_norm, add_rms_norm


# --- modules ----------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """A float Linear holding a given ``[out, in]`` weight (no init, no copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def linear_partials(module: nn.Module, x: torch.Tensor) -> Partials:
    """``module(x)`` for a fused consumer kernel: an :class:`~awqkit.nn.AWQLinear` on the GPU kernels leaves its
    split-K sums unreduced; anything else (a float :class:`Linear`, a CPU layer) hands on its finished output as
    the one split."""
    from awqkit import kernels  # needs Triton, as the consumers do

    if isinstance(module, AWQLinear) and x.is_cuda and kernels.available():
        return kernels.awq_linear(x, module, partials=True)
    return kernels.Partials(module(x)[None], None)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, ops: Ops) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)``; with no residual, ``(norm(x), x)``."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps), x
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


@dataclass
class Step:
    """What every layer needs about one forward's tokens, computed once. Tokens are flattened: ``N = B * T``."""

    batch: int  # B rows
    length: int  # T new tokens per row
    slot_start: int  # the rows are cache slots slot_start .. slot_start + B ...
    slots: torch.Tensor | None  # ... or these slots [B] (a batched prefill of requests in scattered slots)
    num_slots: int  # slots per layer in the cache
    kv_len: int  # attend over cache positions [0, kv_len)
    cos: torch.Tensor  # [N, D]
    sin: torch.Tensor  # [N, D]
    cache_rows: torch.Tensor  # [layers, N]: row of the flattened cache [layers * slots, ...] each token is written to
    positions: torch.Tensor  # [N]
    lengths: torch.Tensor | None  # [B] keys each row sees, for the decode kernel (None: SDPA with masks)
    masks: dict  # attention window (None: full) → additive mask [B, 1, G * T, kv_len], for SDPA


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        qkv: nn.Module,
        o_proj: nn.Module,
        q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None,
        window: int | None,
        ops: Ops,
    ) -> None:
        super().__init__()
        self.layer, self.qkv, self.o_proj = layer, qkv, o_proj
        self.register_buffer("q_norm", q_norm)
        self.register_buffer("k_norm", k_norm)
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.window, self.ops = window, ops

    def forward(self, x: torch.Tensor, cache: torch.Tensor, step: Step) -> torch.Tensor:
        """``x [N, hidden]``; ``cache [layers * slots, 2, Hkv, L, D]``, every layer's rows."""
        N, B, T = x.shape[0], step.batch, step.length
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        if self.ops.partials:  # the rotary kernel finishes the qkv linear
            q = self.ops.rope_and_cache(
                linear_partials(self.qkv, x), H, Hkv, step.cos, step.sin, self.q_norm, self.k_norm, self.eps, cache,
                step.cache_rows[self.layer], step.positions,
            )  # fmt: skip
        else:
            q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = self.ops.rope_and_cache(
                q.view(N, H, D), k.view(N, Hkv, D), v.view(N, Hkv, D), step.cos, step.sin, self.q_norm, self.k_norm,
                self.eps, cache, step.cache_rows[self.layer], step.positions,
            )  # fmt: skip
        if step.slots is None:
            first = self.layer * step.num_slots + step.slot_start
            rows = cache[first : first + B, :, :, : step.kv_len]
        else:
            # a gathered copy (prefill only) of the attended positions alone, not of the whole context: graph-captured
            # prefills always pass slots, and a full-row copy would cost ~67 MB a row a layer for a 7B at 4k
            rows = cache[self.layer * step.num_slots + step.slots, :, :, : step.kv_len]
        keys, values = rows[:, 0], rows[:, 1]
        if step.lengths is not None:
            return self.o_proj(attention.decode_attention(q, keys, values, step.lengths, self.window).view(N, H * D))
        # Grouped-query attention without copying the cache: the G = H / Hkv query heads that share a kv head are
        # folded into the query length, so SDPA sees Hkv heads with G * T queries each and reads each key once.
        G = H // Hkv
        q = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.masks[self.window])
        out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(N, H * D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, gate_up: nn.Module, down: nn.Module, ops: Ops) -> None:
        super().__init__()
        self.gate_up, self.down, self.ops = gate_up, down, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops.partials:  # the SiLU kernel finishes the gate_up linear
            return self.down(self.ops.silu_mul(linear_partials(self.gate_up, x), x.dtype))
        return self.down(self.ops.silu_mul(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm) -> None:
        super().__init__()
        self.attn, self.mlp, self.input_norm, self.post_norm = attn, mlp, input_norm, post_norm

    def forward(self, x, residual, cache, step: Step):
        h, residual = self.input_norm(x, residual)
        x = self.attn(h, cache, step)
        h, residual = self.post_norm(x, residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    """Embedding, decoder blocks, final norm, lm_head, and the KV cache ``[layers * slots, 2, Hkv, max_len + 1, D]``.

    (Per slot and head, positions are rows of a contiguous matrix, the layout attention reads fastest; layers and slots
    share one dimension so that one compiled kernel writes any layer's rows.)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        embed: torch.Tensor,
        blocks: list[Block],
        norm: RMSNorm,
        lm_head: torch.Tensor,
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        super().__init__()
        self.cfg, self.max_model_len = cfg, max_model_len
        self.register_buffer("embed", embed)
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.register_buffer("lm_head", lm_head)  # may be the embedding itself (tied)
        device, dtype = embed.device, embed.dtype
        cos, sin = rope_tables(cfg, max_model_len + 1)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        shape = (cfg.num_layers * max_num_seqs, 2, cfg.num_kv_heads, max_model_len + 1, cfg.head_dim)
        self.register_buffer("kv_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_num_seqs = max_num_seqs
        self.decode_kernel = device.type == "cuda" and attention.available() and attention.self_test(device, dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: int | torch.Tensor,
        kv_len: int,
        logits: str = "last",
        last: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run ``tokens [B, T]`` at ``positions [B, T]`` for cache rows ``slots``.

        Args:
            slots: the first of ``B`` consecutive cache slots, or one slot per row (``[B]``). Rows shorter than
                ``T`` are padded at the end with position ``max_model_len``: the cache's spare row, which no real
                query attends to, takes their keys and values.
            kv_len: attend over cache positions ``[0, kv_len)``; must exceed every real position.
            logits: ``"last"`` → ``[B, vocab]`` for each row's last token (column ``last[b]`` if given),
                ``"all"`` → ``[B, T, vocab]``, ``"none"`` → None (a prefill chunk that is not the prompt's last).
        """
        B, T = tokens.shape
        step = self._step(positions, slots, kv_len)
        x = F.embedding(tokens.reshape(-1), self.embed)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, self.kv_cache, step)
        if logits == "none":
            return None
        if logits == "last":
            col = torch.full((B,), T - 1, device=x.device) if last is None else last
            row = torch.arange(B, device=x.device)
            x, residual = x.view(B, T, -1)[row, col], residual.view(B, T, -1)[row, col]
        x, _ = self.norm(x, residual)
        out = F.linear(x, self.lm_head)
        return out if logits == "last" else out.view(B, T, -1)

    def _step(self, positions: torch.Tensor, slots: int | torch.Tensor, kv_len: int) -> Step:
        B, T = positions.shape
        device = positions.device
        flat = positions.reshape(-1)
        slot_start, slot_list = (slots, None) if isinstance(slots, int) else (0, slots.to(device))
        row_slots = torch.arange(slot_start, slot_start + B, device=device) if slot_list is None else slot_list
        local_rows = row_slots[:, None].expand(B, T).reshape(-1)
        S = self.max_num_seqs
        layer_base = torch.arange(len(self.layers), device=device)[:, None] * S
        cache_rows = layer_base + local_rows[None]
        if T == 1 and self.decode_kernel:
            return Step(
                B, T, slot_start, slot_list, S, kv_len, self.cos[flat], self.sin[flat], cache_rows, flat, flat + 1, {}
            )
        G = self.cfg.num_heads // self.cfg.num_kv_heads
        key_pos = torch.arange(kv_len, device=device)
        causal = key_pos <= positions[..., None]  # [B, T, kv_len]
        masks = {}
        for window in {layer.attn.window for layer in self.layers}:
            m = causal if window is None else causal & (positions[..., None] - key_pos < window)
            # additive, in the activation dtype (SDPA would convert a bool mask in every layer), and the same for
            # the G query heads folded into each kv head (see Attention.forward)
            m = torch.zeros(m.shape, dtype=self.embed.dtype, device=device).masked_fill_(~m, float("-inf"))
            masks[window] = m[:, None, None].expand(B, 1, G, T, kv_len).reshape(B, 1, G * T, kv_len).contiguous()
        cos, sin = self.cos[flat], self.sin[flat]
        return Step(B, T, slot_start, slot_list, S, kv_len, cos, sin, cache_rows, flat, None, masks)


# --- building from checkpoint tensors ----------------------------------------------------------------------------


def _float_weight(tensors: dict[str, torch.Tensor], name: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A Linear's ``[out, in]`` float weight, dequantizing an AWQ layer if that is how it is stored."""
    if f"{name}.qweight" in tensors:
        parts = (tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales"))
        return gemm.dequantize(*parts, group_size, torch.float32).t().to(dtype)
    return tensors[f"{name}.weight"].to(dtype)


def build_linear(
    tensors: dict[str, torch.Tensor],
    names: list[str],
    quant: QuantConfig | None,
    dtype: torch.dtype,
    device: torch.device,
    dequantize: bool,
) -> nn.Module:
    """One module computing ``cat([layer(x) for layer in names], -1)``: a fused AWQLinear when every layer is AWQ
    (and ``dequantize`` is off), else a float Linear on the (dequantized) concatenated weights."""
    missing = [n for n in names if f"{n}.qweight" not in tensors and f"{n}.weight" not in tensors]
    if missing:
        raise CheckpointError(f"the checkpoint has no weights for {', '.join(missing)}")
    biases = [tensors.get(f"{n}.bias") for n in names]
    group_size = quant.group_size if quant is not None else 0
    if not dequantize and all(f"{n}.qweight" in tensors for n in names):
        layers = [
            AWQLinear.from_packed(
                tensors[f"{n}.qweight"],
                tensors[f"{n}.qzeros"],
                tensors[f"{n}.scales"].to(torch.float16),
                group_size,
                None if b is None else b.to(torch.float16),
            )
            for n, b in zip(names, biases)
        ]
        layer = layers[0] if len(layers) == 1 else fuse_awq_linears(layers)
        if layer.bias is not None:  # the kernels add the bias in the activation dtype
            layer.bias = layer.bias.to(dtype)
        return layer.to(device)
    weights = [_float_weight(tensors, n, group_size, dtype).to(device) for n in names]
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                (b if b is not None else torch.zeros(w_rows)).to(device=device, dtype=dtype)
                for b, w_rows in zip(biases, [_rows(tensors, n) for n in names])
            ]
        )
    return Linear(weight, bias)


def _rows(tensors: dict[str, torch.Tensor], name: str) -> int:
    if f"{name}.qweight" in tensors:
        return tensors[f"{name}.scales"].shape[1]
    return tensors[f"{name}.weight"].shape[0]


NORMS = ("input_layernorm", "post_attention_layernorm")


def build_model(
    cfg: ModelConfig,
    quant: QuantConfig | None,
    tensors: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    max_num_seqs: int,
    max_model_len: int,
    dequantize: bool = False,
    compile: bool = False,
) -> Transformer:
    """The decoder for ``cfg`` from HF-named tensors (``model.layers.{i}.self_attn.q_proj.qweight`` ...).

    Args:
        dequantize: turn AWQ layers into float matrices once (CPU: the reference AWQ path would unpack every call).
        compile: torch.compile the pointwise pieces (CUDA).
    """
    kernels = compile and fused.available()
    ops = Ops(compile, fused_norm=kernels, fused_partials=kernels and fused.rope_supported(cfg.head_dim))
    if compile:
        ops.check(device, dtype)

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"the checkpoint has no tensor {name}")
        return tensors[name].to(device=device, dtype=dtype)

    def linear(names: list[str]) -> nn.Module:
        return build_linear(tensors, names, quant, dtype, device, dequantize)

    blocks = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        attn = f"{p}.self_attn"
        has_qk_norm = f"{attn}.q_norm.weight" in tensors
        attention = Attention(
            cfg,
            i,
            linear([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]),
            linear([f"{attn}.o_proj"]),
            get(f"{attn}.q_norm.weight") if has_qk_norm else None,
            get(f"{attn}.k_norm.weight") if has_qk_norm else None,
            cfg.sliding_windows[i] if cfg.sliding_windows else None,
            ops,
        )
        mlp = MLP(linear([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]), linear([f"{p}.mlp.down_proj"]), ops)
        norms = [RMSNorm(get(f"{p}.{n}.weight"), cfg.rms_norm_eps, ops) for n in NORMS]
        blocks.append(Block(attention, mlp, *norms))
    embed = get("model.embed_tokens.weight")
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    lm_head = embed if tied else get("lm_head.weight")
    norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps, ops)
    model = Transformer(cfg, embed, blocks, norm, lm_head, max_num_seqs, max_model_len)
    for m in model.modules():
        if isinstance(m, AWQLinear):
            m.prepare_for_kernels()
    return model.eval()
