"""The optional GPU path: Triton kernels, loaded only where CUDA is present.

`quantize` / `dequantize` return None when the tensor cannot be handled here (no CUDA, no
Triton), and the CPU reference in `blockwise.py` is used instead. hivemind itself hands its
codecs CPU tensors; this path serves callers that compress on the GPU before copying out.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

import torch

from spotrain.kernels.format import Quantized


@lru_cache(maxsize=1)
def _triton_kernels() -> ModuleType | None:
    if not torch.cuda.is_available():
        return None
    try:
        from spotrain.kernels import triton_blockwise
    except ImportError:  # CUDA without Triton: the CPU reference will do
        return None
    return triton_blockwise


def available() -> bool:
    return _triton_kernels() is not None


def quantize(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None) -> Quantized | None:
    kernels = _triton_kernels()
    if kernels is None or flat.device.type != "cuda":
        return None
    return kernels.quantize(flat, bits, block_size, residual)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor | None:
    kernels = _triton_kernels()
    if kernels is None or q.codes.device.type != "cuda":
        return None
    return kernels.dequantize(q, dtype)
