"""``transformers.AutoModelForCausalLM.from_pretrained`` on AWQ checkpoints through awqkit (guide section 1)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import awqkit.integrations.transformers as awqkit_tf
from awqkit import QuantConfig, quantize_rtn
from awqkit.formats.load import load_quantized_model
from awqkit.formats.save import save_checkpoint
from awqkit.nn import AWQLinear
from tests.conftest import tiny_model
from tests.model_dirs import make_model_dir, tiny_tokenizer

IDS = torch.arange(3, 60).view(1, -1)


@pytest.fixture
def enabled():
    """awqkit handles 'awq' in Transformers for the test (even where gptqmodel is installed), then not."""
    assert awqkit_tf.enable(prefer_awqkit=True)
    yield
    awqkit_tf.disable()


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory) -> Path:
    """Qwen2 (q/k/v biases) with tied embeddings, round-to-nearest g64, saved by awqkit."""
    model = tiny_model("qwen2", tie_word_embeddings=True)
    quant = quantize_rtn(model, QuantConfig(group_size=64))
    return save_checkpoint(model, tmp_path_factory.mktemp("qwen2") / "tiny-qwen2-rtn", quant)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer and chat template, quantized RTN g128 and saved with the tokenizer."""
    from transformers import AutoModelForCausalLM

    src = make_model_dir(tmp_path_factory.mktemp("src") / "tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quant = quantize_rtn(model, QuantConfig(group_size=128))
    out = save_checkpoint(model, tmp_path_factory.mktemp("awq") / "tiny-llama-awq", quant)
    tiny_tokenizer().save_pretrained(out)
    return out


def _hf_logits(path: Path, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        return model, model(input_ids=IDS).logits


def _awqkit_logits(path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return load_quantized_model(path, dtype=dtype)(input_ids=IDS).logits


@pytest.mark.parametrize("checkpoint", ["tiny_rtn_checkpoint", "qwen2_checkpoint"])
def test_logits_equal_awqkit_loader(enabled, checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    model, logits = _hf_logits(path, dtype=torch.float32, device_map="cpu")
    awq_layers = [m for m in model.modules() if isinstance(m, AWQLinear)]
    assert len(awq_layers) == 2 * 7  # every decoder Linear, lm_head stays float
    assert all(m.scales.dtype == torch.float16 for m in awq_layers)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert torch.equal(logits, _awqkit_logits(path))


def test_checkpoint_dtype_by_default(enabled, tiny_rtn_checkpoint):
    model, logits = _hf_logits(tiny_rtn_checkpoint)  # no dtype: the checkpoint's float16, as Transformers does
    assert model.dtype == torch.float16
    torch.testing.assert_close(logits.float(), _awqkit_logits(tiny_rtn_checkpoint), atol=2e-2, rtol=2e-2)


def test_other_methods_and_float_models_untouched(enabled, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_gptq import GptqHfQuantizer

    assert AUTO_QUANTIZER_MAPPING["awq"] is awqkit_tf.AwqkitHfQuantizer
    assert AUTO_QUANTIZER_MAPPING["gptq"] is GptqHfQuantizer
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, AWQLinear) for m in model.modules())


def test_disable_restores_transformers_quantizer():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_awq import AwqQuantizer

    awqkit_tf.enable(prefer_awqkit=True)
    assert awqkit_tf.enabled()
    awqkit_tf.disable()
    assert AUTO_QUANTIZER_MAPPING["awq"] is AwqQuantizer and not awqkit_tf.enabled()


def test_enable_from_env(monkeypatch):
    try:
        monkeypatch.setenv("AWQKIT_TRANSFORMERS", "prefer")
        assert awqkit_tf.enable_from_env() and awqkit_tf.enabled()
        awqkit_tf.disable()
        monkeypatch.setenv("AWQKIT_TRANSFORMERS", "0")
        assert not awqkit_tf.enable_from_env() and not awqkit_tf.enabled()
    finally:
        awqkit_tf.disable()


GUIDE_SECTION_1 = """
from transformers import AutoModelForCausalLM, AutoTokenizer


device = "cpu"
model = AutoModelForCausalLM.from_pretrained(
    "{path}",
    device_map="auto"
)
tokenizer = AutoTokenizer.from_pretrained("{path}")

prompt = "Give me a short introduction to large language model."
messages = [
    {{"role": "system", "content": "You are a helpful assistant."}},
    {{"role": "user", "content": prompt}}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize=False,
    add_generation_prompt=True
)
model_inputs = tokenizer([text], return_tensors="pt").to(device)

generated_ids = model.generate(
    model_inputs.input_ids,
    max_new_tokens=512
)
generated_ids = [
    output_ids[len(input_ids):]
    for input_ids, output_ids in zip(model_inputs.input_ids, generated_ids)
]

response = tokenizer.batch_decode(
    generated_ids, skip_special_tokens=True
    )[0]
"""


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )


def test_guide_section_1_verbatim(chat_checkpoint):
    """The guide's code, with only the hub id replaced by a local checkpoint and "cuda" by "cpu"."""
    check = textwrap.dedent("""
        from awqkit.nn import AWQLinear
        assert isinstance(model.model.layers[0].self_attn.q_proj, AWQLinear)
        assert isinstance(response, str) and generated_ids[0].numel() > 0
        print("ok", generated_ids[0].numel())
    """)
    prelude = "import awqkit.integrations.transformers as t; assert t.enable(prefer_awqkit=True)\n"
    result = _run(prelude + GUIDE_SECTION_1.format(path=chat_checkpoint) + check)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


@pytest.mark.skipif(
    "enable_from_env" not in Path(awqkit_tf.__file__).parent.parent.joinpath("__init__.py").read_text(),
    reason="awqkit/__init__.py does not call awqkit.integrations.transformers.enable_from_env() yet",
)
def test_env_var_at_import_awqkit(tiny_rtn_checkpoint):
    code = textwrap.dedent(f'''
        import awqkit
        from transformers import AutoModelForCausalLM
        from awqkit.nn import AWQLinear
        model = AutoModelForCausalLM.from_pretrained("{tiny_rtn_checkpoint}")
        assert isinstance(model.model.layers[0].mlp.down_proj, AWQLinear)
    ''')
    result = _run(code, {"AWQKIT_TRANSFORMERS": "prefer"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="gptqmodel is not installed")
def test_transformers_with_gptqmodel_matches_awqkit(tiny_rtn_checkpoint):
    """Transformers' own AWQ path (gptqmodel's kernels) on a checkpoint awqkit wrote: same logits up to rounding."""
    awqkit_tf.disable()
    _, logits = _hf_logits(tiny_rtn_checkpoint, dtype=torch.float32, device_map="cpu")
    torch.testing.assert_close(logits, _awqkit_logits(tiny_rtn_checkpoint), atol=2e-3, rtol=1e-3)
