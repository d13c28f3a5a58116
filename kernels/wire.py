"""spotrain's tensor payloads: a versioned, self-describing envelope inside hivemind's Tensor.buffer.

Every payload starts with a 20-byte header (magic, wire version, codec id, bits, block size,
number of values), so a peer decodes it only when it knows exactly that codec: an unknown
magic, version or codec id raises CodecMismatchError, a payload whose sizes or scales do not
add up raises CorruptPayloadError. Neither ever yields a tensor, so garbage is never decoded.

    header | absmax: float32 x blocks | codes        (blockwise8, blockwise4)
    header | the tensor's raw bytes                  (raw: non-float, tiny or optimizer tensors)
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from spotrain.kernels import native
from spotrain.kernels.blockwise import check_quantize_arguments, dequantize, quantize
from spotrain.kernels.format import Quantized, code_bytes, num_blocks

MAGIC = b"SPTC"
WIRE_VERSION = 1
HEADER = struct.Struct("<4sBBBxIQ")  # magic, version, codec id, bits, pad, block size, values
CODEC_IDS = {"raw": 0, "blockwise8": 1, "blockwise4": 2}
CODEC_BITS = {1: 8, 2: 4}
_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")}


class CodecMismatchError(ValueError):
    """A payload from a peer whose codec table differs from ours."""


class CorruptPayloadError(ValueError):
    """A payload with our codec table whose contents are inconsistent."""


def quantize_and_pack(tensor: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None,
                      codec_id: int) -> tuple[bytes, int]:
    """A float tensor's quantized payload (see `blockwise.quantize` for `residual`) and its count
    of non-finite inputs, which were encoded as 0.

    The fused C path writes the payload in place, so the codes are never copied; elsewhere the
    codes are made first and then joined with the header.
    """
    flat = tensor.detach().reshape(-1)
    check_quantize_arguments(flat, bits, block_size, residual)
    numel = flat.numel()
    header = HEADER.pack(MAGIC, WIRE_VERSION, codec_id, bits, block_size, numel)
    packed = native.quantize_to_bytes(flat, bits, block_size, residual, header, num_blocks(numel, block_size),
                                      code_bytes(numel, bits))
    if packed is not None:
        return packed
    q = quantize(flat, bits, block_size, residual)
    return pack_quantized(q, codec_id), q.nonfinite


def pack_quantized(q: Quantized, codec_id: int) -> bytes:
    header = HEADER.pack(MAGIC, WIRE_VERSION, codec_id, q.bits, q.block_size, q.numel)
    # the Triton path leaves the codes on the GPU: the wire takes host bytes
    return b"".join((header, q.absmax.cpu().numpy().data, q.codes.cpu().numpy().data))


def pack_raw(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1).contiguous()
    header = HEADER.pack(MAGIC, WIRE_VERSION, CODEC_IDS["raw"], 0, 0, flat.numel())
    return b"".join((header, flat.view(torch.uint8).numpy().data))


def unpack(buffer: bytes, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor a payload stands for; raises instead of guessing."""
    if len(buffer) < HEADER.size:
        raise CodecMismatchError(f"payload of {len(buffer)} bytes is no spotrain envelope")
    magic, version, codec_id, bits, block_size, numel = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise CodecMismatchError("payload is not a spotrain envelope: the sending peer runs another codec table")
    if version != WIRE_VERSION:
        raise CodecMismatchError(f"payload has wire version {version}, this peer speaks {WIRE_VERSION}")
    if codec_id not in CODEC_IDS.values():
        raise CodecMismatchError(f"payload has unknown codec id {codec_id} (known: {sorted(CODEC_IDS.values())})")
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise CorruptPayloadError(f"payload has unsupported dtype {dtype_name!r}")
    if any(size < 0 for size in shape):  # two -1s multiply to a count that matches, then reshape fails
        raise CorruptPayloadError(f"payload shape {tuple(shape)} has a negative size")
    if numel != math.prod(shape):
        raise CorruptPayloadError(f"payload holds {numel} values, its shape {tuple(shape)} needs {math.prod(shape)}")
    body = memoryview(buffer)[HEADER.size :]
    if codec_id == CODEC_IDS["raw"]:
        return _unpack_raw(body, dtype, numel).reshape(shape)
    if bits != CODEC_BITS[codec_id] or block_size < 2 or block_size % 2:
        raise CorruptPayloadError(f"payload of codec {codec_id} has bits={bits}, block size {block_size}")
    if not dtype.is_floating_point:
        raise CorruptPayloadError(f"quantized payload claims a {dtype_name} tensor")
    blocks = num_blocks(numel, block_size)
    expected = 4 * blocks + code_bytes(numel, bits)
    if len(body) != expected:
        raise CorruptPayloadError(f"payload body is {len(body)} bytes, {expected} expected")
    absmax = torch.from_numpy(np.frombuffer(body, dtype=np.float32, count=blocks))
    if blocks and not (bool(torch.isfinite(absmax).all()) and float(absmax.min()) >= 0):
        raise CorruptPayloadError("payload has a non-finite or negative block scale")
    codes = torch.from_numpy(np.frombuffer(body, dtype=np.uint8, offset=4 * blocks))
    quantized = Quantized(codes, absmax, numel, bits, block_size, 0)
    return dequantize(quantized, dtype=dtype).reshape(shape)


def _unpack_raw(body: memoryview, dtype: torch.dtype, numel: int) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(body) != numel * itemsize:
        raise CorruptPayloadError(f"raw payload is {len(body)} bytes, {numel * itemsize} expected")
    if numel == 0:  # numpy's empty array comes with stride 0, which torch's view refuses
        return torch.empty(0, dtype=dtype)
    data = torch.from_numpy(np.frombuffer(body, dtype=np.uint8).copy())
    return data.view(dtype)
