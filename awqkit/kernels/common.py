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


@triton.jit
def _rotl(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """Rotate 32-bit words left by ``BITS`` (1..31): one funnel shift on the GPU (the amount a constant register)."""
    if ASM:
        r = tl.inline_asm_elementwise("shf.l.wrap.b32 $0, $1, $1, $2;", "=r,r,r", [w, tl.full(w.shape, BITS, tl.int32)],
                                      dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        u = w.to(tl.uint32, bitcast=True)
        r = ((u << BITS) | (u >> (32 - BITS))).to(tl.int32, bitcast=True)
    return r


# The two mantissa positions a rotated word gives :func:`unpack_row_pairs` (bits 15..18 and 19..22) and the factors
# ``2 ** (23 - p)`` that turn ``sum_k x_k f_k - sum_k x_k`` back into ``sum_k x_k q_k``
PAIR_MULT_LO = tl.constexpr(256.0)  # nibble at bits 15..18: f = 1 + q / 256
PAIR_MULT_HI = tl.constexpr(16.0)  # nibble at bits 19..22: f = 1 + q / 16, as unpack_row_one_plus


@triton.jit
def unpack_row_pairs(packed, BN: tl.constexpr, ASM: tl.constexpr):
    """``[BN // 8]`` AutoAWQ words → ``[BN]`` float32 ``f = 1 + q / m``, ``m`` = 256 for columns ``c % 4 < 2`` and
    16 for the others (:func:`pair_mult`), natural column order.

    Rotating a word left by 15, 7, 31 or 23 bits puts two adjacent nibbles (0 and 1, 2 and 3, 4 and 5, 6 and 7) at
    bits 15..18 and 19..22 of the float 1.0's mantissa, so one LOP3 per weight (mask the nibble, OR the exponent)
    plus four funnel shifts per eight weights make the operands: 1.5 instructions per weight against 2 for
    :func:`unpack_row_one_plus`'s one rotation per weight. The nibble at bits 15..18 keeps the ``q`` part of
    ``sum_k x_k f_k`` 2**-8 below the ``x`` part: ~5e-6 relative to a chunk's ``sum_k x_k q_k`` in fp32, far below the
    output's bf16 or fp16 rounding."""
    r0 = _rotl(packed, 15, ASM)  # nibbles 0, 1
    r2 = _rotl(packed, 7, ASM)  # nibbles 2, 3
    r4 = _rotl(packed, 31, ASM)  # nibbles 4, 5
    r6 = _rotl(packed, 23, ASM)  # nibbles 6, 7
    # column c holds nibble (c % 2) * 4 + c // 2: even columns 0, 2, 4, 6 <- r0, r0, r2, r2, odd ones <- r4, r4, r6, r6
    lo = tl.interleave(r0, r2)
    hi = tl.interleave(r4, r6)
    p = tl.interleave(tl.interleave(lo, lo), tl.interleave(hi, hi))
    mask = tl.where((tl.arange(0, BN) % 4) < 2, 0x00078000, 0x00780000)
    if ASM:  # one LOP3 (written as and + or, ptxas would need two: both constants are immediates)
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x3F800000, 0xEA;", "=r,r,r",
                                         [p, tl.broadcast_to(mask, p.shape)], dtype=tl.int32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        bits = (p & mask) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pair_mult(BN: tl.constexpr):
    """``[BN]`` factors ``m`` of :func:`unpack_row_pairs`: ``sum_k x_k q_k = m (sum_k x_k f_k - sum_k x_k)``."""
    return tl.where((tl.arange(0, BN) % 4) < 2, PAIR_MULT_LO, PAIR_MULT_HI)


# --- Programmatic dependent launch (Hopper and newer) ------------------------------------------------------------
#
# At decode a layer is a chain of ~12 short kernels, and each one's launch, ramp-up and first trip to memory used to
# wait for the previous kernel to finish and flush. With PDL a kernel is launched while its predecessor still runs:
# its programs become resident, do what does not depend on the predecessor (index maths; the GEMV prefetches its
# first weight rows, which no kernel writes, into L2), then block in ``griddepcontrol.wait`` until the predecessor
# has completed and its writes are visible. Every kernel launched this way must wait before it reads anything an
# earlier kernel wrote and before it writes anything (a buffer it writes may still be read by the predecessor), so
# the wait and the launch flag travel together (:func:`pdl_launch`). Right after its wait a kernel lets its own
# successor launch: the successor can only reach its wait, not past it, so at most two kernels are in flight, and
# the trigger fires only once every program of the current kernel runs (no program of it can be starved of a slot).
# A normally launched kernel (cuBLAS, PyTorch) after one of these still waits for it in full, as ever.

_PDL_MODE: list[int | None] = [None]  # None: from AWQKIT_PDL (default on); 0 off, 1 on, 2 on without GEMV prefetch


def set_pdl(mode: int | None) -> None:
    """Force programmatic dependent launch off (0), on (1), on without the GEMV's weight prefetch (2), or back to
    the default (None: ``AWQKIT_PDL``, on unless set to 0). Takes effect for launches made afterwards (a CUDA
    graph keeps what it captured)."""
    _PDL_MODE[0] = mode


def pdl_mode(device: torch.device) -> int:
    """0 when kernels on ``device`` launch normally, else the PDL mode (see :func:`set_pdl`)."""
    mode = _PDL_MODE[0]
    if mode is None:
        mode = int(os.environ.get("AWQKIT_PDL", "1") or 0)
    if not mode or device.type != "cuda" or interpreting() or not _pdl_hardware(device.index):
        return 0
    return mode


@functools.cache
def _pdl_hardware(index: int | None) -> bool:
    """Compute capability 9.0+ and a Triton that exposes grid-dependency control."""
    try:
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    major, _ = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    return major >= 9


def pdl_launch(device: torch.device, mode: int | None = None) -> dict:
    """Keyword arguments for a launch of a kernel that calls :func:`pdl_sync`: ``PDL`` and Triton's
    ``launch_pdl``, both on or both off (``mode``: :func:`pdl_mode`'s answer, when the caller already has it)."""
    on = (pdl_mode(device) if mode is None else mode) > 0
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def pdl_sync(PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible, then let the next kernel launch (no-op unless ``PDL``).
    Call before the first load of anything another kernel produced and before the first store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the lines at ``ptrs`` to be brought into L2 (no registers written, nothing waits for them)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)  # fmt: skip
