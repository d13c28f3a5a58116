"""A non-finite training state is never served to a peer and never loaded from one: real
hivemind peers on 127.0.0.1 downloading each other's state (hivemind's rpc_download_state)."""

from __future__ import annotations

import contextlib
import math

import hivemind
import torch
from conftest import wait_for

from spotrain.kernels import SwarmOptimizer


@contextlib.contextmanager
def peer(run_id: str, initial_peers: list[str], *, guarded: bool, poisoned: bool):
    """A DHT and an optimizer of one nn.Linear, spotrain's (guarded) or hivemind's as it comes."""
    dht = hivemind.DHT(start=True, initial_peers=initial_peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(math.nan if poisoned else float(len(initial_peers) + 1))
    optimizer = (SwarmOptimizer if guarded else hivemind.Optimizer)(
        dht=dht, run_id=run_id, params=model.parameters(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        batch_size_per_step=1, target_batch_size=10_000, matchmaking_time=0.5, averaging_timeout=5, verbose=False)
    try:
        yield dht, model, optimizer
    finally:
        optimizer.shutdown()
        dht.shutdown()


def addresses(dht: hivemind.DHT) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def download(optimizer, model: torch.nn.Module) -> torch.Tensor:
    optimizer.state_averager.load_state_from_peers(timeout=10)
    return model.weight.detach().clone()


def test_a_poisoned_state_is_not_loaded_though_a_trusting_peer_would_load_it(caplog):
    with peer("poisoned-state", [], guarded=False, poisoned=True) as (server, _, _), \
            peer("poisoned-state", addresses(server), guarded=False, poisoned=False) as (_, trusting, trusting_opt), \
            peer("poisoned-state", addresses(server), guarded=True, poisoned=False) as (_, guarded, guarded_opt):
        # hivemind as it comes takes the NaN (the attack is real)...
        wait_for(lambda: bool(torch.isnan(download(trusting_opt, trusting)).all()), 60, "the trusting peer poisoned")
        # ...spotrain's peer refuses every copy of it and keeps its own
        own = guarded.weight.detach().clone()
        for _ in range(3):
            assert torch.equal(download(guarded_opt, guarded), own)
        assert "refused the state downloaded from a peer: tensor 0 of 2 has non-finite values" in caplog.text


def test_a_peer_whose_state_is_non_finite_does_not_serve_it(caplog):
    with peer("sick-server", [], guarded=True, poisoned=True) as (server, _, sick), \
            peer("sick-server", addresses(server), guarded=False, poisoned=False) as (_, client, client_opt):
        own = client.weight.detach().clone()
        for _ in range(3):
            assert torch.equal(download(client_opt, client), own)  # refused: nothing loaded
        assert "refusing to serve our state to a peer: tensor 0 of 2 has non-finite values" in caplog.text
        with torch.no_grad():  # healed: now it serves (the parameters its optimizer steps, which it serves)
            sick.state_averager.optimizer.param_groups[0]["params"][0].fill_(7.0)
        wait_for(lambda: bool((download(client_opt, client) == 7.0).all()), 60, "the healed state downloaded")
