"""Codecs by spec name, as hivemind CompressionBase objects, wrapped so every peer counts its bytes.

hivemind decodes a received tensor through a module-level table keyed by its 6-value
CompressionType enum (`serialization._BASE_COMPRESSION_TYPES`), and the peer that averages a
part encodes its reply through that same table. spotrain's blockwise codecs take over two
slots whose hivemind codecs need bitsandbytes, which spotrain does not ship: BLOCKWISE_8BIT
carries blockwise8 and QUANTILE_8BIT carries blockwise4, so a reply is encoded with the bit
width of the request. Their payloads are spotrain envelopes (`wire.py`): self-describing and
versioned, decoded only by a peer with the same codec table. `install_codecs()` puts them in
place identically at every agent start; the table's fingerprint is what agents compare at join.

Byte counting: the receive side by wrapping the table's entries, the send side by wrapping the
codec handed to hivemind.Optimizer; both keep the inner codec's type, so the bytes counted are
exactly hivemind's own.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import threading

import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    RoleAdaptiveCompression,
    TensorRole,
    Uniform8BitQuantization,
    serialization,
)
from hivemind.proto import runtime_pb2

from spotrain.kernels import accelerated, native, wire
from spotrain.kernels.table import (
    BLOCK_SIZES,
    RAW_BELOW,
    SLOTS,
    SPEC_CODECS,
    blockwise_bits_per_value,
    powersgd_rank,
    validate_codec_name,
)

logger = logging.getLogger("spotrain.kernels")


class TrafficCounter:
    """Byte counts in shared memory: hivemind's averagers run in forked child processes."""

    def __init__(self) -> None:
        self._sent = multiprocessing.Value(ctypes.c_longlong, 0)
        self._received = multiprocessing.Value(ctypes.c_longlong, 0)
        self._nonfinite = multiprocessing.Value(ctypes.c_longlong, 0)

    def add(self, sent: int = 0, received: int = 0) -> None:
        if sent:
            with self._sent.get_lock():
                self._sent.value += sent
        if received:
            with self._received.get_lock():
                self._received.value += received

    def add_nonfinite(self, count: int) -> None:
        with self._nonfinite.get_lock():
            self._nonfinite.value += count

    @property
    def sent(self) -> int:
        return self._sent.value

    @property
    def received(self) -> int:
        return self._received.value

    @property
    def nonfinite(self) -> int:
        """Non-finite values that compression refused to send (encoded as 0 instead)."""
        return self._nonfinite.value


traffic = TrafficCounter()


class BlockwiseCodec(CompressionBase):
    """blockwise8 / blockwise4 in a spotrain envelope, optionally with per-part error feedback.

    With error feedback each part of each tensor (hivemind's CompressionInfo key and part
    index) keeps the residual its last encoding dropped and adds it to its next value, so
    what is dropped is delayed, not lost. Which tensors of a training state may take it at
    all is `StateCodec`'s choice, not this codec's.
    """

    def __init__(self, bits: int, block_size: int | None = None, error_feedback: bool = False):
        self.bits = bits
        self.block_size = block_size or BLOCK_SIZES[bits]
        self.codec_id = wire.CODEC_IDS[f"blockwise{bits}"]
        self.compression_type = getattr(runtime_pb2.CompressionType, SLOTS[bits])
        self.error_feedback = error_feedback
        self._residuals: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False) -> runtime_pb2.Tensor:
        requires_grad = tensor.requires_grad
        raw = not tensor.is_floating_point() or tensor.numel() < RAW_BELOW
        tensor = tensor.detach().to(encoding_device(tensor.device, raw, accelerated.available()))
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if raw:
            buffer = wire.pack_raw(self._finite(tensor, info))
        else:
            residual = self._residual(info, tensor.numel(), tensor.device) if self.error_feedback else None
            buffer, nonfinite = wire.quantize_and_pack(tensor, self.bits, self.block_size, residual, self.codec_id)
            if nonfinite:
                self._report_nonfinite(nonfinite, info)
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype=dtype_name, requires_grad=requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        tensor = wire.unpack(serialized_tensor.buffer, serialized_tensor.dtype, tuple(serialized_tensor.size))
        return tensor.requires_grad_(serialized_tensor.requires_grad) if tensor.is_floating_point() else tensor

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        if not info.descriptor.dtype.is_floating_point:
            return 1.0
        return blockwise_bits_per_value(self.bits, self.block_size) / torch.finfo(info.descriptor.dtype).bits

    def _residual(self, info: CompressionInfo, numel: int, device: torch.device) -> torch.Tensor | None:
        if info.key is None:
            return None  # an anonymous tensor cannot be matched with its next value
        key = (info.key, info.part_index)
        with self._lock:
            residual = self._residuals.get(key)
            if residual is None or residual.numel() != numel:
                residual = self._residuals[key] = torch.zeros(numel, dtype=torch.float32, device=device)
            elif residual.device != device:  # the tensor moved: what was dropped moves with it
                residual = self._residuals[key] = residual.to(device)
        return residual

    def _finite(self, tensor: torch.Tensor, info: CompressionInfo) -> torch.Tensor:
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                self._report_nonfinite(bad, info)
                return tensor.nan_to_num(0.0, 0.0, 0.0)
        return tensor

    def _report_nonfinite(self, count: int, info: CompressionInfo) -> None:
        traffic.add_nonfinite(count)
        logger.warning("%d non-finite values in tensor %r part %d: sent as 0, never broadcast",
                       count, info.key, info.part_index)

    def __repr__(self) -> str:
        feedback = ", error_feedback=True" if self.error_feedback else ""
        return f"spotrain.BlockwiseCodec(bits={self.bits}, block_size={self.block_size}{feedback})"


