"""awq/ and arch/: folds are exact, the search beats round-to-nearest, the families, and every bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from awqkit import AutoAWQForCausalLM, QuantConfig
from awqkit.arch import get_spec, supported_model_types
from awqkit.awq.fold import can_fold, channel_map, fold_scales
from awqkit.awq.quantizer import fake_quantize, quantize_weight
from awqkit.awq.search import block_gram, search_clip
from awqkit.errors import (
    CalibrationError,
    ConfigError,
    GroupSizeError,
    NumericalError,
    UnsupportedArchitectureError,
)
from awqkit.nn import AWQLinear
from tests.conftest import random_token_blocks, tiny_config, tiny_model

G64 = {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}


def quantize_tiny(model, quant=G64, n=4, length=64, **kw):
    awq = AutoAWQForCausalLM(model)
    awq.quantize(None, quant, calib_data=random_token_blocks(n, length), max_calib_seq_len=length, progress=False, **kw)
    return awq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.offset = offset

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (self.weight + self.offset)


GemmaRMSNorm = type("GemmaRMSNorm", (RMSNorm,), {})


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_into_norm_is_exact(offset):
    torch.manual_seed(0)
    norm, fcs = RMSNorm(64, offset), [nn.Linear(64, 32), nn.Linear(64, 16)]
    x = torch.randn(8, 64)
    before = [fc(norm(x)) for fc in fcs]
    fold_scales(norm, fcs, torch.rand(64) * 4 + 0.1, norm_offset=offset)
    for b, fc in zip(before, fcs):
        torch.testing.assert_close(fc(norm(x)), b, rtol=1e-5, atol=1e-5)


def test_gemma_norm_without_offset_is_refused():
    with pytest.raises(NumericalError, match="1 \\+ w"):
        fold_scales(GemmaRMSNorm(64, 1.0), [nn.Linear(64, 8)], torch.rand(64) + 0.5)


def test_fold_into_previous_linear_is_exact_and_gqa_is_detected():
    torch.manual_seed(0)
    v, o = nn.Linear(64, 64), nn.Linear(64, 32)
    x = torch.randn(8, 64)
    before = o(v(x))
    assert can_fold(v, [o])
    fold_scales(v, [o], torch.rand(64) * 4 + 0.1)
    torch.testing.assert_close(o(v(x)), before, rtol=1e-5, atol=1e-5)
    assert not can_fold(nn.Linear(64, 48), [nn.Linear(64, 64)])  # no channel correspondence at all


def test_quantizer_scales_are_exact_fp16_and_levels_in_range():
    w = torch.randn(32, 128)
    qw = quantize_weight(w, 64, True)
    assert torch.equal(qw.scales, qw.scales.half().float())
    assert int(qw.q.max()) <= 15 and int(qw.zeros.max()) <= 15
    err = (fake_quantize(w, 64) - w).norm() / w.norm()
    assert 0 < err < 0.15


def test_clip_never_hurts_output_error():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w[:, 5] *= 8  # outliers
    x = torch.randn(256, 128)
    low, high, shrink = search_clip(w, block_gram(x, 64), 64, True)
    clipped = torch.maximum(torch.minimum(w.view(48, 2, 64), high[..., None]), low[..., None]).view(48, 128)
    err = lambda q: (x @ (q - w).T).pow(2).mean()  # noqa: E731
    assert err(fake_quantize(clipped, 64)) <= err(fake_quantize(w, 64)) + 1e-7
    assert 0 <= shrink <= 0.5


def test_clip_refines_each_end_of_a_lopsided_group():
    """One large weight on a channel that carries almost no signal: that end is clipped far more than the other."""
    torch.manual_seed(0)
    w = torch.rand(8, 64) * 2 - 1
    w[:, 7] = 6.0
    x = torch.randn(2048, 64)
    x[:, 7] *= 0.01
    low, high, _ = search_clip(w, block_gram(x, 64), 64, True)
    r_hi, r_lo = high.squeeze(1) / w.amax(1), low.squeeze(1) / w.amin(1)
    assert (r_hi < 0.7).all() and (r_lo > r_hi + 0.1).all()

    def err(lo, hi):
        q = fake_quantize(torch.maximum(torch.minimum(w, hi.view(-1, 1)), lo.view(-1, 1)), 64)
        return (x @ (q - w).T).pow(2).mean()

    best_common = min(err(w.amin(1) * r, w.amax(1) * r) for r in [1 - i / 20 for i in range(10)])
    assert err(low.squeeze(1), high.squeeze(1)) < best_common


@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("qwen2", 4), ("qwen3", 2), ("mistral", 2)])
def test_quantize_families_folds_checked_and_awq_beats_rtn(family, kv_heads):
    model = tiny_model(family, num_key_value_heads=kv_heads)  # 2 of 4: grouped-query attention
    reference = copy.deepcopy(model)
    # give some input channels large activations, as real LLMs have, by scaling embedding columns
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :4] *= 20
        reference.model.embed_tokens.weight[:, :4] *= 20
    awq = quantize_tiny(model)
    layers = awq.report["layers"]
    assert len(layers) == 2
    for layer in layers:
        for group in layer["groups"]:
            assert "skipped" not in group
            assert group["fold_error"] < 1e-4
            assert group["awq_mse"] <= group["rtn_mse"]
        assert layer["layer_mse"]["awq"] <= layer["layer_mse"]["rtn"] * 1.0001
    assert isinstance(model.model.layers[0].self_attn.q_proj, AWQLinear)
    assert not isinstance(model.lm_head, AWQLinear)
    x = torch.tensor(random_token_blocks(1, 48, seed=5))
    with torch.no_grad():
        rel = (model(x).logits - reference(x).logits).norm() / reference(x).logits.norm()
    assert rel < 0.2


def test_gqa_folds_v_to_o_with_scales_shared_by_query_heads():
    """With 2 kv heads for 4 query heads, o's input channels (h, d) and (h+1, d) come from one v channel."""
    awq = quantize_tiny(tiny_model("llama", num_key_value_heads=2))
    vo = awq.report["layers"][0]["groups"][1]
    assert vo["prev"] == "self_attn.v_proj" and "skipped" not in vo
    assert vo["fold_error"] < 1e-4 and vo["awq_mse"] <= vo["rtn_mse"]


