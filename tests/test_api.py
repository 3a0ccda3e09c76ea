"""The user API: the guide's section-3 code verbatim (only the import changed), and from_quantized."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from awqkit import AutoAWQForCausalLM
from awqkit.nn import AWQLinear
from tests.conftest import tiny_model

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "qwen-awq-guide.md"


def guide_section3_code() -> str:
    """The Python blocks of the guide's section 3, in order, with `from awq import` → `from awqkit import`."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## 3.") :]
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", section, flags=re.S)
    # the (1)! footnote block is an example *value* of msg, not code to run
    code = [b for b in blocks if not b.lstrip().startswith("[")]
    import textwrap

    return "\n".join(textwrap.dedent(b) for b in code).replace("from awq import", "from awqkit import")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, smollm_source):
    """A tiny Qwen2-family model (hidden 128, divisible by the guide's group size 128) with a real chat tokenizer."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("guide")
    tok = AutoTokenizer.from_pretrained(smollm_source.directory, gguf_file=smollm_source.gguf_file)
    model = tiny_model("qwen2", vocab_size=len(tok), num_key_value_heads=4)
    model.save_pretrained(root / "your_model_path")
    tok.save_pretrained(root / "your_model_path")
    return root


def test_guide_section3_runs_verbatim(chat_model_dir, monkeypatch):
    code = guide_section3_code()
    assert "from awqkit import AutoAWQForCausalLM" in code and "model.quantize(" in code
    monkeypatch.chdir(chat_model_dir)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Tell me who you are, and what you can do for me today in a few sentences."},
        {
            "role": "assistant",
            "content": "I am a large language model named Qwen. I can answer questions, write "
            "text, summarise documents, translate between languages and help with "
            "code. Ask me anything and I will do my best to help you.",
        },
    ]
    # the guide's loop reads `c['messages']` for each element of `messages`: provide both, as its footnote describes
    namespace = {"messages": list(range(12)), "c": {"messages": conversation}}
    exec(compile(code, str(GUIDE), "exec"), namespace)
    out = chat_model_dir / "your_quantized_model_path"
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    loaded = AutoAWQForCausalLM.from_quantized(str(out))
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, AWQLinear)
    assert loaded.quant_config.group_size == 128
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert loaded.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_from_quantized_matches_the_quantized_model(tmp_path):
    model = tiny_model("llama")
    awq = AutoAWQForCausalLM(model)
    data = [torch.randint(3, 320, (64,)).tolist() for _ in range(4)]
    awq.quantize(None, {"q_group_size": 64}, calib_data=data, max_calib_seq_len=64, progress=False)
    path = awq.save_quantized(tmp_path / "q")
    loaded = AutoAWQForCausalLM.from_quantized(path, device_map="cpu")
    with torch.no_grad():  # the checkpoint stores float tensors (norms, embeddings) in fp16, as AutoAWQ does
        for p in model.parameters():
            p.copy_(p.half().float())
    x = torch.tensor([data[0][:32]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_save_before_quantize_is_refused(tmp_path):
    with pytest.raises(Exception, match="call quantize"):
        AutoAWQForCausalLM(tiny_model("llama")).save_quantized(tmp_path / "x")


def test_export_compatible_then_pack(tmp_path):
    model = tiny_model("llama")
    awq = AutoAWQForCausalLM(model)
    data = [torch.randint(3, 320, (64,)).tolist() for _ in range(4)]
    awq.quantize(
        None, {"q_group_size": 64}, calib_data=data, max_calib_seq_len=64, export_compatible=True, progress=False
    )
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    scaled = awq.save_quantized(tmp_path / "scaled")
    assert "quantization_config" not in (scaled / "config.json").read_text()
    awq.pack()
    assert isinstance(model.model.layers[0].mlp.up_proj, AWQLinear)
