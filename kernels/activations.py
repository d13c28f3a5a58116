"""Activations and their gradients on the wire between SWARM stages, in the codec table's codecs.

Each stage's output travels to the next stage's peer and each input's gradient back, in
hivemind's `runtime_pb2.Tensor` with any codec of `ACTIVATION_CODECS`; decoding goes through
hivemind's codec table as gradients' does, so a peer decodes only what its own table knows
(`install_codecs()` first) and a foreign or corrupt payload raises instead of decoding. Both
sides count the bytes with the gradients' counter.

No error feedback: every activation is a new tensor, there is no next value of it to carry a
residual into. Integer tensors (token ids, targets) travel exactly whatever the codec.
"""

from __future__ import annotations

import torch
from hivemind.compression import CompressionBase, CompressionInfo, TensorRole, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from spotrain.kernels.codecs import get_codec
from spotrain.kernels.table import ACTIVATION_CODECS


def activation_codec(name: str) -> CompressionBase:
    if name not in ACTIVATION_CODECS:
        raise ValueError(f"unknown activation codec {name!r}; valid: {', '.join(ACTIVATION_CODECS)}")
    return get_codec(name)


def encode_activation(tensor: torch.Tensor, codec: CompressionBase) -> runtime_pb2.Tensor:
    """An activation or its gradient as a message; integer tensors exactly."""
    tensor = tensor.detach().cpu()
    chosen = codec if tensor.is_floating_point() else get_codec("none")
    return chosen.compress(tensor, CompressionInfo.from_tensor(tensor, role=TensorRole.ACTIVATION))


def decode_activation(message: runtime_pb2.Tensor) -> torch.Tensor:
    """The tensor a message stands for, detached: the receiver decides what needs a gradient."""
    return deserialize_torch_tensor(message).detach()