def test_channel_map_for_grouped_query_attention():
    v, o = nn.Linear(64, 32), nn.Linear(64, 64)  # head_dim 16: 2 kv heads, 4 query heads
    mapping = channel_map(v, [o], head_dim=16)
    assert mapping.tolist() == [*range(16), *range(16), *range(16, 32), *range(16, 32)]
    assert channel_map(v, [o]) is None  # head size unknown: cannot tell which channels share a v output
    x = torch.randn(5, 64)
    t = torch.rand(32) + 0.5  # one scale per v output
    before = o(v(x)[:, mapping])  # attention with uniform weights just routes v's channels to query heads
    fold_scales(v, [o], t[mapping], mapping=mapping)
    torch.testing.assert_close(o(v(x)[:, mapping]), before, rtol=1e-5, atol=1e-5)


def test_search_improves_on_rtn_over_held_out_tokens():
    model = tiny_model("llama", num_key_value_heads=4, seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :6] *= 30
    rtn_model = copy.deepcopy(model)
    from awqkit import quantize_rtn

    quantize_rtn(rtn_model, QuantConfig(group_size=64))
    reference = copy.deepcopy(model)
    quantize_tiny(model, n=8, length=64)
    x = torch.tensor(random_token_blocks(4, 64, seed=99))
    with torch.no_grad():
        ref = reference(x).logits
        awq_err = (model(x).logits - ref).pow(2).mean()
        rtn_err = (rtn_model(x).logits - ref).pow(2).mean()
    assert awq_err < rtn_err


def test_feeding_float_outputs_is_available():
    awq = quantize_tiny(tiny_model("llama"), propagate_quantized=False)
    assert awq.is_quantized