def encoding_device(device: torch.device, raw: bool, triton: bool) -> torch.device:
    """Where a tensor is encoded: a CUDA tensor that is quantized stays on its GPU when the Triton
    path is there; everything else (raw payloads, no Triton, any other device) is copied to the
    CPU first, where the wire format's bytes are made."""
    if device.type == "cuda" and triton and not raw:
        return device
    return torch.device("cpu")


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


def _base_codec(name: str, error_feedback: bool, block_size: int | None) -> CompressionBase:
    if name == "none" or powersgd_rank(name) is not None:
        return NoCompression()  # PowerSGD's low-rank factors travel uncompressed
    if name == "float16":
        return Float16Compression()
    if name == "uniform8":
        return Uniform8BitQuantization()
    if name in ("blockwise8", "blockwise4"):
        return BlockwiseCodec(int(name[-1]), block_size, error_feedback)
    raise ValueError(f"unknown codec {name!r}; valid: {', '.join(SPEC_CODECS)}")


def get_codec(name: str, *, error_feedback: bool = False, block_size: int | None = None) -> CompressionBase:
    """The hivemind codec for a spec name, counting its traffic.

    `error_feedback` keeps per-part residuals (blockwise codecs; for gradients). For
    `powersgd:RANK` this is the codec of PowerSGD's factors; the averager itself comes from
    `spotrain.kernels.optimizer_options`.
    """
    validate_codec_name(name)
    return CountingCodec(_base_codec(name, error_feedback, block_size), traffic)


# The only tensors of a training state a lossy state codec may encode. Parameters take its error
# like a small step (and peers average it away); optimizer statistics cannot: a small model's
# Adam second moments sit mostly below float16's smallest subnormal (6e-8; 92% of tiny_gpt's
# after 8 steps) and below a block's absmax / 127, so a codec turns them into 0, and the
# receiver's next step divides the first moment by eps alone (updates 1e5 times too large).
LOSSY_STATE_ROLES = (TensorRole.PARAMETER,)


class StateCodec(RoleAdaptiveCompression):
    """The codec of a training state (state averaging, state downloads) for the spec's `state` name:
    that codec for parameters, exact bytes for optimizer statistics and anything else.

    Every message says its own compression type and a receiver decodes each by it, so peers need
    nothing more than hivemind's table; hivemind's partition sizes each part by this codec's
    per-role ratio. `download`: what a newcomer takes as it is is never coarser than 8 bits.
    """

    def __init__(self, name: str, *, download: bool = False):
        validate_codec_name(name)
        self.name = "blockwise8" if download and name == "blockwise4" else name
        lossy = get_codec(self.name)
        super().__init__(default=get_codec("none"), **{role.name.lower(): lossy for role in LOSSY_STATE_ROLES})

    def __repr__(self) -> str:
        return f"spotrain.StateCodec({self.name!r} for {', '.join(r.name.lower() for r in LOSSY_STATE_ROLES)})"


def install_codecs() -> None:
    """Put spotrain's codecs in hivemind's decode table and count received bytes.

    Idempotent; run identically at every agent start, before hivemind forks its averagers.
    """
    # build or load the fused CPU path now, not inside the first averaging round
    logger.info("blockwise codecs: %s path", "native" if native.available() else "torch reference")
    table = serialization._BASE_COMPRESSION_TYPES
    for bits, slot in SLOTS.items():
        current = table[slot]
        inner = current.inner if isinstance(current, CountingCodec) else current
        if not isinstance(inner, BlockwiseCodec):
            table[slot] = BlockwiseCodec(bits)
    for key, codec in list(table.items()):
        if not isinstance(codec, CountingCodec):
            table[key] = CountingCodec(codec, traffic)


def codec_table_fingerprint(gradients: str, state: str, activations: str | None = None) -> str:
    """What two peers must share to average together: wire format, codec table, chosen codecs.

    Chosen codecs matter too: hivemind cuts tensors into parts by each codec's compression
    ratio, so peers with different codecs would disagree on where parts begin. SWARM peers also
    exchange activations: their codec joins the fingerprint (data-parallel ones' stays as it was).
    """
    description = {"wire": wire.WIRE_VERSION, "ids": wire.CODEC_IDS, "slots": SLOTS, "blocks": BLOCK_SIZES,
                   "raw_below": RAW_BELOW, "gradients": gradients, "state": state,
                   # a peer that encodes optimizer statistics lossily would serve a newcomer a broken state
                   "lossy_state_roles": [role.name for role in LOSSY_STATE_ROLES]}
    chosen = f"{gradients}:{state}"
    if activations is not None:
        description["activations"] = activations
        chosen += f":{activations}"
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
    return f"w{wire.WIRE_VERSION}:{chosen}:{digest}"
