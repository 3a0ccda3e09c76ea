"""A fast generation engine for AWQ (and float) checkpoints: compact decoder, KV-cache slots, CUDA graphs, sampling.

from awqkit.engine import Engine, SamplingParams
engine = Engine.from_checkpoint("path/to/checkpoint")
print(engine.generate(["Hello"], SamplingParams(max_new_tokens=32, temperature=0))[0].text)
"""

from awqkit.engine.engine import Engine, GenerationResult, NoFreeSlotError, RequestOutput
from awqkit.engine.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "NoFreeSlotError", "RequestOutput", "SamplingParams"]
