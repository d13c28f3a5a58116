"""Triton kernels for blockwise absmax quantization; imported only where CUDA is present.

Same format and rounding as the CPU reference (`blockwise.py`): one program per block reads
the block as (even, odd) pairs, so a 4-bit byte is packed from registers without shuffles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spotrain.kernels.format import QMAX, Quantized, code_bytes, num_blocks


@triton.jit
def _quantize_kernel(x_ptr, residual_ptr, codes_ptr, absmax_ptr, nonfinite_ptr, numel, block_size,
                     QMAX: tl.constexpr, FOUR_BIT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HALF: tl.constexpr):
    block = tl.program_id(0)
    pair = tl.arange(0, HALF)
    base = block.to(tl.int64) * block_size
    even = base + 2 * pair
    odd = even + 1
    limit = tl.minimum(base + block_size, numel)
    m_even = even < limit
    m_odd = odd < limit
    xe = tl.load(x_ptr + even, mask=m_even, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + odd, mask=m_odd, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        xe += tl.load(residual_ptr + even, mask=m_even, other=0.0)
        xo += tl.load(residual_ptr + odd, mask=m_odd, other=0.0)
    fe = tl.abs(xe) < float("inf")  # false for NaN and for +-Inf
    fo = tl.abs(xo) < float("inf")
    bad = tl.sum((m_even & ~fe).to(tl.int32), axis=0) + tl.sum((m_odd & ~fo).to(tl.int32), axis=0)
    xe = tl.where(fe, xe, 0.0)
    xo = tl.where(fo, xo, 0.0)
    amax = tl.maximum(tl.max(tl.abs(xe), axis=0), tl.max(tl.abs(xo), axis=0))
    inverse = tl.where(amax > 0, QMAX / amax, 0.0)
    qe = (xe * inverse + 12582912.0) - 12582912.0  # round half to even, as the CPU path
    qo = (xo * inverse + 12582912.0) - 12582912.0
    ie = qe.to(tl.int32)
    io = qo.to(tl.int32)
    if FOUR_BIT:
        packed = (ie & 15) | ((io & 15) << 4)
        tl.store(codes_ptr + base // 2 + pair, packed.to(tl.uint8), mask=m_even)
    else:
        tl.store(codes_ptr + even, ie.to(tl.int8), mask=m_even)
        tl.store(codes_ptr + odd, io.to(tl.int8), mask=m_odd)
    tl.store(absmax_ptr + block, amax)
    if HAS_RESIDUAL:
        scale = amax / QMAX
        tl.store(residual_ptr + even, xe - qe * scale, mask=m_even)
        tl.store(residual_ptr + odd, xo - qo * scale, mask=m_odd)
    tl.atomic_add(nonfinite_ptr, bad)


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, out_ptr, numel, block_size,
                       QMAX: tl.constexpr, FOUR_BIT: tl.constexpr, HALF: tl.constexpr):
    block = tl.program_id(0)
    pair = tl.arange(0, HALF)
    base = block.to(tl.int64) * block_size
    even = base + 2 * pair
    odd = even + 1
    limit = tl.minimum(base + block_size, numel)
    m_even = even < limit
    m_odd = odd < limit
    scale = tl.load(absmax_ptr + block) / QMAX
    if FOUR_BIT:
        packed = tl.load(codes_ptr + base // 2 + pair, mask=m_even, other=0).to(tl.int32)
        low = packed & 15
        high = (packed >> 4) & 15
        low = tl.where(low > 7, low - 16, low)
        high = tl.where(high > 7, high - 16, high)
    else:
        low = tl.load(codes_ptr + even, mask=m_even, other=0).to(tl.int32)
        high = tl.load(codes_ptr + odd, mask=m_odd, other=0).to(tl.int32)
    tl.store(out_ptr + even, (low.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=m_even)
    tl.store(out_ptr + odd, (high.to(tl.float32) * scale).to(out_ptr.dtype.element_ty), mask=m_odd)


def _half(block_size: int) -> int:
    return max(16, triton.next_power_of_2(block_size // 2))


def quantize(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None) -> Quantized:
    numel = flat.numel()
    device = flat.device
    codes = torch.empty(code_bytes(numel, bits), dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(numel, block_size), dtype=torch.float32, device=device)
    if numel == 0:
        return Quantized(codes, absmax, 0, bits, block_size, 0)
    if residual is not None and (residual.device != device or residual.dtype != torch.float32
                                 or residual.numel() != numel):
        raise ValueError("residual must be float32 on the tensor's device with its number of values")
    nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
    _quantize_kernel[(absmax.numel(),)](
        flat.contiguous(), residual if residual is not None else flat, codes if bits == 4 else codes.view(torch.int8),
        absmax, nonfinite, numel, block_size,
        QMAX=float(QMAX[bits]), FOUR_BIT=bits == 4, HAS_RESIDUAL=residual is not None, HALF=_half(block_size),
    )
    return Quantized(codes, absmax, numel, bits, block_size, int(nonfinite.item()))


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.numel, dtype=dtype, device=q.codes.device)
    if q.numel == 0:
        return out
    _dequantize_kernel[(q.absmax.numel(),)](
        q.codes if q.bits == 4 else q.codes.view(torch.int8), q.absmax, out, q.numel, q.block_size,
        QMAX=float(QMAX[q.bits]), FOUR_BIT=q.bits == 4, HALF=_half(q.block_size),
    )
    return out
