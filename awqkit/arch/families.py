"""The supported families, one declaration each. Adding a family = a declaration here + a test."""

from __future__ import annotations

from awqkit.arch.spec import ArchSpec, ScaleGroup

# Pre-norm decoder with a gated MLP: Llama and every family that copied its module names.
#   input_layernorm → q/k/v          (inspect the whole attention block)
#   v_proj → o_proj                  (with GQA, scales tied across the query heads of a kv head: awq.fold.channel_map)
#   post_attention_layernorm → gate/up (inspect the whole MLP)
#   up_proj → down_proj              (up's output rows are down's input channels, through the elementwise gate)
LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",)),
)

FAMILIES = (
    ArchSpec("Llama", ("llama",), LLAMA_GROUPS),
    ArchSpec("Mistral", ("mistral",), LLAMA_GROUPS),
    # q/k/v carry a bias; scaling input channels leaves a bias untouched, so the declaration is Llama's
    ArchSpec("Qwen2", ("qwen2",), LLAMA_GROUPS),
    # q_norm/k_norm act on q/k's outputs, after the scaled input channels: the fold is still exact
    ArchSpec("Qwen3", ("qwen3",), LLAMA_GROUPS),
)
