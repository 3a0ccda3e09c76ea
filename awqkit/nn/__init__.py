"""Modules that hold quantized weights and pick a kernel by device and shape."""

from awqkit.nn.awq_linear import AWQLinear, fuse_awq_linears

__all__ = ["AWQLinear", "fuse_awq_linears"]
