"""Model families as data: :func:`get_spec` maps a Transformers config to its :class:`ArchSpec`."""

from __future__ import annotations

from typing import Any

from awqkit.arch.families import FAMILIES
from awqkit.arch.spec import ArchSpec, ScaleGroup
from awqkit.errors import UnsupportedArchitectureError

_BY_MODEL_TYPE = {mt: spec for spec in FAMILIES for mt in spec.model_types}


def supported_model_types() -> list[str]:
    """The ``model_type`` values awqkit can quantize and run."""
    return sorted(_BY_MODEL_TYPE)


def get_spec(config: Any) -> ArchSpec:
    """The declaration for ``config.model_type``; a clear error naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None) or (config.get("model_type") if isinstance(config, dict) else None)
    spec = _BY_MODEL_TYPE.get(str(model_type))
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; awqkit supports model_type "
            f"{', '.join(supported_model_types())}. Adding a family is a declaration in awqkit/arch/families.py."
        )
    return spec


__all__ = ["ArchSpec", "ScaleGroup", "FAMILIES", "get_spec", "supported_model_types"]
