"""Blockwise absmax quantization to 8 or 4 bits: the dispatch and the torch reference.

`quantize` / `dequantize` hand CUDA tensors to the Triton path (`accelerated.py`) and CPU
float32 tensors to the fused C path (`native.py`); everything else, and everything where those
are missing, runs the vectorized torch reference below (`reference_quantize` forces it). The
format all paths share is in `format.py`.

The reference works in chunks of whole blocks that fit in the L2 cache, so every pass after the first
read of a chunk hits the cache instead of memory; this, not clever arithmetic, is what makes
the path fast. Rounding uses the float "magic number" trick: adding 1.5 * 2**23 to a value
in [-127, 127] leaves round-half-even(value) in the low bits of the float's integer view, so
one fused multiply-add plus one integer narrowing replaces divide, round, clamp and convert.

Non-finite inputs never reach the codes: their blocks are re-scanned with NaN/Inf read as 0
and the count is reported, so the caller can log it and skip the step.
"""

from __future__ import annotations

import torch

from spotrain.kernels import native
from spotrain.kernels.format import BITS, QMAX, Quantized, code_bytes, num_blocks

CHUNK_VALUES = 1 << 18  # values per cache-resident chunk (1 MiB of fp32)
_MAGIC = 12582912.0  # 1.5 * 2**23
_MAGIC_TENSOR = torch.tensor(_MAGIC)


