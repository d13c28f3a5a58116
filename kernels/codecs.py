"""Codecs by spec name, wrapped so every peer counts the tensor bytes it sends and receives.

hivemind decodes a received tensor through a module-level table keyed by its compression
type, so the receive side is counted by wrapping that table's entries; the send side by
wrapping the codec handed to hivemind.Optimizer. Both wrappers keep the inner codec's type,
so the bytes on the wire are exactly hivemind's own.
"""

from __future__ import annotations

import ctypes
import multiprocessing

import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    serialization,
)
from hivemind.proto import runtime_pb2


class TrafficCounter:
    """Byte counts in shared memory: hivemind's averagers run in forked child processes."""

    def __init__(self) -> None:
        self._sent = multiprocessing.Value(ctypes.c_longlong, 0)
        self._received = multiprocessing.Value(ctypes.c_longlong, 0)

    def add(self, sent: int = 0, received: int = 0) -> None:
        if sent:
            with self._sent.get_lock():
                self._sent.value += sent
        if received:
            with self._received.get_lock():
                self._received.value += received

    @property
    def sent(self) -> int:
        return self._sent.value

    @property
    def received(self) -> int:
        return self._received.value


traffic = TrafficCounter()


class CountingCodec(CompressionBase):
    def __init__(self, inner: CompressionBase, counter: TrafficCounter):
        self.inner = inner
        self.counter = counter
        self.compression_type = inner.compression_type

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        message = self.inner.compress(tensor, info, allow_inplace)
        self.counter.add(sent=message.ByteSize())
        return message

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        self.counter.add(received=serialized_tensor.ByteSize())
        return self.inner.extract(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return self.inner.estimate_compression_ratio(info)

    def __repr__(self) -> str:
        return f"CountingCodec({self.inner!r})"


CODECS = {"none": NoCompression, "float16": Float16Compression}


def get_codec(name: str) -> CompressionBase:
    """The hivemind codec for a spec name, counting its traffic."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid: {', '.join(CODECS)}")
    return CountingCodec(CODECS[name](), traffic)


def install_byte_counters() -> None:
    """Count received bytes on this peer; idempotent, done identically at every agent start."""
    table = serialization._BASE_COMPRESSION_TYPES
    for key, codec in list(table.items()):
        if not isinstance(codec, CountingCodec):
            table[key] = CountingCodec(codec, traffic)
