"""Turn a float model's decoder Linears into :class:`AWQLinear` (after AWQ, or directly: round-to-nearest)."""

from __future__ import annotations

import torch
from torch import nn

from awqkit.arch import ArchSpec, get_spec
from awqkit.awq.quantizer import quantize_weight
from awqkit.errors import GroupSizeError
from awqkit.formats import gemm
from awqkit.formats.config import SUPPORTED_GROUP_SIZES, QuantConfig
from awqkit.nn.awq_linear import AWQLinear


def to_awq_linear(linear: nn.Linear, group_size: int, zero_point: bool) -> AWQLinear:
    """Quantize one Linear's current weight (round-to-nearest per group) and pack it."""
    qw = quantize_weight(linear.weight.data, group_size, zero_point)
    qweight, qzeros, scales = gemm.pack_linear(qw.q, qw.zeros, qw.scales)
    bias = None if linear.bias is None else linear.bias.data.to(torch.float16)
    return AWQLinear.from_packed(qweight, qzeros, scales, group_size, bias)


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The model's decoder-layer list, found by the declaration's path."""
    return model.get_submodule(spec.layers)


def quantizable_linears(model: nn.Module, spec: ArchSpec, quant: QuantConfig) -> dict[str, nn.Linear]:
    """Every decoder Linear the declaration names and ``modules_to_not_convert`` keeps, by full module name."""
    found: dict[str, nn.Linear] = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for rel in spec.linears:
            name = f"{spec.layers}.{i}.{rel}"
            if not quant.skips(name):
                found[name] = layer.get_submodule(rel)
    return found


def resolve_group_size(linears: dict[str, nn.Module], group_size: int | str) -> int:
    """Check that ``group_size`` divides every layer (or pick one for ``"auto"``), with a message that helps."""
    in_features = {name: m.in_features for name, m in linears.items()}
    working = [g for g in SUPPORTED_GROUP_SIZES if all(k % g == 0 for k in in_features.values())]
    if group_size == "auto":
        if not working:
            raise GroupSizeError(
                "no supported group size (128, 64, 32) divides every layer's in_features "
                f"{sorted(set(in_features.values()))}"
            )
        return working[0]
    for name, k in in_features.items():
        if k % group_size:
            hint = (
                f"{' and '.join(map(str, working))} divide{'s' if len(working) == 1 else ''} every layer; "
                f"pass q_group_size={working[0]} or 'auto'"
                if working
                else "no supported group size (128, 64, 32) divides every layer"
            )
            raise GroupSizeError(f"group size {group_size} does not divide in_features {k} of {name}; {hint}")
    return int(group_size)


def convert_layer(layer: nn.Module, spec: ArchSpec, quant: QuantConfig, prefix: str) -> None:
    """Replace one decoder layer's quantizable Linears by AWQLinear (``quant.group_size`` must be resolved)."""
    for rel in spec.linears:
        fc = layer.get_submodule(rel)
        if quant.skips(f"{prefix}.{rel}") or isinstance(fc, AWQLinear):
            continue
        parent_name, _, child = rel.rpartition(".")
        layer.get_submodule(parent_name).register_module(
            child, to_awq_linear(fc, int(quant.group_size), quant.zero_point)
        )


def replace_with_awq_linears(model: nn.Module, quant: QuantConfig, spec: ArchSpec | None = None) -> QuantConfig:
    """Quantize every quantizable decoder Linear of ``model`` in place; returns the config with its group size fixed."""
    spec = spec or get_spec(model.config)
    group_size = resolve_group_size(quantizable_linears(model, spec, quant), quant.group_size)
    resolved = QuantConfig(quant.w_bit, group_size, quant.zero_point, quant.version, quant.modules_to_not_convert)
    for i, layer in enumerate(decoder_layers(model, spec)):
        convert_layer(layer, spec, resolved, f"{spec.layers}.{i}")
    return resolved


def quantize_rtn(model: nn.Module, quant: QuantConfig) -> QuantConfig:
    """Round-to-nearest baseline: no calibration, no scale search; every decoder Linear becomes an AWQLinear."""
    return replace_with_awq_linears(model, quant)
