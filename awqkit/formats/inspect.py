"""Validate an AWQ checkpoint and summarise it (``awqkit inspect``).

:func:`inspect_checkpoint` reads every shard through :func:`~awqkit.formats.load.read_checkpoint` (config, index,
every file readable, AWQ tensors consistent with ``bits``/``group_size``), then checks each tensor's shape against
the model the config describes, naming the file that holds a wrong one. :func:`format_summary` prints the result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from awqkit.errors import CheckpointError
from awqkit.formats.load import Checkpoint, check_safetensors_file, read_checkpoint, shard_files
from awqkit.formats.save import MARLIN_MIN_THREAD_K, MARLIN_MIN_THREAD_N, marlin_warnings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class CheckpointSummary:
    """What ``awqkit inspect`` reports about a valid AWQ checkpoint."""

    path: str
    model_type: str
    architectures: list[str]
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    bits: int
    group_size: int
    zero_point: bool
    version: str
    modules_to_not_convert: list[str] | None
    dtype: str | None
    shards: dict[str, int]  # file name → bytes
    quantized_modules: int
    quantized_params: int  # weights stored in 4 bits
    float_params: int  # everything else (embeddings, norms, lm_head, biases)
    has_tokenizer: bool
    has_chat_template: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.shards.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _tensor_files(root: Path) -> dict[str, str]:
    """Tensor name → the shard file holding it (from the headers)."""
    where = {}
    for file in shard_files(root):
        for name in check_safetensors_file(file):
            if name != "__metadata__":
                where[name] = file.name
    return where


def _expected_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters of the model the config describes (built on the meta device, no memory)."""
    from awqkit.formats.load import build_model

    try:
        model = build_model(ckpt.config, torch.float16)
    except Exception as e:  # Transformers raises many types for configs it cannot build
        raise CheckpointError(
            f"{ckpt.path}/config.json does not describe a model Transformers can build: {e}"
        ) from None
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[f"{name}.__linear__"] = (module.in_features, module.out_features)
    return shapes


def check_shapes(ckpt: Checkpoint) -> None:
    """Every tensor must fit the model of ``config.json``: AWQ layers by in/out features, the rest exactly."""
    expected = _expected_shapes(ckpt)
    files = _tensor_files(ckpt.path)
    quantized = set(ckpt.quantized_modules)
    for name in quantized:
        fits = expected.get(f"{name}.__linear__")
        qweight = ckpt.tensors[f"{name}.qweight"]
        have = (qweight.shape[0], qweight.shape[1] * 8)
        if fits is None:
            raise CheckpointError(
                f"{ckpt.path / files[name + '.qweight']}: {name} is not a Linear layer of the model "
                f"config.json describes ({ckpt.config.model_type})"
            )
        if have != fits:
            raise CheckpointError(
                f"{ckpt.path / files[name + '.qweight']}: {name} holds in/out features {have}, but config.json's "
                f"model has {fits}"
            )
    for name, tensor in ckpt.tensors.items():
        module = name.rpartition(".")[0]
        if module in quantized:
            continue
        shape = expected.get(name)
        if shape is None:
            raise CheckpointError(f"{ckpt.path / files[name]}: tensor {name} matches no parameter of the model")
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{ckpt.path / files[name]}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {shape}"
            )


def _notes(ckpt: Checkpoint, dtype: str | None) -> list[str]:
    notes = []
    slow = marlin_warnings(ckpt.tensors)
    if slow:
        notes.append(
            f"{len(slow)} of {len(ckpt.quantized_modules)} layers have shapes vLLM's Marlin kernel cannot take "
            f"(out % {MARLIN_MIN_THREAD_N} or in % {MARLIN_MIN_THREAD_K} != 0), e.g. {slow[0]}: vLLM runs them on "
            "its slower 'awq' kernel"
        )
    else:
        notes.append("every AWQ layer fits vLLM's Marlin kernel (--quantization awq_marlin)")
    if dtype not in (None, "float16"):
        notes.append(f"torch_dtype is {dtype}: vLLM's plain 'awq' kernel needs float16 (pass --dtype float16)")
    if not ckpt.quant.zero_point:
        notes.append("symmetric (no zero point): zeros are stored as 8")
    return notes


def inspect_checkpoint(path: str | Path) -> CheckpointSummary:
    """Validate the AWQ checkpoint at ``path`` and summarise it; any problem raises a :class:`CheckpointError`."""
    ckpt = read_checkpoint(path)
    if ckpt.quant is None:
        raise CheckpointError(
            f"{ckpt.path / 'config.json'} has no quantization_config: this is a float checkpoint, not an AWQ one "
            "(quantize it with: awqkit quantize MODEL -o OUT)"
        )
    if not ckpt.quantized_modules:
        raise CheckpointError(f"{ckpt.path} has an AWQ quantization_config but no qweight tensors")
    check_shapes(ckpt)
    cfg = ckpt.config
    raw = json.loads((ckpt.path / "config.json").read_text())
    dtype = raw.get("torch_dtype") or raw.get("dtype")
    quantized_params = sum(ckpt.tensors[f"{n}.qweight"].numel() * 8 for n in ckpt.quantized_modules)
    quant_suffixes = (".qweight", ".qzeros", ".scales")
    float_params = sum(t.numel() for n, t in ckpt.tensors.items() if not n.endswith(quant_suffixes))
    tok_cfg = ckpt.path / "tokenizer_config.json"
    chat_template = (ckpt.path / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text())
    )
    return CheckpointSummary(
        path=str(ckpt.path),
        model_type=cfg.model_type,
        architectures=list(getattr(cfg, "architectures", None) or []),
        num_layers=getattr(cfg, "num_hidden_layers", None),
        hidden_size=getattr(cfg, "hidden_size", None),
        vocab_size=getattr(cfg, "vocab_size", None),
        bits=ckpt.quant.w_bit,
        group_size=int(ckpt.quant.group_size),
        zero_point=ckpt.quant.zero_point,
        version=ckpt.quant.version,
        modules_to_not_convert=ckpt.quant.modules_to_not_convert,
        dtype=dtype,
        shards={f.name: f.stat().st_size for f in shard_files(ckpt.path)},
        quantized_modules=len(ckpt.quantized_modules),
        quantized_params=quantized_params,
        float_params=float_params,
        has_tokenizer=any((ckpt.path / n).is_file() for n in TOKENIZER_FILES),
        has_chat_template=chat_template,
        notes=_notes(ckpt, dtype),
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_summary(s: CheckpointSummary) -> str:
    """A few readable lines about a checkpoint."""
    arch = ", ".join(s.architectures) or s.model_type
    shards = f"{len(s.shards)} shard{'s' if len(s.shards) != 1 else ''}"
    lines = [
        f"{s.path}: valid AWQ checkpoint",
        f"  model        {arch} ({s.model_type}), {s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}",
        f"  quantization {s.bits}-bit, group size {s.group_size}, "
        f"{'zero point' if s.zero_point else 'symmetric'}, {s.version.upper()} layout"
        + (f", not converted: {', '.join(s.modules_to_not_convert)}" if s.modules_to_not_convert else ""),
        f"  layers       {s.quantized_modules} AWQ Linears ({_count(s.quantized_params)} weights in 4 bits), "
        f"{_count(s.float_params)} float parameters ({s.dtype or 'dtype unset'})",
        f"  files        {shards}, {_size(s.total_bytes)}; tokenizer: "
        f"{'yes' if s.has_tokenizer else 'no'}{', chat template' if s.has_chat_template else ''}",
    ]
    lines += [f"  note         {n}" for n in s.notes]
    return "\n".join(lines)
