"""A swarm peer at epoch 5 for test_state_download.py, in its own process (hivemind signs progress
records with a process-wide key: two peers in one process would share one record).

    python tests/download_peer.py WORKDIR
Writes its addresses to WORKDIR/peers and its parameters to WORKDIR/params.pt, reports epoch 5,
reports epoch 6 once WORKDIR/step exists, and leaves once WORKDIR/done exists.
"""

import json
import sys
import time
from pathlib import Path

import hivemind
import torch

from spotrain.kernels import SwarmOptimizer, optimizer_options


def main(work: Path) -> int:
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 8)
    peer = SwarmOptimizer(dht=dht, run_id="download", params=model.parameters(), optimizer=torch.optim.Adam,
                          batch_size_per_step=4, target_batch_size=4, verbose=False, matchmaking_time=1.0,
                          averaging_timeout=5.0, **optimizer_options("float16", "none", delayed_updates=True))
    peer.state_averager.local_epoch = 5  # a swarm at epoch 5: its record and its state say so
    peer.state_averager.state_sharing_priority = 5
    peer.tracker.report_local_progress(5, 4)
    torch.save([p.detach().clone() for p in model.parameters()], work / "params.pt")
    (work / "peers.tmp").write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
    (work / "peers.tmp").rename(work / "peers")
    deadline = time.monotonic() + 240
    while not (work / "step").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    peer.state_averager.local_epoch = 6  # the swarm steps while the newcomer downloads
    peer.tracker.report_local_progress(6, 4)
    while not (work / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    peer.shutdown()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
