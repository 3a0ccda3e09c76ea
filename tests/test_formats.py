"""formats/: AutoAWQ GEMM packing, the AutoAWQ-written fixture, atomic sharded saves, validation of bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awqkit import QuantConfig, quantize_rtn
from awqkit.awq.quantizer import fake_quantize
from awqkit.errors import CheckpointError, ConfigError
from awqkit.formats import gemm
from awqkit.formats.load import load_quantized_model, read_checkpoint
from awqkit.formats.save import save_checkpoint
from awqkit.nn import AWQLinear
from tests.conftest import tiny_model

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
FIXTURE = FIXTURES / "autoawq-tiny-llama-g64"
REFERENCE = FIXTURES / "autoawq-tiny-llama-g64.reference.safetensors"
if not FIXTURE.exists():  # a checkout whose ../shared is elsewhere: the copy inside the repo
    FIXTURES = Path(__file__).parent / "fixtures"
    FIXTURE = FIXTURES / "autoawq-tiny-llama-g64"
    REFERENCE = FIXTURES / "autoawq-tiny-llama-g64.reference.safetensors"


def autoawq_pack_loop(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's own packing loop (WQLinear_GEMM.from_linear), transcribed as the reference."""
    rows, cols = intweight.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for col in range(cols // 8):
        for i, order in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            out[:, col] |= intweight[:, col * 8 + order].to(torch.int32) << (i * 4)
    return out


def test_pack_matches_autoawq_loop_and_round_trips():
    q = torch.randint(0, 16, (48, 64))
    packed = gemm.pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (48, 8)
    assert torch.equal(packed, autoawq_pack_loop(q))
    assert torch.equal(gemm.unpack(packed), q.to(torch.int32))


def test_pack_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="0..15"):
        gemm.pack(torch.full((2, 8), 16))


def test_fixture_dequantizes_bit_identically():
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    ref = load_file(str(REFERENCE))
    names = [k[len("dequant.") : -len(".weight")] for k in ref if k.startswith("dequant.")]
    assert len(names) == 14
    model = load_quantized_model(FIXTURE)
    for name in names:
        w = gemm.dequantize(
            tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], 64, torch.float32
        ).t()
        assert torch.equal(w.half(), ref[f"dequant.{name}.weight"].half()), name
        layer = model.get_submodule(name)
        assert isinstance(layer, AWQLinear)
        assert torch.equal(layer.dequantized_weight().half(), ref[f"dequant.{name}.weight"].half())


def test_fixture_logits_match_reference():
    ref = load_file(str(REFERENCE))
    model = load_quantized_model(FIXTURE)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    rel = (logits - ref["logits"]).norm() / ref["logits"].norm()
    assert rel < 1e-3, rel


def test_saved_checkpoint_reads_back_exactly(tmp_path):
    model = tiny_model("qwen2")  # q/k/v with bias
    masters = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    out = save_checkpoint(model, tmp_path / "ckpt", quant)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": 32,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert cfg["torch_dtype"] == "float16"
    ckpt = read_checkpoint(out)
    for name, w in masters.items():
        t = ckpt.tensors
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.scales"].dtype == torch.float16
        deq = gemm.dequantize(t[f"{name}.qweight"], t[f"{name}.qzeros"], t[f"{name}.scales"], 32, torch.float32).t()
        # AutoAWQ's formula on what we wrote gives exactly the weights we quantized to
        assert torch.equal(deq, fake_quantize(w, 32, True)), name
    assert "model.layers.0.self_attn.q_proj.bias" in ckpt.tensors


def test_symmetric_quantization_stores_zero_point_eight(tmp_path):
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    quant = quantize_rtn(model, QuantConfig(group_size=64, zero_point=False))
    layer = model.model.layers[0].mlp.up_proj
    assert torch.all(gemm.unpack(layer.qzeros) == 8)
    assert torch.equal(layer.dequantized_weight(), fake_quantize(w, 64, False))
    out = save_checkpoint(model, tmp_path / "sym", quant)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["zero_point"] is False


def test_sharded_save_has_index_and_loads(tmp_path):
    model = tiny_model("llama")
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    out = save_checkpoint(model, tmp_path / "sharded", quant, shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert torch.allclose(load_quantized_model(out)(x).logits, model(x).logits, atol=1e-3, rtol=1e-3)


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    model = tiny_model("llama")
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(model, target, quant)
    assert (target / "keep.txt").exists()
    save_checkpoint(model, target, quant, overwrite=True)
    assert (target / "config.json").exists() and not (target / "keep.txt").exists()


def test_crash_during_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import awqkit.formats.save as save_mod

    model = tiny_model("llama")
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    calls = {"n": 0}
    real = save_mod.save_file

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(save_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(model, tmp_path / "ckpt", quant, shard_size="200KB")
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_the_file(tiny_rtn_checkpoint, tmp_path):
    ckpt = _copy(tiny_rtn_checkpoint, tmp_path / "c")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        read_checkpoint(ckpt)


def test_corrupt_header_names_the_file(tiny_rtn_checkpoint, tmp_path):
    ckpt = _copy(tiny_rtn_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        read_checkpoint(ckpt)


def test_missing_shard_is_named(tmp_path):
    model = tiny_model("llama")
    quant = quantize_rtn(model, QuantConfig(group_size=32))
    out = save_checkpoint(model, tmp_path / "sharded", quant, shard_size="200KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        read_checkpoint(out)


def test_config_without_quantization_config(tiny_rtn_checkpoint, tmp_path):
    ckpt = _copy(tiny_rtn_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        load_quantized_model(ckpt)


def test_wrong_dtype_and_shape_are_reported(tiny_rtn_checkpoint, tmp_path):
    ckpt = _copy(tiny_rtn_checkpoint, tmp_path / "c")
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj"
    tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"].float()
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="int32"):
        read_checkpoint(ckpt)
    tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"].int()
    tensors[f"{name}.scales"] = tensors[f"{name}.scales"][:1]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="scales has shape"):
        read_checkpoint(ckpt)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        read_checkpoint(tmp_path / "nope")


def test_quant_config_validation():
    with pytest.raises(ConfigError, match="only 4-bit"):
        QuantConfig.from_autoawq({"w_bit": 8})
    with pytest.raises(ConfigError, match="unknown quant_config keys"):
        QuantConfig.from_autoawq({"q_group_sise": 64})
    with pytest.raises(ConfigError, match="GEMM"):
        QuantConfig.from_autoawq({"version": "GEMV"})
    assert QuantConfig.from_autoawq({"q_group_size": 64, "version": "GEMM"}).group_size == 64
