"""Compression kernels and their hivemind wiring.

Names are imported on first use, so `spotrain.kernels.table` (pure Python) can be read by the
control plane without importing torch kernels or hivemind.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Quantized": "format", "quantize": "blockwise", "dequantize": "blockwise",
    "BlockwiseCodec": "codecs", "StateCodec": "codecs", "codec_table_fingerprint": "codecs", "get_codec": "codecs",
    "install_codecs": "codecs", "traffic": "codecs",
    "optimizer_options": "optimizer_arguments", "SwarmOptimizer": "paced_progress",
    "nominal_ratio": "table", "validate_codec_name": "table",
    "CodecMismatchError": "wire", "CorruptPayloadError": "wire",
    "activation_codec": "activations", "decode_activation": "activations", "encode_activation": "activations",
}
__all__ = [
    "BlockwiseCodec", "CodecMismatchError", "CorruptPayloadError", "Quantized", "StateCodec", "SwarmOptimizer",
    "activation_codec", "codec_table_fingerprint", "decode_activation", "dequantize", "encode_activation", "get_codec",
    "install_codecs", "nominal_ratio", "optimizer_options", "quantize", "traffic", "validate_codec_name",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'spotrain.kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(f"spotrain.kernels.{_EXPORTS[name]}"), name)
