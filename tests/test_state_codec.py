"""A training state keeps its optimizer statistics exactly whatever the spec's state codec.

The bug (examples/local-geo.yaml with `state: float16` went from loss 5.17 to 2476): the state
codec encoded Adam's statistics, whose second moments sit mostly below float16's smallest
subnormal, so a replacement downloaded zeros and its next step divided by eps alone.
`benchmarks/replacements.py` shows the divergence and its absence at the swarm's scale.
"""

from __future__ import annotations

import contextlib

import hivemind
import pytest
import torch
from conftest import wait_for
from hivemind.compression import CompressionInfo, TensorRole, deserialize_torch_tensor

from spotrain.examples import tiny_gpt
from spotrain.kernels import StateCodec, SwarmOptimizer, get_codec, install_codecs, optimizer_options

STATE_CODECS = ("float16", "uniform8", "blockwise8", "blockwise4")
SMALL = tiny_gpt.make_task(width=32, depth=1, heads=2, context=16)  # the example's model, 21k parameters


def trained() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The small model after five Adam steps on its real data: a real optimizer state."""
    model = SMALL.build_model()
    optimizer = SMALL.make_optimizer(model.parameters())
    batches = SMALL.batches(1, 16)
    for _ in range(5):
        optimizer.zero_grad()
        SMALL.loss(model, next(batches)).backward()
        optimizer.step()
    return model, optimizer


def round_trip(codec, tensor: torch.Tensor, role: TensorRole) -> torch.Tensor:
    return deserialize_torch_tensor(codec.compress(tensor, CompressionInfo.from_tensor(tensor, role=role)))


@pytest.mark.parametrize("name", STATE_CODECS)
def test_the_state_codec_carries_optimizer_statistics_exactly_and_parameters_lossily(name):
    install_codecs()
    model, optimizer = trained()
    second_moments = torch.cat([s["exp_avg_sq"].flatten() for s in optimizer.state.values()])
    # why: the bare codec would ruin a large share of them (float16 zeroes 57% of these)
    bare = round_trip(get_codec(name), second_moments, TensorRole.OPTIMIZER)
    assert ((bare - second_moments).abs() > second_moments / 2).float().mean() > 0.3
    for codec in (StateCodec(name), StateCodec(name, download=True)):
        for state in optimizer.state.values():
            for value in state.values():
                assert torch.equal(round_trip(codec, value, TensorRole.OPTIMIZER), value)
        weights = model.blocks[0].mlp[0].weight.detach()
        sent = codec.compress(weights, CompressionInfo.from_tensor(weights, role=TensorRole.PARAMETER))
        assert len(sent.buffer) < weights.numel() * 4 / 1.9  # parameters still take the chosen codec
        assert (deserialize_torch_tensor(sent) - weights).norm() < 0.15 * weights.norm()  # 4 bits: about 0.08


def test_a_download_never_takes_parameters_coarser_than_8_bits():
    assert StateCodec("blockwise4", download=True).name == "blockwise8"
    assert StateCodec("blockwise4").name == "blockwise4" and StateCodec("float16", download=True).name == "float16"


@contextlib.contextmanager
def peer(initial_peers: list[str], model: torch.nn.Module):
    """A real hivemind peer with the spec's codecs of the geo example that diverged."""
    dht = hivemind.DHT(start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    optimizer = SwarmOptimizer(dht=dht, run_id="state-codec", params=model.parameters(),
                               optimizer=SMALL.make_optimizer, batch_size_per_step=1, target_batch_size=10_000,
                               matchmaking_time=0.5, averaging_timeout=5, verbose=False,
                               **optimizer_options("blockwise8", "float16"))
    try:
        yield dht, optimizer
    finally:
        optimizer.shutdown()
        dht.shutdown()


def adam_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> torch.Tensor:
    """How far one Adam step with `optimizer`'s state moves the parameters, on a copy of both."""
    copy = SMALL.build_model()
    copy.load_state_dict(model.state_dict())
    step = SMALL.make_optimizer(copy.parameters())
    step.load_state_dict(optimizer.state_dict())
    before = torch.cat([p.detach().flatten() for p in copy.parameters()])
    SMALL.loss(copy, batch).backward()
    step.step()
    return torch.cat([p.detach().flatten() for p in copy.parameters()]) - before


def test_a_replacement_downloads_the_optimizer_state_bit_for_bit_and_steps_as_its_peer_would():
    install_codecs()
    served_model, adam = trained()
    with peer([], served_model) as (server_dht, server):
        server.load_state_dict(adam.state_dict())
        newcomer_model = SMALL.build_model()
        with peer([str(a) for a in server_dht.get_visible_maddrs()], newcomer_model) as (_, newcomer):
            theirs, ours = server.state_averager.optimizer, newcomer.state_averager.optimizer

            def downloaded() -> bool:
                newcomer.state_averager.load_state_from_peers(timeout=10)
                return bool(torch.equal(ours.state_dict()["state"][0]["step"], adam.state_dict()["state"][0]["step"]))

            wait_for(downloaded, 60, "the newcomer's download")
            for index, state in theirs.state_dict()["state"].items():
                for key, value in state.items():
                    assert torch.equal(ours.state_dict()["state"][index][key], value), (index, key)
            for mine, served in zip(newcomer_model.parameters(), served_model.parameters()):
                assert torch.allclose(mine, served, atol=1e-3)  # float16 on the wire
            batch = next(SMALL.batches(2, 16))
            # the same step moves both alike (a float16 state's step goes 3,500 times further here)
            assert adam_update(newcomer_model, ours, batch).abs().max() <= 2 * adam_update(
                served_model, theirs, batch).abs().max()
