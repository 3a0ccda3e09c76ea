"""Load AWQ checkpoints with ``transformers.AutoModelForCausalLM.from_pretrained`` through awqkit's modules.

Transformers 5.x loads ``quant_method: "awq"`` checkpoints only through the ``gptqmodel`` package. Where that is not
installed (it pulls a CUDA build of PyTorch and compiles a CPU extension on first use), :func:`enable` registers
awqkit's quantizer for ``"awq"`` instead, so the usual code works unchanged::

    import awqkit.integrations.transformers as awqkit_transformers
    awqkit_transformers.enable()          # or: AWQKIT_TRANSFORMERS=1 and `import awqkit`

    model = AutoModelForCausalLM.from_pretrained("path/to/awq-checkpoint", device_map="auto")

Only the ``"awq"`` entry of Transformers' quantizer registry is replaced; every other quantization method, and float
checkpoints, load exactly as before. The model holds :class:`~awqkit.nn.AWQLinear` modules — the same ones
:func:`awqkit.formats.load.load_quantized_model` builds — so it runs on CPU (pure PyTorch) and on CUDA (awqkit's
Triton kernels), and gives the same logits as awqkit's own loader.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "AWQKIT_TRANSFORMERS"
_original: dict[str, Any] = {}  # Transformers' own "awq" quantizer, kept by enable() for disable()


def __getattr__(name: str) -> Any:
    if name == "AwqkitHfQuantizer":  # imported on first use: Transformers' quantizer registry is slow to import
        from awqkit.integrations.hf_quantizer import AwqkitHfQuantizer

        return AwqkitHfQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _registry() -> dict[str, Any]:
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZER_MAPPING


def enabled() -> bool:
    """Whether Transformers' ``"awq"`` quantization method currently loads through awqkit."""
    from awqkit.integrations.hf_quantizer import AwqkitHfQuantizer

    return _registry().get("awq") is AwqkitHfQuantizer


def enable(prefer_awqkit: bool = False) -> bool:
    """Make Transformers load AWQ checkpoints through awqkit; returns whether awqkit now handles them.

    Args:
        prefer_awqkit: also take over when ``gptqmodel`` is installed (by default its loader is left in place).
    """
    from transformers.utils import is_gptqmodel_available

    from awqkit.integrations.hf_quantizer import AwqkitHfQuantizer

    if is_gptqmodel_available() and not prefer_awqkit:
        log.info(
            "gptqmodel is installed: Transformers keeps loading AWQ through it (enable(prefer_awqkit=True) "
            "to use awqkit)"
        )
        return enabled()
    registry = _registry()
    if registry.get("awq") is not AwqkitHfQuantizer:
        _original.setdefault("awq", registry.get("awq"))
        registry["awq"] = AwqkitHfQuantizer
    return True


def disable() -> None:
    """Give the ``"awq"`` method back to Transformers' own quantizer."""
    if _original.get("awq") is not None:
        _registry()["awq"] = _original["awq"]


def enable_from_env() -> bool:
    """:func:`enable` when ``AWQKIT_TRANSFORMERS`` is set to 1/true/yes (``prefer`` also replaces gptqmodel)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return enable()
    if value == "prefer":
        return enable(prefer_awqkit=True)
    return False
