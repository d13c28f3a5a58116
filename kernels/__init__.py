"""Compression kernels and their hivemind wiring."""

from spotrain.kernels.blockwise import Quantized, dequantize, quantize
from spotrain.kernels.codecs import (
    BlockwiseCodec,
    codec_table_fingerprint,
    get_codec,
    install_byte_counters,
    install_codecs,
    traffic,
    validate_codec_name,
)
from spotrain.kernels.swarm_options import nominal_ratio, optimizer_options
from spotrain.kernels.wire import CodecMismatchError, CorruptPayloadError

__all__ = [
    "BlockwiseCodec", "CodecMismatchError", "CorruptPayloadError", "Quantized", "codec_table_fingerprint",
    "dequantize", "get_codec", "install_byte_counters", "install_codecs", "nominal_ratio", "optimizer_options",
    "quantize", "traffic", "validate_codec_name",
]