def test_modules_to_not_convert_and_auto_group_size():
    model = tiny_model("llama", hidden_size=96, head_dim=24, intermediate_size=192)
    quant = dict(G64, q_group_size="auto", modules_to_not_convert=["mlp.down_proj"])
    awq = quantize_tiny(model, quant)
    assert awq.quant_config.group_size == 32  # 96 is divisible by 32, not by 64
    assert isinstance(model.model.layers[0].mlp.up_proj, AWQLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)


def test_group_size_that_does_not_divide_names_layer_and_fix():
    model = tiny_model("llama", hidden_size=96, head_dim=24, intermediate_size=192)
    with pytest.raises(GroupSizeError) as e:
        quantize_tiny(model, dict(G64, q_group_size=128))
    msg = str(e.value)
    assert "does not divide in_features 96 of model.layers.0.self_attn.q_proj" in msg
    assert "32 divides every layer" in msg


def test_w_bit_other_than_4():
    with pytest.raises(ConfigError, match="only 4-bit packing"):
        quantize_tiny(tiny_model("llama"), dict(G64, w_bit=3))


@pytest.mark.parametrize(
    "data, match",
    [([], "empty list"), ([[1, 2, 3]], "fewer than one block"), (42, "not supported")],
)
def test_bad_calibration_data(data, match):
    awq = AutoAWQForCausalLM(tiny_model("llama"))
    with pytest.raises(CalibrationError, match=match):
        awq.quantize(None, G64, calib_data=data, max_calib_seq_len=64, progress=False)


def test_text_data_without_tokenizer():
    awq = AutoAWQForCausalLM(tiny_model("llama"))
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        awq.quantize(None, G64, calib_data=["some text"], progress=False)


def test_default_pileval_offline_says_how_to_pass_local_data(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    awq = AutoAWQForCausalLM(tiny_model("llama"))
    with pytest.raises(CalibrationError, match="pass your own data"):
        awq.quantize(None, G64, progress=False)


def test_nan_weights_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(NumericalError, match="mlp.up_proj.weight of decoder layer 1"):
        quantize_tiny(model)


def test_inf_activations_are_reported():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = math.inf
    with pytest.raises(NumericalError, match="NaN or Inf"):
        quantize_tiny(model)


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError) as e:
        get_spec(GPT2Config())
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in str(e.value)
    assert set(supported_model_types()) == {"llama", "mistral", "qwen2", "qwen3"}


def test_unsupported_architecture_from_pretrained(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        AutoAWQForCausalLM.from_pretrained(tmp_path / "gpt2")


def test_missing_model_path(tmp_path):
    from awqkit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no model at"):
        AutoAWQForCausalLM.from_pretrained(str(tmp_path / "missing"))


def test_resume_gives_the_same_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import awqkit.awq.pipeline as pipeline

    def run(resume_dir, out, fail_after=None):
        model = tiny_model("llama", num_hidden_layers=3)
        awq = AutoAWQForCausalLM(model)
        if fail_after is not None:
            real = pipeline.LayerQuantizer.run
            calls = {"n": 0}

            def flaky(self, inputs):
                if calls["n"] == fail_after:
                    raise RuntimeError("killed (simulated)")
                calls["n"] += 1
                return real(self, inputs)

            monkeypatch.setattr(pipeline.LayerQuantizer, "run", flaky)
        try:
            awq.quantize(
                None,
                G64,
                calib_data=random_token_blocks(4, 64),
                max_calib_seq_len=64,
                progress=False,
                resume_dir=resume_dir,
            )
        finally:
            monkeypatch.undo()
        return awq.save_quantized(out)

    straight = run(None, tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated"):
        run(tmp_path / "progress", tmp_path / "b", fail_after=2)
    assert (tmp_path / "progress" / "layer_0001.safetensors").exists()
    resumed = run(tmp_path / "progress", tmp_path / "b")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_config_helper_is_supported():
    assert get_spec(tiny_config("qwen3")).name == "Qwen3"
