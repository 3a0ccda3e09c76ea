"""``QuantConfig``: the quantization settings, in AutoAWQ's API spelling and in config.json's.

AutoAWQ's ``quantize()`` takes ``{"zero_point", "q_group_size", "w_bit", "version"}``; the checkpoint's
``config.json`` carries ``{"quant_method": "awq", "zero_point", "group_size", "bits", "version": "gemm",
"modules_to_not_convert"}``. vLLM's Marlin path reads only ``bits``/``group_size``, so those are the keys we write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from awqkit.errors import ConfigError

SUPPORTED_GROUP_SIZES = (128, 64, 32)


@dataclass
class QuantConfig:
    """4-bit AWQ settings.

    Attributes:
        w_bit: weight bits; only 4 is supported (AutoAWQ's GEMM packs eight nibbles per int32).
        group_size: input channels sharing one scale/zero, or ``"auto"`` (largest of 128/64/32 dividing every layer).
        zero_point: asymmetric quantization with a per-group zero point (AutoAWQ's default). With ``False`` the
            weights are symmetric and stored with zero point 8, which is what vLLM's ``uint4b8`` path expects.
        version: packing layout; only ``"gemm"`` is written.
        modules_to_not_convert: name fragments of Linears to keep in float (e.g. ``["mlp.gate"]``).
    """

    w_bit: int = 4
    group_size: int | str = 128
    zero_point: bool = True
    version: str = "gemm"
    modules_to_not_convert: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.w_bit != 4:
            raise ConfigError(
                f"w_bit={self.w_bit} is not supported: only 4-bit packing (AutoAWQ GEMM) is. Use w_bit=4."
            )
        if isinstance(self.group_size, str):
            if self.group_size != "auto":
                raise ConfigError(f"group size {self.group_size!r} is not a number; use 128, 64, 32 or 'auto'")
        elif self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"group size {self.group_size} is not supported; use 128, 64, 32 or 'auto'")
        self.version = str(self.version).lower()
        if self.version != "gemm":
            raise ConfigError(f"version {self.version!r} is not supported; awqkit writes AutoAWQ's 'GEMM' layout")
        self.zero_point = bool(self.zero_point)

    @classmethod
    def from_autoawq(cls, quant_config: dict[str, Any] | QuantConfig | None) -> QuantConfig:
        """Build from the dict AutoAWQ's ``quantize(quant_config=...)`` takes (also accepts config.json spelling)."""
        if isinstance(quant_config, QuantConfig):
            return quant_config
        cfg = dict(quant_config or {})
        known = {
            "zero_point",
            "q_group_size",
            "group_size",
            "w_bit",
            "bits",
            "version",
            "modules_to_not_convert",
            "quant_method",
        }
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"unknown quant_config keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(
            w_bit=int(cfg.get("w_bit", cfg.get("bits", 4))),
            group_size=cfg.get("q_group_size", cfg.get("group_size", 128)),
            zero_point=cfg.get("zero_point", True),
            version=cfg.get("version", "gemm"),
            modules_to_not_convert=cfg.get("modules_to_not_convert"),
        )

    @classmethod
    def from_hf(cls, qcfg: dict[str, Any]) -> QuantConfig:
        """Parse a checkpoint's ``quantization_config`` block."""
        method = str(qcfg.get("quant_method", "")).lower()
        if method != "awq":
            raise ConfigError(f"quantization_config has quant_method {method!r}; awqkit reads only 'awq' checkpoints")
        return cls(
            w_bit=int(qcfg.get("bits", qcfg.get("w_bit", 4))),
            group_size=int(qcfg.get("group_size", qcfg.get("q_group_size", 128))),
            zero_point=qcfg.get("zero_point", True),
            version=qcfg.get("version", "gemm"),
            modules_to_not_convert=qcfg.get("modules_to_not_convert"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``quantization_config`` block exactly as AutoAWQ writes it."""
        if not isinstance(self.group_size, int):
            raise ConfigError("resolve group_size='auto' before saving")
        return {
            "quant_method": "awq",
            "zero_point": self.zero_point,
            "group_size": self.group_size,
            "bits": self.w_bit,
            "version": "gemm",
            "modules_to_not_convert": self.modules_to_not_convert,
        }

    def skips(self, module_name: str) -> bool:
        """Whether ``modules_to_not_convert`` keeps this Linear in float."""
        return any(frag in module_name for frag in (self.modules_to_not_convert or []))
