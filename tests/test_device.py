"""The agent's device: chosen from the machine (or SPOTRAIN_DEVICE), batches moved there, autocast
only where the task asks and a GPU is there; codecs encode a device tensor where it can be encoded.
On CPU machines this is all that runs; benchmarks/gpu_check.py checks the CUDA path on a GPU."""

from collections import namedtuple

import pytest
import torch
from hivemind.compression import CompressionInfo

from spotrain.agents.device import DEVICE_ENV, autocast, choose_device, task_precision, to_device
from spotrain.contracts.task import SimpleTask
from spotrain.kernels import get_codec
from spotrain.kernels.codecs import BlockwiseCodec, encoding_device

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_gpu_is_chosen_when_there_is_one_unless_cpu_is_forced(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert choose_device(cuda_available=lambda: True) == CUDA
    assert choose_device(cuda_available=lambda: False) == CPU
    assert choose_device("cpu", cuda_available=lambda: True) == CPU
    assert choose_device("cuda:1", cuda_available=lambda: True) == torch.device("cuda", 1)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert choose_device(cuda_available=lambda: True) == CPU
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert choose_device(cuda_available=lambda: True) == CUDA


@pytest.mark.parametrize(("name", "problem"), [("cuda", "has no CUDA device"), ("gpu0", "is not a device"),
                                               ("meta", "trains on cpu or cuda")])
def test_a_device_that_cannot_train_is_one_line_naming_it(name, problem):
    with pytest.raises(ValueError, match=problem) as raised:
        choose_device(name, cuda_available=lambda: False)
    assert f"{DEVICE_ENV}={name!r}" in str(raised.value)


Pair = namedtuple("Pair", "inputs targets")


def test_every_tensor_of_a_batch_moves_nested_or_not():
    batch = {"x": torch.ones(2, 3), "parts": [torch.zeros(1), (torch.arange(3), "label")],
             "pair": Pair(torch.ones(1), torch.zeros(1)), "n": 4}
    moved = to_device(batch, torch.device("meta"))  # a device of its own that every torch has
    assert moved["x"].device.type == "meta" and moved["x"].shape == (2, 3)
    assert moved["parts"][0].device.type == "meta" and moved["parts"][1][0].device.type == "meta"
    assert moved["parts"][1][1] == "label" and moved["n"] == 4
    assert isinstance(moved["pair"], Pair) and moved["pair"].targets.device.type == "meta"
    assert batch["x"].device == CPU  # the caller's batch is left as it was


def test_mixed_precision_is_opt_in_checked_and_only_on_cuda():
    plain = SimpleTask(lambda: torch.nn.Linear(1, 1), lambda s, b: iter(()), lambda m, b: m(b).sum(),
                       lambda p: torch.optim.SGD(p, lr=0.1))
    assert task_precision(plain) is None
    from dataclasses import replace

    assert task_precision(replace(plain, mixed_precision="bfloat16")) == "bfloat16"
    with pytest.raises(ValueError, match="mixed_precision 'float8'"):
        task_precision(replace(plain, mixed_precision="float8"))
    with autocast(CPU, "bfloat16"):  # on the CPU nothing changes
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32
    with pytest.warns(UserWarning):  # no GPU here: torch says it disables what we asked for
        assert isinstance(autocast(CUDA, "bfloat16"), torch.autocast)


def test_codecs_encode_on_the_gpu_only_when_triton_serves_and_the_payload_is_quantized():
    assert encoding_device(CUDA, raw=False, triton=True) == CUDA
    assert encoding_device(CUDA, raw=False, triton=False) == CPU
    assert encoding_device(CUDA, raw=True, triton=True) == CPU  # raw bytes are copied from the host
    assert encoding_device(CPU, raw=False, triton=True) == CPU
    assert encoding_device(torch.device("meta"), raw=False, triton=True) == CPU


def test_error_feedback_follows_a_tensor_that_moves():
    codec = BlockwiseCodec(8, error_feedback=True)
    info = CompressionInfo.from_tensor(torch.zeros(4096), key="w")
    residual = codec._residual(info, 4096, CPU)
    residual.fill_(0.25)
    moved = codec._residual(info, 4096, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (4096,)
    assert codec._residual(info, 4096, torch.device("meta")) is moved


def test_a_cpu_tensor_encodes_and_decodes_as_before():
    codec = get_codec("blockwise8")
    tensor = torch.randn(8192, generator=torch.Generator().manual_seed(0))
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor, key="g"))
    decoded = codec.extract(message)
    assert decoded.device == CPU and decoded.shape == tensor.shape
    assert (decoded - tensor).abs().max() <= tensor.abs().max() / 127 + 1e-6
