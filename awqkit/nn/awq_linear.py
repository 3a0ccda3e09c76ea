"""``AWQLinear``: a Linear layer whose weight lives in AutoAWQ's packed GEMM format.

The module keeps the on-disk tensors (``qweight``, ``qzeros``, ``scales``) and their meaning unchanged, so a
``state_dict()`` is a valid AutoAWQ checkpoint fragment. How ``x @ W`` is computed is picked per call:

* on CUDA, the Triton kernels of :mod:`awqkit.kernels` (they may keep a repacked copy made once at load),
* anywhere else, the pure-PyTorch reference: unpack → dequantize → matmul, in the activation's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from awqkit.errors import ConfigError
from awqkit.formats import gemm


class AWQLinear(nn.Module):
    """4-bit weight-only quantized Linear (W4A16) in AutoAWQ GEMM layout.

    Args:
        in_features: K, must be divisible by ``group_size``.
        out_features: N, must be divisible by 8 (eight nibbles per int32).
        group_size: input channels sharing one scale and zero point.
        bias: whether the layer has a bias (kept in the activation dtype).
        device: where to allocate the (empty) buffers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ConfigError(f"group size {group_size} does not divide in_features {in_features}")
        if out_features % gemm.PACK:
            raise ConfigError(f"out_features {out_features} is not a multiple of {gemm.PACK}; AWQ cannot pack it")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups, packed = in_features // group_size, out_features // gemm.PACK
        self.register_buffer("qweight", torch.zeros(in_features, packed, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, packed, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        # state owned by the kernel backend (e.g. a repacked weight); rebuilt by prepare_for_kernels()
        self._kernel_state = None

    @classmethod
    def from_packed(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> AWQLinear:
        """Wrap already-packed AutoAWQ tensors (no copy)."""
        in_features, out_features = qweight.shape[0], scales.shape[1]
        layer = cls(in_features, out_features, group_size, bias=bias is not None, device="meta")
        layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, scales
        if bias is not None:
            layer.bias = bias
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with, ``[out, in]`` (``nn.Linear.weight`` orientation)."""
        return gemm.dequantize(self.qweight, self.qzeros, self.scales, self.group_size, dtype).t()

    def prepare_for_kernels(self) -> None:
        """Let the device's kernel backend post-process the weights once (e.g. repack). Idempotent."""
        self._kernel_state = None
        if self.qweight.is_cuda:  # awqkit.kernels needs Triton, which a CPU-only install may lack
            from awqkit import kernels

            if kernels.available():
                self._kernel_state = kernels.prepare(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from awqkit import kernels

            if kernels.available():
                return kernels.awq_linear(x, self)
        return self._reference_forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack → dequantize → matmul; exact up to the activation dtype's rounding."""
        w = gemm.dequantize(self.qweight, self.qzeros, self.scales, self.group_size, x.dtype)
        y = x @ w
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def fuse_awq_linears(layers: list[AWQLinear]) -> AWQLinear:
    """One AWQLinear computing ``cat([l(x) for l in layers], -1)``: layers that share an input (q/k/v, gate/up).

    Concatenating along the output dimension keeps the format: every layer's N is a multiple of 8, so packed
    columns never straddle two layers.
    """
    group_size = layers[0].group_size
    if any(l.group_size != group_size or l.in_features != layers[0].in_features for l in layers):
        raise ConfigError("only layers with the same in_features and group size can be fused")
    biases = [l.bias for l in layers]
    if any(b is not None for b in biases):
        biases = [
            b if b is not None else torch.zeros(l.out_features, dtype=l.scales.dtype, device=l.scales.device)
            for b, l in zip(biases, layers)
        ]
        bias = torch.cat(biases)
    else:
        bias = None
    fused = AWQLinear.from_packed(
        torch.cat([l.qweight for l in layers], dim=1),
        torch.cat([l.qzeros for l in layers], dim=1),
        torch.cat([l.scales for l in layers], dim=1),
        group_size,
        bias,
    )
    return fused
