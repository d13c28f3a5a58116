"""Compression codecs and their hivemind wiring."""

from spotrain.kernels.codecs import get_codec, install_byte_counters, traffic

__all__ = ["get_codec", "install_byte_counters", "traffic"]
