"""Write a checkpoint atomically: sharded safetensors (+ index), config.json, generation_config.json.

Everything is written into a hidden temporary sibling directory, fsynced, and only then renamed into place. A crash
at any moment leaves either no directory or a ``.<name>.tmp-*`` one that no loader mistakes for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from awqkit.errors import CheckpointError, ConfigError
from awqkit.formats.config import QuantConfig

log = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# vLLM's Marlin AWQ kernel wants out % 64 == 0 and in % 128 == 0; otherwise it falls back to a slower kernel
MARLIN_MIN_THREAD_N, MARLIN_MIN_THREAD_K = 64, 128


def checkpoint_state_dict(model: torch.nn.Module, float_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The tensors to store: packed AWQ buffers as they are, float tensors cast to ``float_dtype``.

    Tied weights (lm_head sharing the embedding) are stored once, under their first name, as Transformers does.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            continue
        seen.add(key)
        t = tensor.detach()
        if t.is_floating_point() and not name.endswith(".scales"):
            t = t.to(float_dtype)
        out[name] = t.to("cpu").contiguous()
    return out


def marlin_warnings(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Layers whose shape keeps vLLM off its fast Marlin kernel."""
    notes = []
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            k, n = t.shape[0], t.shape[1] * 8
            if n % MARLIN_MIN_THREAD_N or k % MARLIN_MIN_THREAD_K:
                notes.append(f"{name[: -len('.qweight')]} (in={k}, out={n})")
    return notes


def hf_config_dict(config: Any, quant: QuantConfig, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """config.json content: the model's config with AutoAWQ's ``quantization_config`` block."""
    d = config.to_dict()
    d.pop("quantization_config", None)  # e.g. a GGUF source's block: the checkpoint is AWQ now
    d["quantization_config"] = quant.to_hf()
    dtype_name = str(dtype).removeprefix("torch.")
    d["torch_dtype"] = dtype_name  # read by Transformers 4.x, AutoAWQ and vLLM
    d["dtype"] = dtype_name  # Transformers 5.x spelling
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    return d


def _fsync_dir(path: Path) -> None:
    """fsync a file or directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` directory to ``target`` (replacing it), fsynced, so ``target`` is never
    half-written: a crash leaves either the old directory or the new one."""
    for path in [*staging.rglob("*"), staging]:
        _fsync_dir(path)
    if target.exists():
        old = target.parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(target)
    _fsync_dir(target.parent)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_shards(tmp: Path, tensors: dict[str, torch.Tensor], shard_size: int | str) -> None:
    split = split_torch_state_dict_into_shards(
        tensors, max_shard_size=shard_size, filename_pattern="model{suffix}.safetensors"
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
        os.chmod(tmp / filename, 0o644)  # safetensors creates 0600 files; a checkpoint is meant to be shared
        with open(tmp / filename, "rb") as f:
            os.fsync(f.fileno())
    if split.is_sharded:
        _write_json(
            tmp / SAFE_INDEX_NAME,
            {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": split.tensor_to_filename,
            },
        )


def prepare_target(save_dir: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory unless asked; clear stale temporaries from crashed writes."""
    if save_dir.exists() and not save_dir.is_dir():
        raise CheckpointError(f"{save_dir} exists and is not a directory; choose another output path")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"{save_dir} is not empty; pass overwrite=True (CLI: --overwrite) to replace it, or choose another path"
        )
    for stale in save_dir.parent.glob(f".{save_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def write_checkpoint_dir(
    save_dir: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config_dict: dict[str, Any],
    generation_config: dict[str, Any] | None = None,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Atomically create ``save_dir`` holding the tensors and configs; returns its path."""
    save_dir = Path(save_dir).expanduser().resolve()
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    prepare_target(save_dir, overwrite)
    tmp = save_dir.parent / f".{save_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_shards(tmp, tensors, shard_size)
        if generation_config:
            _write_json(tmp / "generation_config.json", generation_config)
        for name, obj in (extra_files or {}).items():
            _write_json(tmp / name, obj)
        # config.json last: its presence is what marks a directory as a checkpoint
        _write_json(tmp / "config.json", config_dict)
        publish_directory(tmp, save_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return save_dir


def save_checkpoint(
    model: torch.nn.Module,
    save_dir: str | os.PathLike,
    quant: QuantConfig,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Save a model whose decoder Linears are AWQLinear as an AutoAWQ-GEMM checkpoint, atomically.

    Args:
        model: a Transformers ``*ForCausalLM`` after quantization.
        save_dir: the directory to create.
        quant: its quantization settings (group size resolved).
        shard_size: largest shard, as Transformers spells it ("5GB") or bytes.
        overwrite: replace a non-empty ``save_dir``.
        dtype: dtype of the float tensors and of ``torch_dtype`` (float16: vLLM's ``awq`` kernel takes only fp16).
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"cannot save float tensors as {dtype}; use float16 (default), bfloat16 or float32")
    tensors = checkpoint_state_dict(model, dtype)
    slow = marlin_warnings(tensors)
    if slow:
        log.warning(
            "%d layer(s) have shapes vLLM's Marlin kernel cannot take (out %% 64 or in %% 128 != 0); vLLM will use "
            "its slower AWQ kernel for them: %s",
            len(slow),
            ", ".join(slow[:4]) + (" ..." if len(slow) > 4 else ""),
        )
    gen = getattr(model, "generation_config", None)
    gen_dict = gen.to_dict() if gen is not None else None
    return write_checkpoint_dir(
        save_dir, tensors, hf_config_dict(model.config, quant, dtype), gen_dict, shard_size, overwrite
    )