def _check(bits: int, block_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")


def _chunk_values(block_size: int) -> int:
    return max(block_size, CHUNK_VALUES // block_size * block_size)


def quantize(tensor: torch.Tensor, bits: int = 8, block_size: int = 1024,
             residual: torch.Tensor | None = None) -> Quantized:
    """Quantize `tensor` (any float dtype and shape, read flat).

    With `residual` (fp32, same numel) this is error feedback: `tensor + residual` is encoded
    and `residual` is overwritten, in place, with what the encoding dropped.
    """
    flat = tensor.detach().reshape(-1)
    check_quantize_arguments(flat, bits, block_size, residual)
    if flat.device.type != "cpu":
        from spotrain.kernels import accelerated

        result = accelerated.quantize(flat, bits, block_size, residual)
        if result is not None:
            return result
        flat = flat.cpu()
    numel = flat.numel()
    codes = native.fresh(code_bytes(numel, bits), torch.uint8)
    absmax = torch.empty(num_blocks(numel, block_size), dtype=torch.float32)
    nonfinite = native.quantize(flat, bits, block_size, residual, codes, absmax)
    if nonfinite is not None:
        return Quantized(codes, absmax, numel, bits, block_size, nonfinite)
    return _reference_quantize(flat, bits, block_size, residual, codes, absmax)


def check_quantize_arguments(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None) -> None:
    _check(bits, block_size)
    if not torch.is_floating_point(flat):
        raise TypeError(f"blockwise quantization needs a float tensor, got {flat.dtype}")
    if residual is not None and (residual.numel() != flat.numel() or residual.dtype != torch.float32
                                 or not residual.is_contiguous()):
        raise ValueError("residual must be contiguous float32 with the tensor's number of values")


def reference_quantize(tensor: torch.Tensor, bits: int = 8, block_size: int = 1024,
                       residual: torch.Tensor | None = None) -> Quantized:
    """`quantize` on the torch path alone, whatever else is available: what the fast paths are checked against."""
    _check(bits, block_size)
    flat = tensor.detach().reshape(-1).cpu()
    numel = flat.numel()
    codes = torch.empty(code_bytes(numel, bits), dtype=torch.uint8)
    absmax = torch.empty(num_blocks(numel, block_size), dtype=torch.float32)
    return _reference_quantize(flat, bits, block_size, residual, codes, absmax)


def _reference_quantize(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None,
                        codes: torch.Tensor, absmax: torch.Tensor) -> Quantized:
    numel = flat.numel()
    qmax = float(QMAX[bits])
    chunk = _chunk_values(block_size)
    scratch = torch.empty(min(chunk, numel), dtype=torch.float32)
    work = torch.empty(min(chunk, numel), dtype=torch.float32) if residual is not None or flat.dtype != torch.float32 \
        else None
    nonfinite = 0
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        x = flat[start:stop]
        if work is not None:  # the value to encode lives in `work`: cast input, plus residual
            x = work[: stop - start].copy_(x)
            if residual is not None:
                x.add_(residual[start:stop])
        nonfinite += _encode_chunk(x, qmax, block_size, bits, absmax, codes, start, scratch)
        if residual is not None:
            # what was dropped: x - decoded(codes); scratch still holds the rounded codes + magic
            residual[start:stop].copy_(x.nan_to_num_(0.0, 0.0, 0.0))
            _subtract_decoded(residual[start:stop], scratch[: stop - start], absmax, start, block_size, qmax)
    return Quantized(codes, absmax, numel, bits, block_size, nonfinite)


def _encode_chunk(x: torch.Tensor, qmax: float, block_size: int, bits: int, absmax: torch.Tensor,
                  codes: torch.Tensor, start: int, scratch: torch.Tensor) -> int:
    """Encode one chunk (starting at a block boundary); returns its count of non-finite values."""
    length = x.numel()
    full = length // block_size * block_size
    first_block = start // block_size
    spans = [(0, full, block_size)] if full else []
    if full < length:
        spans.append((full, length, length - full))  # the short last block
    nonfinite = 0
    for lo, hi, width in spans:
        rows = x[lo:hi].view(-1, width)
        block_lo = first_block + lo // block_size
        block_max = absmax[block_lo : block_lo + rows.shape[0]]
        low, high = rows.aminmax(dim=1)
        torch.maximum(low.neg_(), high, out=block_max)
        if not bool(torch.isfinite(block_max).all()):
            bad = ~torch.isfinite(rows)  # rare: a copy with NaN/Inf read as 0, the input is never written
            nonfinite += int(bad.sum())
            rows = rows.masked_fill(bad, 0.0)
            low, high = rows.aminmax(dim=1)
            torch.maximum(low.neg_(), high, out=block_max)
        block_max.abs_()  # an all-zero block's max came out as -0.0; the C path, and the wire, carry +0.0
        inverse = torch.where(block_max > 0, qmax / block_max, torch.zeros((), dtype=torch.float32))
        out = scratch[lo:hi].view(-1, width)
        torch.addcmul(_MAGIC_TENSOR, rows, inverse[:, None], out=out)
    rounded = scratch[:length].view(torch.int32)
    if bits == 8:
        codes[start : start + length].view(torch.int8).copy_(rounded)
    else:
        _pack_nibbles(rounded, codes, start)
    return nonfinite


def _pack_nibbles(rounded: torch.Tensor, codes: torch.Tensor, start: int) -> None:
    nibbles = rounded.to(torch.uint8).bitwise_and_(15)  # two's complement nibble of -7..7
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    out = codes[start // 2 : start // 2 + pairs.shape[0]]
    torch.bitwise_or(pairs[:, 0], pairs[:, 1].bitwise_left_shift(4), out=out)


def _subtract_decoded(target: torch.Tensor, scratch: torch.Tensor, absmax: torch.Tensor, start: int,
                      block_size: int, qmax: float) -> None:
    decoded = scratch.sub_(_MAGIC)  # the rounded code, as a float
    _scale_blocks(decoded, absmax, start, block_size, qmax)
    target.sub_(decoded)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, start: int, block_size: int, qmax: float) -> None:
    """values (codes as floats, starting at a block boundary) *= absmax / qmax of their block."""
    length = values.numel()
    full = length // block_size * block_size
    first_block = start // block_size
    if full:
        scale = absmax[first_block : first_block + full // block_size] / qmax
        values[:full].view(-1, block_size).mul_(scale[:, None])
    if full < length:
        values[full:].mul_(absmax[first_block + full // block_size] / qmax)


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The flat tensor the codes stand for, in `dtype` (or written into `out`)."""
    _check(q.bits, q.block_size)
    if q.codes.device.type != "cpu":
        from spotrain.kernels import accelerated

        result = accelerated.dequantize(q, dtype)
        if result is not None:
            return result
    numel = q.numel
    result = out if out is not None else native.fresh(numel, dtype)
    if native.dequantize(q.codes, q.absmax, numel, q.bits, q.block_size, result):
        return result
    return _reference_dequantize(q, result)


def reference_dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dequantize` on the torch path alone: what the fast paths are checked against."""
    _check(q.bits, q.block_size)
    return _reference_dequantize(q, torch.empty(q.numel, dtype=dtype))


def _reference_dequantize(q: Quantized, result: torch.Tensor) -> torch.Tensor:
    numel = q.numel
    target = result if result.dtype == torch.float32 else torch.empty(min(numel, _chunk_values(q.block_size)))
    qmax = float(QMAX[q.bits])
    chunk = _chunk_values(q.block_size)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        values = target[start:stop] if target is result else target[: stop - start]
        if q.bits == 8:
            values.copy_(q.codes[start:stop].view(torch.int8))
        else:
            values.copy_(_unpack_nibbles(q.codes, start, stop))
        _scale_blocks(values, q.absmax, start, q.block_size, qmax)
        if target is not result:
            result[start:stop].copy_(values)
    return result


def _unpack_nibbles(codes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    packed = codes[start // 2 : (stop + 1) // 2].view(torch.int8)
    low = packed.bitwise_left_shift(4).bitwise_right_shift_(4)  # arithmetic shift: sign-extends
    high = packed.bitwise_right_shift(4)
    return torch.stack([low, high], dim=1).view(-1)[: stop - start]
