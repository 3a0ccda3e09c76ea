"""Read AWQ checkpoints (ours, AutoAWQ's, any published one), validating as we go.

:func:`read_checkpoint` returns the config, the quantization settings and the tensors; every problem a user can hit
(missing shard, truncated file, wrong shapes or dtypes, no ``quantization_config``) becomes a
:class:`~awqkit.errors.CheckpointError` naming the file and what to do. :func:`load_quantized_model` builds the
Transformers model with :class:`~awqkit.nn.AWQLinear` in place of the quantized Linears.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from awqkit.errors import CheckpointError, ConfigError, ModelNotFoundError
from awqkit.formats.config import QuantConfig
from awqkit.formats.save import SAFE_INDEX_NAME, SAFE_WEIGHTS_NAME

_SAFETENSORS_DTYPE_SIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass
class Checkpoint:
    """A checkpoint read into memory: its config, quantization settings (None: float) and tensors."""

    path: Path
    config: Any
    quant: QuantConfig | None
    tensors: dict[str, torch.Tensor]

    @property
    def quantized_modules(self) -> list[str]:
        """Names of the modules stored in AWQ GEMM form."""
        return sorted(n[: -len(".qweight")] for n in self.tensors if n.endswith(".qweight"))


def resolve_model_path(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (or taken from the cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a checkpoint directory")
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no checkpoint directory at {name!r}; pass a local directory or a hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
                **hub_kwargs,
            )
        )
    except Exception as e:  # hub errors come in many classes (offline, 404, auth, ...)
        raise ModelNotFoundError(
            f"could not find {name!r} locally or download it from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Pass a local directory, or check the id and your network."
        ) from None


def check_safetensors_file(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it declares; returns the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-create it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: it declares {8 + n + end} bytes but has {size}; re-download or re-create it"
        )
    return header


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against the index when there is one."""
    index = path / SAFE_INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: shard(s) {', '.join(missing)} named in {SAFE_INDEX_NAME} are "
                "missing; copy or download them again"
            )
        return [path / f for f in files]
    if (path / SAFE_WEIGHTS_NAME).is_file():
        return [path / SAFE_WEIGHTS_NAME]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        bins = sorted(path.glob("*.bin"))
        hint = " (only .bin files found: convert them to safetensors)" if bins else ""
        raise CheckpointError(f"no .safetensors weights in {path}{hint}")
    return found


def read_tensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of the given shards, naming the file that fails."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        check_safetensors_file(file)
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError and OSError subclasses
            raise CheckpointError(f"could not read {file}: {e}; re-download or re-create it") from None
    return tensors


def read_config(path: Path) -> Any:
    """The model config (a ``transformers.PretrainedConfig``), with its ``quantization_config`` kept as a dict."""
    from transformers import AutoConfig

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; it is not a Transformers checkpoint directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError) as e:
        model_type = raw.get("model_type")
        raise CheckpointError(f"Transformers cannot read {cfg_file} (model_type {model_type!r}): {e}") from None


def quant_config_of(config: Any) -> QuantConfig | None:
    """The checkpoint's AWQ settings, or None for a float checkpoint."""
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        qcfg = qcfg.to_dict()
    try:
        return QuantConfig.from_hf(qcfg)
    except ConfigError as e:
        raise CheckpointError(f"unusable quantization_config: {e}") from None


