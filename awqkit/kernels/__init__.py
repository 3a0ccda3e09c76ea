"""Triton W4A16 kernels for AutoAWQ's GEMM layout (``qweight [K, N/8]``, ``qzeros [K/G, N/8]``, ``scales [K/G, N]``).

Interface used by :class:`awqkit.nn.AWQLinear`:

* :func:`available` — CUDA device present and Triton importable;
* :func:`prepare` — one-time per-layer work after load; returns the state kept in ``layer._kernel_state``;
* :func:`awq_linear` — ``y = x @ W (+ bias)`` for ``x [..., K]`` in fp16 or bf16, output in ``x``'s dtype.

Lower level, for tests and benchmarks: :func:`awq_matmul` (dispatch by M), :func:`gemv`, :func:`gemm`,
:func:`gemm_planes`, :func:`dequantize` / :func:`dequant_matmul`, :func:`pick_config` / :func:`run_config`.

The kernels read the AutoAWQ tensors as they are: no repacked copy is made (a repack would double the weight
memory while the checkpoint tensors must stay in the module, and the unpacking trick in :mod:`.common` already makes
AutoAWQ's interleaved nibble order free). Every launch is CUDA-graph safe: no host synchronisation, and buffers
whose sizes depend only on the shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the GPU kernels can run here (a CUDA device and an importable Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


from awqkit.kernels.common import Partials  # noqa: E402
from awqkit.kernels.dequant import dequant_matmul, dequantize  # noqa: E402
from awqkit.kernels.dispatch import Config, awq_matmul, pick_config, run_config  # noqa: E402
from awqkit.kernels.gemm import gemm, gemm_planes  # noqa: E402
from awqkit.kernels.gemv import gemv  # noqa: E402


@dataclass(frozen=True)
class KernelState:
    """What :func:`prepare` keeps for a layer: its tensors in the contiguous layout the kernels index directly, and
    ``scales`` converted to an activation dtype where a kernel needs that (made on first use,
    :func:`~awqkit.kernels.dispatch.scales_for`)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int
    converted_scales: dict = field(default_factory=dict, compare=False, repr=False)


def prepare(layer) -> KernelState:
    """Check the layer's tensors once after load. No copy unless a tensor is non-contiguous (then one is made)."""
    qweight, qzeros, scales = (t.contiguous() for t in (layer.qweight, layer.qzeros, layer.scales))
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("AutoAWQ qweight/qzeros must be int32")
    return KernelState(qweight, qzeros, scales, layer.group_size)


def awq_linear(x: torch.Tensor, layer, partials: bool = False) -> torch.Tensor | Partials:
    """``layer(x)`` for an :class:`~awqkit.nn.AWQLinear`: ``x [..., K]`` → ``[..., N]`` in ``x``'s dtype; with
    ``partials``, :class:`Partials` whose ``parts`` are ``[S, ..., N]``."""
    state = layer._kernel_state
    if state is None:
        qweight, qzeros, scales, cache = layer.qweight, layer.qzeros, layer.scales, None
    else:
        qweight, qzeros, scales, cache = state.qweight, state.qzeros, state.scales, state.converted_scales
    k = qweight.shape[0]
    lead = x.shape[:-1]
    y = awq_matmul(x.reshape(-1, k), qweight, qzeros, scales, layer.group_size, layer.bias, partials, cache)
    if partials:
        return Partials(y.parts.reshape(y.parts.shape[0], *lead, scales.shape[1]), y.bias)
    return y.reshape(*lead, scales.shape[1])


__all__ = [
    "Config",
    "KernelState",
    "Partials",
    "available",
    "awq_linear",
    "awq_matmul",
    "dequant_matmul",
    "dequantize",
    "gemm",
    "gemm_planes",
    "gemv",
    "pick_config",
    "prepare",
    "run_config",
]
