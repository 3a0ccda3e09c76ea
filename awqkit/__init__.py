"""awqkit: AWQ 4-bit quantization with AutoAWQ's API and format, and fast inference of the result."""

from awqkit.api import AutoAWQForCausalLM
from awqkit.errors import AwqkitError
from awqkit.formats.config import QuantConfig
from awqkit.integrations.transformers import enable_from_env
from awqkit.nn.convert import quantize_rtn

# AWQKIT_TRANSFORMERS=1: Transformers' AutoModelForCausalLM loads AWQ checkpoints with awqkit's modules
enable_from_env()

__version__ = "0.1.0"
__all__ = ["AutoAWQForCausalLM", "AwqkitError", "QuantConfig", "quantize_rtn", "__version__"]
