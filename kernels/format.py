"""The blockwise absmax format: what a quantized tensor is, whichever path (torch, C, Triton) made it.

A flat tensor is cut into blocks of `block_size` values; each block is stored as its absolute
maximum (fp32) and one signed code per value, round(x / absmax * qmax) with qmax 127 (8 bits,
one int8 per value) or 7 (4 bits, two values per byte, low nibble first). The last block may be
short: nothing is padded, so a 192-value bias costs 192 bytes, not a whole block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4)
QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class Quantized:
    """Codes and per-block absmax of one flat tensor."""

    codes: torch.Tensor  # uint8: numel bytes (8 bits) or ceil(numel / 2) bytes (4 bits)
    absmax: torch.Tensor  # float32, one per block
    numel: int
    bits: int
    block_size: int
    nonfinite: int  # non-finite inputs that were encoded as 0


def code_bytes(numel: int, bits: int) -> int:
    return numel if bits == 8 else (numel + 1) // 2


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)
