"""A newcomer downloads the newest peer's training state and nothing else (no averaged gradients).

A newcomer that just downloaded the newest peer's state does not download it all again because
the swarm stepped once meanwhile (hivemind's once-an-epoch exact check would): one epoch behind
is in sync for hivemind until the newcomer's next epoch. Two real SwarmOptimizers, the one
ahead in its own process (tests/download_peer.py)."""

import json
import subprocess
import sys
from pathlib import Path

import hivemind
import torch
from conftest import wait_for

from spotrain.kernels import SwarmOptimizer, optimizer_options

HERE = Path(__file__).resolve().parent


def test_a_fresh_download_one_epoch_behind_is_not_downloaded_again(tmp_path):
    ahead = subprocess.Popen([sys.executable, str(HERE / "download_peer.py"), str(tmp_path)], cwd=HERE)
    dht = newcomer = None
    try:
        peers = json.loads(wait_for(lambda: (tmp_path / "peers").exists() and (tmp_path / "peers").read_text(),
                                    120, "the peer ahead"))
        dht = hivemind.DHT(initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        torch.manual_seed(2)
        model = torch.nn.Linear(8, 8)
        newcomer = SwarmOptimizer(dht=dht, run_id="download", params=model.parameters(), optimizer=torch.optim.Adam,
                                  batch_size_per_step=4, target_batch_size=4, verbose=False, matchmaking_time=1.0,
                                  averaging_timeout=5.0, **optimizer_options("float16", "none", delayed_updates=True))
        wait_for(lambda: newcomer.tracker.global_epoch == 5, 60, "the newcomer to see epoch 5")
        newcomer.load_state_from_peers()
        assert newcomer.local_epoch == 5 and newcomer.state_downloads == 1
        theirs = torch.load(tmp_path / "params.pt")
        assert all(torch.equal(p.detach(), t) for p, t in zip(model.parameters(), theirs))
        # the state came from the peer's state averager; its gradient averager offers nothing to download
        # (hivemind's would: its last averaged gradients, which a newcomer throws away)
        assert donors(dht, "download_state_averager") and not donors(dht, "download_grad_averager")

        (tmp_path / "step").touch()
        wait_for(lambda: newcomer.tracker.global_epoch == 6
                 and newcomer.tracker.fetched_global_progress_this_epoch.is_set(), 60, "the newcomer to see epoch 6")
        assert not newcomer._should_load_state_from_peers()  # one behind after a fresh download: no second one
        newcomer._should_check_synchronization_on_update = True  # what its next epoch sets: the exact check is back
        assert newcomer._should_load_state_from_peers()
    finally:
        (tmp_path / "done").touch()
        if newcomer is not None:
            newcomer.shutdown()
        if dht is not None:
            dht.shutdown()
        try:
            ahead.wait(timeout=60)
        except subprocess.TimeoutExpired:
            ahead.kill()
            ahead.wait()


def donors(dht: hivemind.DHT, prefix: str) -> list[str]:
    """The peers that declared themselves for state downloads under `prefix` (hivemind's key)."""
    found = dht.get(f"{prefix}.all_averagers", latest=True)
    return [peer for peer, entry in (found.value if found else {}).items() if isinstance(entry.value, (int, float))]
