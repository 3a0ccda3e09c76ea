"""Pieces shared by every kernel: unpacking AutoAWQ's interleaved nibbles, the int→float trick, device facts.

AutoAWQ packs eight 4-bit weights of one input row into an int32: nibble ``i`` holds output column
``8 * j + AWQ_ORDER[i]`` with ``AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``. The kernels never reorder memory; they
repeat each loaded int32 eight times (``tl.interleave``, which stays inside a thread's registers) and shift each copy
by the amount that brings *its* column's nibble down, so the unpacked tile comes out in natural column order and
scales, zeros and outputs need no permutation.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# 0x4B000000 is the float32 2**23: OR-ing a value 0 <= v < 2**23 into its mantissa gives the float 2**23 + v
# exactly. Two integer ops (shift, and|or folded into one LOP3) plus one FADD replace an int→float conversion,
# which runs at a quarter of the FP32 rate on Hopper and would otherwise limit the decode kernels.
MAGIC_F32 = 0x4B000000


@triton.jit
def unpack_tile(packed, BN: tl.constexpr):
    """``[R, BN // 8]`` int32 AutoAWQ words → ``[R, BN]`` int32 ``2**23 + nibble`` bit patterns, natural column order.

    The caller bitcasts to float32 (see :func:`nibbles_minus_zeros`). Column ``c`` of a block of eight sits in nibble
    ``(c % 2) * 4 + c // 2`` (AutoAWQ's reverse order), so its shift is four times that.
    """
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)  # every word now appears 8 times in a row: [R, BN]
    c = tl.arange(0, BN) % 8
    shifts = ((c % 2) * 4 + c // 2) * 4
    return ((p >> shifts[None, :]) & 0xF) | 0x4B000000


@triton.jit
def unpack_tile_one_plus(packed, BN: tl.constexpr, ASM: tl.constexpr):
    """``[R, BN // 8]`` AutoAWQ words → ``[R, BN]`` float32 ``1 + q / 16``, natural column order.

    The nibble is rotated into mantissa bits 19..22 of the float 1.0 (``0x3F800000``): one funnel shift and one
    LOP3 per weight and no float op, against shift, LOP3 and FADD for ``2**23 + q``. The caller recovers
    ``sum_k x_k q_k = 16 * (sum_k x_k f_k - sum_k x_k)``: the subtraction cancels at most ~4 bits of fp32 on
    random signs (the q/16 part is as large as the 1 part), far below the activations' own rounding.
    ``ASM`` uses one ``shf.l.wrap`` + ``lop3`` per element (GPU only; the interpreter runs the plain-Triton form).
    """
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    rot = (19 - 4 * ((c % 2) * 4 + c // 2)) & 31  # never 0: 19, 15, 11, 7, 3, 31, 27, 23
    if ASM:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, 0x00780000, 0x3F800000, 0xEA; }",
            "=r,r,r",
            [p, tl.broadcast_to(rot[None, :], p.shape)],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        u = p.to(tl.uint32, bitcast=True)
        r = (u << rot[None, :]) | (u >> (32 - rot)[None, :])
        bits = ((r & 0x00780000) | 0x3F800000).to(tl.int32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def nibble_value(bits):
    """The float32 value of a ``2**23 + nibble`` bit pattern from :func:`unpack_tile`: the nibble, exactly."""
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def nibbles_minus_zeros(qw_bits, qz_bits):
    """``q - z`` as exact float32 from the two magic bit patterns of :func:`unpack_tile` (broadcasting)."""
    return qw_bits.to(tl.float32, bitcast=True) - qz_bits.to(tl.float32, bitcast=True)


class Partials(NamedTuple):
    """``x @ W (+ bias)`` not yet summed over its K slices, for a consumer kernel that adds them as it reads them.

    ``parts [S, ..., N]``: fp32 split-K partial sums when ``S > 1`` (``bias`` still to add), or the finished output
    in the activation dtype when ``S == 1`` (``bias`` already in it, and ``None`` here). Handing these on instead of
    reducing saves the reduction's launch and its write + read of the output (the engine's rotary and SiLU kernels
    take them)."""

    parts: torch.Tensor
    bias: torch.Tensor | None

    def total(self, dtype: torch.dtype) -> torch.Tensor:
        """The finished output ``[..., N]`` in ``dtype`` (PyTorch; what the consumer kernels compute on the fly)."""
        if self.parts.shape[0] == 1 and self.bias is None:
            return self.parts[0].to(dtype)
        y = self.parts.float().sum(0)
        return (y if self.bias is None else y + self.bias.float()).to(dtype)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM; the same default for CPU interpreter runs)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def unpack_row(packed, BN: tl.constexpr):
    """1-D form of :func:`unpack_tile`: ``[BN // 8]`` words → ``[BN]`` ``2**23 + nibble`` bit patterns."""
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    return ((p >> (((c % 2) * 4 + c // 2) * 4)) & 0xF) | 0x4B000000


@triton.jit
def unpack_row_one_plus(packed, BN: tl.constexpr, ASM: tl.constexpr):
    """1-D form of :func:`unpack_tile_one_plus`: ``[BN // 8]`` words → ``[BN]`` float32 ``1 + q / 16``."""
    p = tl.interleave(packed, packed)
    p = tl.interleave(p, p)
    p = tl.interleave(p, p)
    c = tl.arange(0, BN) % 8
    rot = (19 - 4 * ((c % 2) * 4 + c // 2)) & 31
    if ASM:
        bits = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shf.l.wrap.b32 t, $1, $1, $2; lop3.b32 $0, t, 0x00780000, 0x3F800000, 0xEA; }",
            "=r,r,r",
            [p, rot],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        u = p.to(tl.uint32, bitcast=True)
        r = (u << rot) | (u >> (32 - rot))
        bits = ((r & 0x00780000) | 0x3F800000).to(tl.int32, bitcast=True)
    return bits.to(tl.float32, bitcast=True)
