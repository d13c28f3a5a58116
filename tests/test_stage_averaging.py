"""A SWARM stage's peers average its parameters and serve them to a newcomer: real hivemind peers
on 127.0.0.1 (each averager its own process, as hivemind runs it)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hivemind import DHT

from spotrain.agents.pipeline.stage_averaging import StageAverager, stage_prefix, state_refusal
from spotrain.kernels import get_codec, install_codecs

CLUSTER = "avg-test"


def module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def averager(dht: DHT, net: torch.nn.Module, stage: int, steps: int = 0) -> StageAverager:
    return StageAverager(dht, net, threading.Lock(), cluster=CLUSTER, stage=stage, steps=lambda: steps,
                         compression=get_codec("float16"), state_compression=get_codec("none"),
                         matchmaking_time=2.0, averaging_timeout=20.0)


def flat(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_a_stage_prefix_has_no_dot_and_names_the_stage():
    assert stage_prefix("a.b", 2) == "a-b-stage2" and stage_prefix("c", 0) != stage_prefix("c", 1)


def test_two_stage_peers_reach_the_mean_and_a_newcomer_downloads_the_live_state():
    install_codecs()
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                          initial_peers=[str(a) for a in first.get_visible_maddrs()]) for _ in range(3)]
    nets = [module(seed) for seed in (1, 2)]
    other_stage = module(3)  # serves stage 1: never in stage 0's group
    truth = (flat(nets[0]) + flat(nets[1])) / 2
    averagers = [averager(dht, net, 0, steps=7 * (i + 1)) for i, (dht, net) in enumerate(zip(dhts, nets))]
    foreign = averager(dhts[2], other_stage, 1)
    foreign_before = flat(other_stage).clone()
    newcomer_net = module(4)
    newcomer = None
    try:
        with ThreadPoolExecutor(3) as pool:
            # the other stage's peer looks for a group while stage 0's round runs (about 2 to 4 s), and
            # alone it waits out its timeout: 8 s, not the 30 s stage 0 may need on a loaded machine
            rounds = list(pool.map(lambda a: a.average_once(timeout=8.0 if a is foreign else 30.0),
                                   averagers + [foreign]))
        assert rounds == [True, True, False], "the stage's two peers averaged, the other stage's peer alone did not"
        for net in nets:
            assert (flat(net) - truth).norm() / truth.norm() < 1e-3  # float16 on the wire
        assert torch.equal(flat(other_stage), foreign_before)

        with torch.no_grad():  # stage 0 trains on after the round: the newcomer must get the live values
            for param in nets[0].parameters():
                param.add_(0.5)
            for param in nets[1].parameters():
                param.add_(0.5)
        newcomer = averager(dhts[3], newcomer_net, 0)
        steps = newcomer.load_from_peers(timeout=30.0)
        assert steps in (7, 14)
        source = nets[0] if steps == 7 else nets[1]
        assert torch.equal(flat(newcomer_net), flat(source))
    finally:
        for each in averagers + [foreign] + ([newcomer] if newcomer else []):
            each.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.parametrize("problem", ["shape", "nan", "stage", "count"])
def test_a_downloaded_state_that_does_not_fit_the_stage_is_refused(problem):
    net = module(5)
    params = list(net.parameters())
    tensors = [p.detach().clone() for p in params]
    metadata = {"stage": 0, "steps": 3}
    assert state_refusal(0, params, metadata, tensors) is None
    if problem == "shape":
        tensors[0] = torch.zeros(3)
    elif problem == "nan":
        tensors[1][0] = float("nan")
    elif problem == "stage":
        metadata["stage"] = 1
    else:
        tensors.pop()
    assert state_refusal(0, params, metadata, tensors) is not None
