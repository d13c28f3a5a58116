"""Activations and their gradients between stages, compressed with the codec table (no network)."""

from __future__ import annotations

import pytest
import torch

from spotrain.examples import tiny_gpt_pipeline
from spotrain.kernels import (
    CodecMismatchError,
    activation_codec,
    codec_table_fingerprint,
    decode_activation,
    encode_activation,
    install_codecs,
    traffic,
)
from spotrain.kernels.table import ACTIVATION_CODECS, nominal_ratio

BATCH = 16


@pytest.fixture(scope="module")
def activations() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tiny_gpt's head output on a real batch, the gradient the middle stage sends back, the tokens."""
    install_codecs()
    task = tiny_gpt_pipeline.task
    head, middle, tail = (task.build_stage(stage) for stage in range(3))
    batch = next(task.batches(11, BATCH))
    tokens, targets = task.split_batch(batch)
    hidden = head(tokens).detach().requires_grad_(True)
    task.loss(tail(middle(hidden)), targets).backward()
    assert hidden.grad is not None
    return hidden.detach(), hidden.grad, tokens


def wire_bytes(tensor: torch.Tensor, codec: str) -> int:
    return encode_activation(tensor, activation_codec(codec)).ByteSize()


@pytest.mark.parametrize("which", [0, 1])
def test_blockwise8_sends_at_least_3_9_times_fewer_bytes_per_sample(activations, which):
    tensor = activations[which]  # the forward activation, then its gradient
    raw, packed = wire_bytes(tensor, "none"), wire_bytes(tensor, "blockwise8")
    assert raw >= tensor.numel() * 4
    print(f"bytes per sample: {raw / BATCH:.0f} raw, {packed / BATCH:.0f} blockwise8 ({raw / packed:.2f}x)")
    assert raw / packed >= 3.9
    assert raw / wire_bytes(tensor, "blockwise4") >= 7.5


@pytest.mark.parametrize("codec", ACTIVATION_CODECS)
def test_every_activation_codec_round_trips_within_its_precision(activations, codec):
    hidden = activations[0]
    decoded = decode_activation(encode_activation(hidden, activation_codec(codec)))
    assert decoded.shape == hidden.shape and decoded.dtype == hidden.dtype and not decoded.requires_grad
    error = (decoded - hidden).norm() / hidden.norm()
    assert error <= {"none": 0.0, "float16": 1e-3, "uniform8": 0.05, "blockwise8": 0.02, "blockwise4": 0.2}[codec]
    ratio = nominal_ratio(codec)
    assert ratio is not None and hidden.numel() * 4 / wire_bytes(hidden, codec) == pytest.approx(ratio, rel=0.02)


@pytest.mark.parametrize("codec", ["blockwise4", "float16"])
def test_token_ids_travel_exactly_whatever_the_codec(activations, codec):
    tokens = activations[2]
    decoded = decode_activation(encode_activation(tokens, activation_codec(codec)))
    assert decoded.dtype == torch.int64 and torch.equal(decoded, tokens)


def test_activation_bytes_are_counted_on_both_sides(activations):
    sent, received = traffic.sent, traffic.received
    message = encode_activation(activations[0], activation_codec("blockwise8"))
    decode_activation(message)
    assert traffic.sent - sent == message.ByteSize() == traffic.received - received


def test_a_foreign_payload_raises_instead_of_decoding(activations):
    message = encode_activation(activations[0], activation_codec("blockwise8"))
    message.buffer = b"XXXX" + message.buffer[4:]
    with pytest.raises(CodecMismatchError):
        decode_activation(message)


def test_low_rank_codecs_are_not_activation_codecs_and_the_choice_is_in_the_fingerprint():
    with pytest.raises(ValueError, match="unknown activation codec 'powersgd:4'"):
        activation_codec("powersgd:4")
    data_parallel = codec_table_fingerprint("blockwise8", "float16")
    assert data_parallel.startswith("w1:blockwise8:float16:")  # unchanged for data-parallel peers
    swarm = codec_table_fingerprint("blockwise8", "float16", "blockwise8")
    assert swarm.startswith("w1:blockwise8:float16:blockwise8:")
    assert len({data_parallel, swarm, codec_table_fingerprint("blockwise8", "float16", "blockwise4")}) == 3
