"""``ModelConfig``: the few numbers the decoder needs, read from a Transformers config (4.x or 5.x spelling).

Llama, Mistral, Qwen2 and Qwen3 are one architecture for inference purposes: pre-norm decoder layers with RMSNorm,
grouped-query attention with rotary embeddings, and a SwiGLU MLP. Where they differ (Qwen2's q/k/v bias, Qwen3's
per-head q/k RMSNorm, Llama's optional attention/MLP bias) the checkpoint's tensors tell, so the loader reads the
structure off the tensor names rather than off the family name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from awqkit.errors import ConfigError, UnsupportedArchitectureError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the decoder (gpt-fast's ``ModelArgs``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta and that type's parameters
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attention window, or None for full attention

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """Read a ``transformers.PretrainedConfig`` of one of :data:`FAMILIES`."""
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"the engine runs {', '.join(FAMILIES)} models, not model_type {model_type!r}; "
                "use awqkit.formats.load.load_quantized_model for a Transformers model instead"
            )
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = config.num_hidden_layers
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope=rope_parameters(config),
            sliding_windows=sliding_windows(config, model_type, layers),
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """``config.rope_parameters`` (Transformers 5.x), else ``rope_theta`` + ``rope_scaling`` (4.x), normalised."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise ConfigError(
            f"rope type {params['rope_type']!r} is not supported by the engine (it knows {', '.join(ROPE_TYPES)})"
        )
    return params


def sliding_windows(config: Any, model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per-layer attention window: Mistral's ``sliding_window`` on every layer, Qwen's on "sliding_attention" ones."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return (None,) * layers
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window if model_type == "mistral" else None,) * layers


# --- rotary embeddings -----------------------------------------------------------------------------------------
# Each function returns (inv_freq [head_dim/2], attention_factor), computed as Transformers computes them, so that
# the tables are bit-identical to its own in float32.


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _rope_default(p: dict, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(p["rope_theta"], cfg.head_dim), 1.0


def _rope_linear(p: dict, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(p["rope_theta"], cfg.head_dim) / p["factor"], 1.0


def _rope_dynamic(p: dict, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    # Transformers rescales the base from the *current* sequence length once it passes max_position_embeddings.
    # A static cache wants one table, so we use the longest length this engine serves: exact while
    # max_model_len <= max_position_embeddings (then it is the default rope), an approximation beyond.
    dim, mpe = cfg.head_dim, cfg.max_position_embeddings
    seq_len = max(max_len, mpe)
    base = p["rope_theta"] * ((p["factor"] * seq_len / mpe) - (p["factor"] - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


def _rope_llama3(p: dict, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    inv_freq = _base_inv_freq(p["rope_theta"], cfg.head_dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are interpolated (divided by factor), short ones kept, the band between blended smoothly
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _rope_yarn(p: dict, cfg: ModelConfig, max_len: int) -> tuple[torch.Tensor, float]:
    base, dim = p["rope_theta"], cfg.head_dim
    factor = p.get("factor") or cfg.max_position_embeddings / p["original_max_position_embeddings"]
    old_len = p.get("original_max_position_embeddings") or cfg.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # dimensions rotating fast (many turns within the original context) extrapolate, slow ones interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


ROPE_TYPES = {
    "default": _rope_default,
    "linear": _rope_linear,
    "dynamic": _rope_dynamic,
    "llama3": _rope_llama3,
    "yarn": _rope_yarn,
}


def rope_tables(cfg: ModelConfig, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[num_positions, head_dim]`` in float32 (the attention factor folded in)."""
    inv_freq, attention_factor = ROPE_TYPES[cfg.rope["rope_type"]](cfg.rope, cfg, num_positions)
    angles = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor
