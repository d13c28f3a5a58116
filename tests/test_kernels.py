"""Blockwise quantization kernels, their wire envelope and their hivemind codecs (no network)."""

import logging
import shutil
import struct

import pytest
import torch
from hivemind.compression import CompressionInfo, TensorRole, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.compression.serialization import _BASE_COMPRESSION_TYPES
from hivemind.proto import runtime_pb2

from spotrain.config import GRADIENT_CODECS
from spotrain.kernels import (
    BlockwiseCodec,
    CodecMismatchError,
    CorruptPayloadError,
    accelerated,
    codec_table_fingerprint,
    dequantize,
    get_codec,
    install_codecs,
    native,
    nominal_ratio,
    optimizer_options,
    quantize,
    traffic,
    wire,
)
from spotrain.kernels.blockwise import reference_dequantize, reference_quantize
from spotrain.kernels.codecs import CountingCodec
from spotrain.kernels.guards import gradients_finite
from spotrain.kernels.table import SPEC_CODECS

QMAX = {8: 127, 4: 7}


def per_value_bound(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Half a quantization step of each value's block: the most rounding may move it."""
    flat = x.float().reshape(-1)
    blocks = -(-flat.numel() // block)
    padded = torch.nn.functional.pad(flat.nan_to_num(0.0, 0.0, 0.0), (0, blocks * block - flat.numel()))
    step = padded.view(blocks, block).abs().amax(1) / QMAX[bits]
    return (step / 2).repeat_interleave(block)[: flat.numel()]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2, 64, 1000, 4096])
@pytest.mark.parametrize("numel", [1, 7, 999, 1000, 4097, 300_001])
@pytest.mark.parametrize("path", ["dispatch", "reference"])
def test_roundtrip_is_within_half_a_step_of_every_block(bits, block, numel, path):
    encode, decode = (quantize, dequantize) if path == "dispatch" else (reference_quantize, reference_dequantize)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel + block)) * 3
    q = encode(x, bits, block)
    assert q.codes.numel() == (numel if bits == 8 else (numel + 1) // 2)  # nothing padded
    assert q.absmax.numel() == -(-numel // block)
    y = decode(q)
    assert y.shape == x.shape
    assert ((y - x).abs() <= per_value_bound(x, bits, block) * (1 + 1e-4) + 1e-12).all()


def test_block_maxima_and_zero_blocks_are_exact():
    x = torch.zeros(3 * 64)
    x[64:128] = torch.linspace(-5, 5, 64)
    y = dequantize(quantize(x, 8, 64))
    assert torch.equal(y[:64], torch.zeros(64)) and torch.equal(y[128:], torch.zeros(64))
    assert y[64].item() == pytest.approx(-5.0, rel=1e-6) and y[127].item() == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_precision_inputs_round_trip_in_their_dtype(dtype, bits):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = dequantize(quantize(x, bits, 128), dtype=dtype)
    assert y.dtype == dtype
    # the bound of the fp32 values, plus the half-precision rounding of the decoded value
    slack = x.float().abs() * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    assert ((y.float() - x.float()).abs() <= per_value_bound(x, bits, 128) * 1.001 + slack + 1e-6).all()


def test_the_caller_tensor_is_never_written():
    x = torch.randn(10_000)
    x[17] = float("nan")
    before = x.clone()
    quantize(x, 4, 256, residual=torch.zeros(10_000))
    assert torch.equal(x.nan_to_num(7.0), before.nan_to_num(7.0))


def test_nonfinite_values_are_counted_and_sent_as_zero():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    x[5], x[2000], x[2001] = float("nan"), float("inf"), float("-inf")
    residual = torch.zeros(3000)
    q = quantize(x, 8, 1024, residual=residual)
    assert q.nonfinite == 3
    y = dequantize(q)
    assert torch.isfinite(y).all() and torch.isfinite(residual).all() and torch.isfinite(q.absmax).all()
    assert y[5] == 0 and y[2000] == 0
    finite = torch.isfinite(x)
    assert ((y - x)[finite].abs() <= per_value_bound(x, 8, 1024)[finite] * 1.0001).all()


def test_error_feedback_residual_is_exactly_what_was_dropped():
    x, residual = torch.randn(5000), torch.randn(5000) * 0.01
    target = x + residual
    q = quantize(x, 4, 256, residual=residual)
    assert torch.allclose(residual, target - dequantize(q), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_error_feedback_keeps_accumulated_error_bounded(bits):
    """Summed over many steps, error feedback's error stays one step's worth; without it, it grows."""
    generator = torch.Generator().manual_seed(11)
    bias = torch.randn(20_000, generator=generator) * 0.3  # a consistent gradient direction
    truth, plain, fed = torch.zeros(20_000), torch.zeros(20_000), torch.zeros(20_000)
    residual = torch.zeros(20_000)
    for _ in range(64):
        g = bias + torch.randn(20_000, generator=generator)
        truth += g
        plain += dequantize(quantize(g, bits, 256))
        fed += dequantize(quantize(g, bits, 256, residual=residual))
    plain_error, fed_error = (plain - truth).norm(), (fed - truth).norm()
    assert fed_error < 0.25 * plain_error
    assert torch.allclose(fed + residual, truth, atol=1e-3)  # nothing is lost, only delayed


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(10), 3)
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.randn(10), 8, 3)
    with pytest.raises(TypeError, match="float"):
        quantize(torch.arange(10), 8)
    with pytest.raises(ValueError, match="residual"):
        quantize(torch.randn(10), 8, 4, residual=torch.zeros(9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path needs a CUDA device; none here")
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_path_matches_the_cpu_reference(bits):
    assert accelerated.available(), "CUDA is present, so the Triton path must load"
    x = torch.randn(1_000_003, generator=torch.Generator().manual_seed(2))
    x[10] = float("nan")
    cpu, gpu = reference_quantize(x, bits, 256), quantize(x.cuda(), bits, 256)
    assert gpu.codes.is_cuda and gpu.nonfinite == cpu.nonfinite == 1
    assert torch.allclose(gpu.absmax.cpu(), cpu.absmax)
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 1e-3  # ties may round apart
    assert torch.allclose(dequantize(gpu).cpu(), reference_dequantize(cpu), atol=float(cpu.absmax.max()) / QMAX[bits])
    residual_cpu, residual_gpu = torch.zeros(x.numel()), torch.zeros(x.numel(), device="cuda")
    reference_quantize(x, bits, 256, residual=residual_cpu)
    quantize(x.cuda(), bits, 256, residual=residual_gpu)
    assert torch.allclose(residual_gpu.cpu(), residual_cpu, atol=float(cpu.absmax.max()) / QMAX[bits])


# -- the fused C path (native_blockwise.c) ----------------------------------------------

compiler_present = any(map(shutil.which, ("cc", "gcc")))


@pytest.mark.skipif(not compiler_present, reason="no C compiler: the torch reference serves alone")
def test_the_native_path_builds_where_a_compiler_exists():
    assert native.available()


@pytest.mark.skipif(not compiler_present, reason="no C compiler: the torch reference serves alone")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block", [2, 64, 1024])
@pytest.mark.parametrize("numel", [1, 7, 1023, 300_001, 1_000_003])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_native_path_matches_the_reference_bit_for_bit(bits, block, numel, threads):
    """Same codes, scales, residuals and non-finite count, so peers on either path agree exactly."""
    generator = torch.Generator().manual_seed(numel + block)
    x = torch.randn(numel, generator=generator) * 3
    x[torch.randint(numel, (3,), generator=generator)] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    residual = torch.randn(numel, generator=generator) * 0.1
    residual_reference = residual.clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the native path splits its blocks over torch's thread count
    try:
        fast = quantize(x, bits, block, residual=residual)
        plain = quantize(x, bits, block)
        decoded = dequantize(fast)
    finally:
        torch.set_num_threads(previous)
    slow = reference_quantize(x, bits, block, residual=residual_reference)
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(fast.absmax.view(torch.int32), slow.absmax.view(torch.int32))  # bits: a zero block is +0.0
    assert fast.nonfinite == slow.nonfinite == int((~torch.isfinite(x)).sum())
    assert torch.equal(residual, residual_reference)
    assert torch.equal(decoded, reference_dequantize(slow))
    assert torch.equal(plain.codes, reference_quantize(x, bits, block).codes)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("numel", [1, 1023, 300_001, 9_000_001])  # the last payload is big enough for huge pages
@pytest.mark.parametrize("feedback", [False, True])
def test_a_payload_written_in_place_equals_the_joined_reference(bits, numel, feedback):
    """The fused path writes codes straight into the message's bytes; a peer sees exactly the reference's bytes."""
    generator = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=generator)
    x[numel // 2] = float("nan")
    residual = torch.randn(numel, generator=generator) * 0.1 if feedback else None
    residual_reference = None if residual is None else residual.clone()
    payload, nonfinite = wire.quantize_and_pack(x, bits, 256, residual, wire.CODEC_IDS[f"blockwise{bits}"])
    slow = reference_quantize(x, bits, 256, residual=residual_reference)
    expected = wire.pack_quantized(slow, wire.CODEC_IDS[f"blockwise{bits}"])
    assert type(payload) is bytes and payload == expected and hash(payload) == hash(expected)
    assert nonfinite == slow.nonfinite == 1
    assert residual is None or torch.equal(residual, residual_reference)
    assert torch.equal(wire.unpack(payload, "float32", (numel,)), reference_dequantize(slow))


def test_without_the_native_path_the_reference_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    expected = reference_quantize(x, 8, 256)
    for setting in ({"SPOTRAIN_NATIVE_KERNELS": "0"}, {"CC": "false"}):  # switched off; a compiler that fails
        for name, value in setting.items():
            monkeypatch.setenv(name, value)
        native.load.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="spotrain.kernels"):
                assert not native.available()
                q = quantize(x, 8, 256)
                payload, _ = wire.quantize_and_pack(x, 8, 256, None, wire.CODEC_IDS["blockwise8"])
            assert torch.equal(q.codes, expected.codes)
            assert payload == wire.pack_quantized(expected, wire.CODEC_IDS["blockwise8"])
            assert torch.equal(dequantize(q), reference_dequantize(expected))
        finally:
            for name in setting:
                monkeypatch.delenv(name)
            native.load.cache_clear()
    assert "building native_blockwise.c failed" in caplog.text
    assert not list(tmp_path.rglob("*.partial"))  # a failed build leaves nothing half-written behind


@pytest.mark.skipif(not compiler_present, reason="no C compiler: the torch reference serves alone")
def test_the_native_build_is_cached_per_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.load.cache_clear()
    try:
        assert native.available()
        built = list((tmp_path / "spotrain" / "kernels").glob("native_blockwise-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native.load.cache_clear()
        assert native.available()
        assert built[0].stat().st_mtime_ns == stamp  # loaded again, not rebuilt
    finally:
        native.load.cache_clear()


# -- the hivemind codecs -----------------------------------------------------------------

def message(codec, tensor, key=0, role=TensorRole.UNSPECIFIED, part=0):
    return codec.compress(tensor, CompressionInfo.from_tensor(tensor, key=key, role=role).get_part(part, None))


def test_spec_names_agree_with_the_config():
    assert SPEC_CODECS == GRADIENT_CODECS


@pytest.mark.parametrize("name", ["none", "float16", "uniform8", "blockwise8", "blockwise4", "powersgd:4"])
def test_every_spec_codec_round_trips_through_hivemind_decoding(name):
    install_codecs()
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    y = deserialize_torch_tensor(message(get_codec(name), x))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert (y - x).norm() / x.norm() < {"blockwise4": 0.2, "uniform8": 0.05}.get(name, 0.02)


def test_unknown_codec_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown codec 'zip'; valid: none, float16, uniform8, blockwise8"):
        get_codec("zip")
    with pytest.raises(ValueError, match="positive integer rank"):
        get_codec("powersgd:x")


def test_install_is_idempotent_and_takes_two_bitsandbytes_slots():
    install_codecs()
    before = dict(_BASE_COMPRESSION_TYPES)
    install_codecs()
    assert _BASE_COMPRESSION_TYPES == before
    assert all(isinstance(codec, CountingCodec) for codec in _BASE_COMPRESSION_TYPES.values())
    assert isinstance(_BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"].inner, BlockwiseCodec)
    assert _BASE_COMPRESSION_TYPES["QUANTILE_8BIT"].inner.bits == 4
    assert _BASE_COMPRESSION_TYPES["UNIFORM_8BIT"].inner.__class__.__name__ == "Uniform8BitQuantization"


def test_a_reply_encoded_through_the_table_keeps_the_request_bit_width():
    """An averaging peer encodes its reply with serialize_torch_tensor(delta, request's type)."""
    install_codecs()
    x = torch.randn(10_000)
    for name, slot in (("blockwise8", runtime_pb2.BLOCKWISE_8BIT), ("blockwise4", runtime_pb2.QUANTILE_8BIT)):
        request = message(get_codec(name), x)
        reply = serialize_torch_tensor(x, request.compression)
        assert request.compression == slot and len(reply.buffer) == len(request.buffer)


def test_bytes_are_counted_on_both_sides():
    install_codecs()
    x = torch.randn(4096)
    sent, received = traffic.sent, traffic.received
    msg = message(get_codec("blockwise8"), x)
    deserialize_torch_tensor(msg)
    assert traffic.sent - sent == msg.ByteSize() == traffic.received - received
    assert msg.ByteSize() < x.numel() * 4 / 3.9  # 8 bits a value plus one fp32 scale per block


def test_compression_ratio_estimate_matches_the_bytes():
    x = torch.randn(1 << 20)
    for name in ("blockwise8", "blockwise4"):
        codec = get_codec(name)
        info = CompressionInfo.from_tensor(x)
        assert len(message(codec, x).buffer) / (x.numel() * 4) == pytest.approx(
            codec.estimate_compression_ratio(info), rel=1e-3)
        assert nominal_ratio(name) == pytest.approx(1 / codec.estimate_compression_ratio(info))
    assert nominal_ratio("float16") == 2.0 and nominal_ratio("powersgd:2") is None


def test_small_and_integer_tensors_travel_exactly():
    install_codecs()
    codec = get_codec("blockwise4")
    step, counts = torch.tensor(1234.0), torch.arange(50)
    assert deserialize_torch_tensor(message(codec, step)).item() == 1234.0
    assert torch.equal(deserialize_torch_tensor(message(codec, counts)), counts)
    # optimizer statistics are the state codec's to keep exact (tests/test_state_codec.py)


def test_codec_error_feedback_is_kept_per_tensor_part():
    codec = get_codec("blockwise4", error_feedback=True).inner
    x = torch.randn(2000, generator=torch.Generator().manual_seed(4))
    total_sent = torch.zeros(2000)
    for _ in range(8):
        total_sent += wire.unpack(message(codec, x, key="w", part=1).buffer, "float32", (2000,))
        message(codec, -x, key="w", part=2)  # another part: its own residual
    assert torch.allclose(total_sent + codec._residuals[("w", 1)], 8 * x, atol=1e-4)
    assert not get_codec("blockwise4").inner.error_feedback


def test_codec_never_broadcasts_nan(caplog):
    install_codecs()
    x = torch.randn(5000)
    x[::97] = float("nan")
    tiny = torch.tensor([1.0, float("inf")])
    before = traffic.nonfinite
    with caplog.at_level(logging.WARNING, logger="spotrain.kernels"):
        decoded = deserialize_torch_tensor(message(get_codec("blockwise8", error_feedback=True), x))
        decoded_tiny = deserialize_torch_tensor(message(get_codec("blockwise8"), tiny))
    assert torch.isfinite(decoded).all() and torch.isfinite(decoded_tiny).all()
    assert traffic.nonfinite - before == 52 + 1
    assert "non-finite values" in caplog.text


def test_foreign_or_corrupt_payloads_raise_instead_of_decoding():
    install_codecs()
    x = torch.randn(3000)
    good = message(get_codec("blockwise8"), x)

    def tampered(**fields):
        magic, version, codec_id, bits, block, numel = wire.HEADER.unpack_from(good.buffer)
        values = {"magic": magic, "version": version, "codec_id": codec_id, "bits": bits, "block": block,
                  "numel": numel}
        values.update(fields)
        header = wire.HEADER.pack(*values.values())
        copy = runtime_pb2.Tensor()
        copy.CopyFrom(good)
        copy.buffer = header + good.buffer[wire.HEADER.size:]
        return copy

    foreign = _BASE_COMPRESSION_TYPES["UNIFORM_8BIT"].inner.compress(x, CompressionInfo.from_tensor(x))
    foreign.compression = runtime_pb2.BLOCKWISE_8BIT  # e.g. bitsandbytes' codec of a plain hivemind peer
    cases = [(foreign, CodecMismatchError), (tampered(magic=b"XXXX"), CodecMismatchError),
             (tampered(version=wire.WIRE_VERSION + 1), CodecMismatchError),
             (tampered(codec_id=9), CodecMismatchError), (tampered(bits=4), CorruptPayloadError),
             (tampered(numel=2999), CorruptPayloadError)]
    truncated = runtime_pb2.Tensor()
    truncated.CopyFrom(good)
    truncated.buffer = good.buffer[:-1]
    nan_scale = runtime_pb2.Tensor()
    nan_scale.CopyFrom(good)
    nan_scale.buffer = good.buffer[: wire.HEADER.size] + struct.pack("<f", float("nan")) + good.buffer[
        wire.HEADER.size + 4:]
    cases += [(truncated, CorruptPayloadError), (nan_scale, CorruptPayloadError)]
    for payload, error in cases:
        with pytest.raises(error):
            deserialize_torch_tensor(payload)


def test_fingerprint_covers_the_wire_version_and_the_chosen_codecs(monkeypatch):
    base = codec_table_fingerprint("blockwise8", "float16")
    assert base == codec_table_fingerprint("blockwise8", "float16")
    assert base != codec_table_fingerprint("blockwise4", "float16")
    assert base != codec_table_fingerprint("blockwise8", "none")
    monkeypatch.setattr(wire, "WIRE_VERSION", wire.WIRE_VERSION + 1)
    assert base != codec_table_fingerprint("blockwise8", "float16")


def test_optimizer_options_give_gradients_error_feedback_and_powersgd_its_averager():
    options = optimizer_options("blockwise4", "blockwise8")
    assert options["grad_compression"].inner.error_feedback
    parameters = options["state_averaging_compression"].choose_compression(
        CompressionInfo.from_tensor(torch.zeros(4), role=TensorRole.PARAMETER))
    assert not parameters.inner.error_feedback
    assert options["grad_averager_factory"].func.__name__ == "StatelessGradientAverager"
    assert options["average_state_every"] == 4
    assert optimizer_options("none", "blockwise4")["load_state_compression"].name == "blockwise8"
    powersgd = optimizer_options("powersgd:3", "float16")
    assert powersgd["grad_averager_factory"].keywords == {"averager_rank": 3}
    assert powersgd["grad_averager_factory"].func.__name__ == "PowerSGDGradientAverager"
    grouped = optimizer_options("powersgd:3", "float16", group_size=5)
    assert grouped["averager_opts"] == {"target_group_size": 5}
    assert grouped["grad_averager_factory"].keywords == {"averager_rank": 3, "target_group_size": 5}
    assert grouped["grad_averager_factory"].func.__name__ == "PowerSGDGradientAverager"
    grouped_plain = optimizer_options("none", "none", group_size=2)["grad_averager_factory"]
    assert grouped_plain.func.__name__ == "StatelessGradientAverager"
    assert grouped_plain.keywords == {"target_group_size": 2}


def test_delayed_updates_average_and_step_in_the_background_only_when_asked():
    delayed = optimizer_options("blockwise8", "blockwise8", delayed_updates=True)
    assert delayed["delay_grad_averaging"] and delayed["delay_optimizer_step"]
    foreground = optimizer_options("blockwise8", "blockwise8")
    assert not foreground["delay_grad_averaging"] and not foreground["delay_optimizer_step"]


def test_gradients_finite_sees_nan_and_inf():
    layer = torch.nn.Linear(4, 4)
    assert gradients_finite(layer.parameters())  # no gradients yet
    layer(torch.randn(2, 4)).sum().backward()
    assert gradients_finite(layer.parameters())
    layer.bias.grad[1] = float("inf")
    assert not gradients_finite(layer.parameters())
    layer.bias.grad[1] = float("nan")
    assert not gradients_finite(layer.parameters())