def validate_awq_tensors(tensors: dict[str, torch.Tensor], quant: QuantConfig, where: Path) -> None:
    """Check every AWQ layer's three tensors agree with each other and with ``bits``/``group_size``."""
    g = quant.group_size
    for name in (n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")):
        parts = {s: tensors.get(f"{name}.{s}") for s in ("qweight", "qzeros", "scales")}
        missing = [s for s, t in parts.items() if t is None]
        if missing:
            raise CheckpointError(f"{where}: layer {name} has qweight but no {', '.join(missing)}")
        qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
        if qw.dtype != torch.int32 or qz.dtype != torch.int32:
            raise CheckpointError(
                f"{where}: {name}.qweight/qzeros are {qw.dtype}/{qz.dtype}; AWQ GEMM stores them as int32"
            )
        if sc.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise CheckpointError(f"{where}: {name}.scales is {sc.dtype}; expected float16")
        k, n = qw.shape[0], qw.shape[1] * 8
        if k % g:
            raise CheckpointError(f"{where}: {name} has in_features {k}, which group size {g} does not divide")
        expect = {"qzeros": (k // g, n // 8), "scales": (k // g, n)}
        for s, shape in expect.items():
            if tuple(parts[s].shape) != shape:
                raise CheckpointError(
                    f"{where}: {name}.{s} has shape {tuple(parts[s].shape)}, expected {shape} for qweight "
                    f"{tuple(qw.shape)} with bits={quant.w_bit}, group_size={g} (is it a GEMV or Marlin checkpoint?)"
                )


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs: Any) -> Checkpoint:
    """Read and validate a checkpoint (local directory or hub id)."""
    root = resolve_model_path(path, **hub_kwargs)
    config = read_config(root)
    quant = quant_config_of(config)
    tensors = read_tensors(shard_files(root), device)
    if quant is not None:
        validate_awq_tensors(tensors, quant, root)
    return Checkpoint(path=root, config=config, quant=quant, tensors=tensors)


def build_model(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """An empty (meta-device) Transformers causal LM for ``config``, without Transformers' own quantizer."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = config.__class__.from_dict(config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def load_quantized_model(
    path: str | os.PathLike | Checkpoint,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """The Transformers model of an AWQ checkpoint, with AWQLinear modules; forward gives logits.

    Args:
        path: checkpoint directory, hub id, or an already-read :class:`Checkpoint`.
        device: where to put it.
        dtype: activation/float dtype; default float16 on CUDA (the checkpoint's own) and float32 elsewhere.
    """
    from awqkit.nn.awq_linear import AWQLinear

    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    if ckpt.quant is None:
        raise CheckpointError(
            f"{ckpt.path}/config.json has no quantization_config: this is a float checkpoint. Quantize it first "
            "(awqkit quantize MODEL -o OUT) or load it with transformers.AutoModelForCausalLM."
        )
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build_model(ckpt.config, dtype)
    for name in ckpt.quantized_modules:
        parent_name, _, child = name.rpartition(".")
        bias = ckpt.tensors.get(f"{name}.bias")
        layer = AWQLinear.from_packed(
            ckpt.tensors[f"{name}.qweight"],
            ckpt.tensors[f"{name}.qzeros"],
            ckpt.tensors[f"{name}.scales"].to(torch.float16),
            ckpt.quant.group_size,
            None if bias is None else bias.to(dtype),
        )
        try:
            model.get_submodule(parent_name).register_module(child, layer)
        except AttributeError:
            raise CheckpointError(f"{ckpt.path}: tensor {name}.qweight matches no module of the model") from None
    float_tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in ckpt.tensors.items()
        if not k.endswith((".qweight", ".qzeros", ".scales"))
        and not (k.endswith(".bias") and k[:-5] in set(ckpt.quantized_modules))
    }
    missing, unexpected = model.load_state_dict(float_tensors, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    awq_buffers = {f"{n}.{s}" for n in ckpt.quantized_modules for s in ("qweight", "qzeros", "scales", "bias")}
    missing = [m for m in missing if m not in awq_buffers]
    if missing:
        raise CheckpointError(
            f"{ckpt.path} is missing weights: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if unexpected:
        raise CheckpointError(f"{ckpt.path} has tensors the model does not use: {', '.join(unexpected[:5])}")
    model.config.quantization_config = ckpt.quant.to_hf()
    model = model.to(device).eval()
    for module in model.modules():
        if isinstance(module, AWQLinear):
            module.prepare_for_kernels()
    return model
