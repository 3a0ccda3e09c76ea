"""Bridges to other libraries: :mod:`awqkit.integrations.transformers` loads AWQ checkpoints in Transformers."""
