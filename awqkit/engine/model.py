"""The decoder (Llama / Mistral / Qwen2 / Qwen3) as a few plain modules, in the shape of gpt-fast's ``model.py``.

One forward serves both phases. It takes a block of rows (KV-cache slots ``slot_start .. slot_start + B``), ``T``
new tokens per row with their positions, writes their keys and values into the cache at those positions and attends
over the first ``kv_len`` cache positions of each row, masked by position: a key is visible to a query iff
``key_pos <= query_pos`` (and within the sliding window, where the model has one). Prefill is ``B = 1, T = chunk``;
decode is ``B = bucket, T = 1``, where rows of different lengths are just different positions. Shapes depend only on
``(B, T, kv_len)``, so a decode step can be captured once per bucket and replayed.

Rows that have nothing to decode in a step are fed position ``max_model_len``: the cache has one spare position
there (a scratch column written by such rows and by nobody's real tokens), and their output is ignored.

The weights are whatever the checkpoint holds: :class:`~awqkit.nn.AWQLinear` (4-bit, q/k/v and gate/up fused so that
each input is read once and each decode step launches two matmuls fewer per layer) or plain float matrices.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from awqkit.engine.config import ModelConfig, rope_tables
from awqkit.errors import CheckpointError
from awqkit.formats import gemm
from awqkit.formats.config import QuantConfig
from awqkit.nn import AWQLinear, fuse_awq_linears

# --- the pointwise pieces of a layer -----------------------------------------------------------------------------
# Written once as plain PyTorch. On CUDA each is torch.compile'd into (about) one kernel, which matters at decode:
# a step is ~10 kernels a layer, and unfused these would be ~30. On CPU they run eagerly (tests, embedded default).


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


def rope_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q/k norm (Qwen3), rotary embedding; returns ``q`` and the ``[.., 2, kv_heads, D]`` block to cache."""
    if q_norm is not None:
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    return _rotate(q, cos, sin), torch.stack((_rotate(k, cos, sin), v), dim=-3)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Ops:
    """The pointwise functions a model uses: compiled (fused kernels) or eager."""

    def __init__(self, compile: bool) -> None:
        def wrap(fn: Callable) -> Callable:
            return torch.compile(fn, dynamic=True, fullgraph=True) if compile else fn

        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.rope_qkv = wrap(rope_qkv)
        self.silu_mul = wrap(silu_mul)


# --- modules ----------------------------------------------------------------------------------------------------


