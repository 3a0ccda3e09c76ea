"""awqkit's ``HfQuantizer`` for ``quant_method: "awq"``.

Imported only when :func:`awqkit.integrations.transformers.enable` runs: Transformers' quantizer registry is slow to
import, and ``import awqkit`` should not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from awqkit.errors import CheckpointError
from awqkit.formats.config import QuantConfig
from awqkit.formats.load import check_safetensors_file
from awqkit.nn.awq_linear import AWQLinear


def _awq_module_names(checkpoint_files: list[str] | None) -> set[str] | None:
    """Modules stored in AWQ GEMM form (``<name>.qweight``), read from the safetensors headers only."""
    if not checkpoint_files:
        return None
    names: set[str] = set()
    for file in checkpoint_files:
        path = Path(file)
        if path.suffix != ".safetensors":
            return None
        names.update(k[: -len(".qweight")] for k in check_safetensors_file(path) if k.endswith(".qweight"))
    return names


class AwqkitHfQuantizer(HfQuantizer):
    """Transformers' quantizer interface for AWQ GEMM checkpoints, backed by :class:`~awqkit.nn.AWQLinear`.

    Before the weights load, every Linear that the checkpoint stores as ``qweight/qzeros/scales`` becomes an empty
    AWQLinear; Transformers then fills its buffers by name. Afterwards the scales are put back in float16 and the
    bias in the model's dtype (as :func:`~awqkit.formats.load.load_quantized_model` does) and each module prepares
    its kernel.
    """

    requires_calibration = True  # pre-quantized checkpoints only: awqkit quantizes through its own API

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        QuantConfig.from_hf(self._config_dict())  # bits/group size/version awqkit cannot run fail here, clearly

    def _config_dict(self) -> dict[str, Any]:
        qc = self.quantization_config
        d = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
        d = {
            k: getattr(d.get(k), "value", d.get(k))
            for k in ("bits", "group_size", "zero_point", "version", "modules_to_not_convert")
        }  # enums → strings
        return {"quant_method": "awq", **{k: v for k, v in d.items() if v is not None}}

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        quant = QuantConfig.from_hf(self._config_dict())
        stored = _awq_module_names(kwargs.get("checkpoint_files"))
        if stored is None:  # no safetensors headers to read: Transformers' rule (every Linear but the skips)
            skips = self.get_modules_to_not_convert(
                model, quant.modules_to_not_convert, model._keep_in_fp32_modules, add_default_skips=True
            )
            from transformers.quantizers.quantizers_utils import should_convert_module

            stored = {
                n
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and should_convert_module(n, skips)
            }
        modules = dict(model.named_modules())
        unknown = sorted(n for n in stored if not isinstance(modules.get(n), torch.nn.Linear))
        if unknown:
            raise CheckpointError(
                f"the checkpoint stores AWQ weights for {', '.join(unknown[:3])}, which are not Linear layers of "
                f"{type(model).__name__}; is the config.json from another model?"
            )
        for name in sorted(stored):
            linear = modules[name]
            with torch.device("meta"):
                awq = AWQLinear(
                    linear.in_features, linear.out_features, int(quant.group_size), bias=linear.bias is not None
                )
            model.set_submodule(name, awq)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for module in model.modules():
            if isinstance(module, AWQLinear):
                if module.qweight.is_meta:
                    raise CheckpointError("an AWQ layer's qweight was not in the checkpoint; it is incomplete")
                module.scales = module.scales.to(torch.float16)
                if module.bias is not None:
                    module.bias = module.bias.to(dtype)
                module.prepare_for_kernels()
        return model

    def is_serializable(self) -> bool:
        return True  # the buffers are the checkpoint's own tensors: save_pretrained writes AutoAWQ's format

    @property
    def is_trainable(self) -> bool:
        return False