class Linear(nn.Module):
    """A float Linear holding a given ``[out, in]`` weight (no init, no copy)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        qkv: nn.Module,
        o_proj: nn.Module,
        q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None,
        ops: Ops,
    ) -> None:
        super().__init__()
        self.qkv, self.o_proj = qkv, o_proj
        self.register_buffer("q_norm", q_norm)
        self.register_buffer("k_norm", k_norm)
        self.n_heads, self.n_kv, self.head_dim, self.eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        self.ops = ops

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        write_at: tuple[torch.Tensor, torch.Tensor],
        kv_len: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, kv = self.ops.rope_qkv(
            q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), cos, sin, self.q_norm, self.k_norm, self.eps
        )
        kv_cache.index_put_(write_at, kv)  # kv_cache: [B, L, 2, Hkv, D]
        keys, values = kv_cache[:, :kv_len, 0].transpose(1, 2), kv_cache[:, :kv_len, 1].transpose(1, 2)
        # Grouped-query attention without copying the cache: the G = H / Hkv query heads that share a kv head are
        # folded into the query length, so SDPA sees Hkv heads with G * T queries each and reads each key once.
        G = H // Hkv
        q = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, gate_up: nn.Module, down: nn.Module, ops: Ops) -> None:
        super().__init__()
        self.gate_up, self.down, self.ops = gate_up, down, ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.ops.silu_mul(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm, window: int | None):
        super().__init__()
        self.attn, self.mlp, self.input_norm, self.post_norm, self.window = attn, mlp, input_norm, post_norm, window

    def forward(self, x, residual, cos, sin, kv_cache, write_at, kv_len, mask):
        h, residual = self.input_norm(x, residual)
        x = self.attn(h, cos, sin, kv_cache, write_at, kv_len, mask)
        h, residual = self.post_norm(x, residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    """Embedding, decoder blocks, final norm, lm_head, and the KV cache ``[layers, slots, max_len + 1, 2, Hkv, D]``."""

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
        shape = (cfg.num_layers, max_num_seqs, max_model_len + 1, 2, cfg.num_kv_heads, cfg.head_dim)
        self.register_buffer("kv_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slot_start: int,
        kv_len: int,
        logits: str = "last",
    ) -> torch.Tensor | None:
        """Run ``tokens [B, T]`` at ``positions [B, T]`` for cache rows ``slot_start .. slot_start + B``.

        Args:
            kv_len: attend over cache positions ``[0, kv_len)``; must exceed every real position.
            logits: ``"last"`` → ``[B, vocab]`` for each row's last token, ``"all"`` → ``[B, T, vocab]``,
                ``"none"`` → None (a prefill chunk that is not the prompt's last).
        """
        B, T = tokens.shape
        G = self.cfg.num_heads // self.cfg.num_kv_heads
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        rows = torch.arange(B, device=tokens.device)[:, None].expand(B, T)
        write_at = (rows, positions)
        key_pos = torch.arange(kv_len, device=tokens.device)
        causal = key_pos <= positions[..., None]  # [B, T, kv_len]
        masks = {}
        for window in {layer.window for layer in self.layers}:
            m = causal if window is None else causal & (positions[..., None] - key_pos < window)
            # additive, in the activation dtype (SDPA would convert a bool mask in every layer), and the same for
            # the G query heads folded into each kv head (see Attention.forward)
            m = torch.zeros(m.shape, dtype=x.dtype, device=x.device).masked_fill_(~m, float("-inf"))
            masks[window] = m[:, None, None].expand(B, 1, G, T, kv_len).reshape(B, 1, G * T, kv_len)
        residual = None
        for i, layer in enumerate(self.layers):
            kv_cache = self.kv_cache[i, slot_start : slot_start + B]
            x, residual = layer(x, residual, cos, sin, kv_cache, write_at, kv_len, masks[layer.window])
        if logits == "none":
            return None
        if logits == "last":
            x, residual = x[:, -1], residual[:, -1]
        x, _ = self.norm(x, residual)
        return F.linear(x, self.lm_head)


# --- building from checkpoint tensors ----------------------------------------------------------------------------


_NIBBLE_SHIFTS = torch.tensor([4 * i for i in gemm.AWQ_REVERSE_ORDER], dtype=torch.int32)  # column c → its bits


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` float32 ``(q - z) * s``, equal to :func:`awqkit.formats.gemm.dequantize` (transposed) but
    shifting each column's nibble out directly and broadcasting the groups, which is ~10x faster on CPU."""

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        return ((packed[..., None] >> _NIBBLE_SHIFTS.to(packed.device)) & 0xF).reshape(packed.shape[0], -1)

    k, n = qweight.shape[0], scales.shape[1]
    q = unpack(qweight).view(k // group_size, group_size, n)
    w = (q - unpack(qzeros)[:, None]).float() * scales.float()[:, None]
    return w.view(k, n).t()


def _float_weight(tensors: dict[str, torch.Tensor], name: str, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A Linear's ``[out, in]`` float weight, dequantizing an AWQ layer if that is how it is stored."""
    if f"{name}.qweight" in tensors:
        parts = (tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales"))
        return dequantize_awq(*parts, group_size).to(dtype)
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
                tensors[f"{n}.qweight"], tensors[f"{n}.qzeros"], tensors[f"{n}.scales"].to(torch.float16), group_size,
                None if b is None else b.to(torch.float16),
            )
            for n, b in zip(names, biases)
        ]
        layer = layers[0] if len(layers) == 1 else fuse_awq_linears(layers)
        if layer.bias is not None:  # the kernels add the bias in the activation dtype
            layer.bias = layer.bias.to(dtype)
        return layer.to(device)
    weight = torch.cat([_float_weight(tensors, n, group_size, dtype).to(device) for n in names])
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            (b if b is not None else torch.zeros(w_rows)).to(device=device, dtype=dtype)
            for b, w_rows in zip(biases, [_rows(tensors, n) for n in names])
        ])
    return Linear(weight, bias)


def _rows(tensors: dict[str, torch.Tensor], name: str) -> int:
    if f"{name}.qweight" in tensors:
        return tensors[f"{name}.scales"].shape[1]
    return tensors[f"{name}.weight"].shape[0]


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
    ops = Ops(compile)

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
            linear([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]),
            linear([f"{attn}.o_proj"]),
            get(f"{attn}.q_norm.weight") if has_qk_norm else None,
            get(f"{attn}.k_norm.weight") if has_qk_norm else None,
            ops,
        )
        mlp = MLP(linear([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]), linear([f"{p}.mlp.down_proj"]), ops)
        norms = [RMSNorm(get(f"{p}.{n}.weight"), cfg.rms_norm_eps, ops) for n in ("input_layernorm", "post_attention_layernorm")]
        blocks.append(Block(attention, mlp, *norms, cfg.sliding_windows[i] if cfg.sliding_windows else None))
    embed = get("model.embed_tokens.weight")
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    lm_head = embed if tied else get("lm_head.weight")
    norm = RMSNorm(get("model.norm.weight"), cfg.rms_norm_eps, ops)
    model = Transformer(cfg, embed, blocks, norm, lm_head, max_num_seqs, max_model_len)
    for m in model.modules():
        if isinstance(m, AWQLinear):
            m.prepare_for_kernels()
    return model.eval()
