"""One hivemind averaging peer for test_compression_swarm.py (run as its own process).

    python tests/averaging_peer.py INDEX WORKDIR CODEC
Peer 0 writes its addresses to WORKDIR/peers; every peer averages two tensors seeded by its
index once, through the codec, and writes what it got and the bytes it counted.
"""

import json
import sys
import time
from pathlib import Path

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

from spotrain.kernels import get_codec, install_codecs, traffic

GIVE_UP_SECONDS = 120.0  # the test waits for both peers longer than this, so a lone peer says why


def peer_tensors(index: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + index)
    return [torch.randn(300_000, generator=generator) * (index + 1), torch.randn(64, 100, generator=generator)]


def main(index: int, work: Path, codec: str) -> int:
    install_codecs()
    peers: list[str] = []
    if index:
        while not (work / "peers").exists():
            time.sleep(0.1)
        peers = json.loads((work / "peers").read_text())
    # a 10 s wait for each DHT reply, not hivemind's 3 s: a bootstrap ping unanswered in time ends
    # peer 1, and peer 0 waits for a partner that never comes (one CI run hung so, kept no log)
    dht = hivemind.DHT(initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"], wait_timeout=10.0, start=True)
    if index == 0:
        (work / "peers.tmp").write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        (work / "peers.tmp").rename(work / "peers")
    averager = DecentralizedAverager(peer_tensors(index), dht, prefix="codec-test", target_group_size=2,
                                     min_group_size=2, min_matchmaking_time=2.0, request_timeout=1.0,
                                     compression=get_codec(codec, error_feedback=True), start=True)
    try:
        return average_and_report(averager, index, work)
    finally:  # on either path: a peer that gave up leaves no p2pd behind
        averager.shutdown()
        dht.shutdown()


def average_and_report(averager: DecentralizedAverager, index: int, work: Path) -> int:
    group = None
    give_up = time.monotonic() + GIVE_UP_SECONDS
    while not group and time.monotonic() < give_up:
        group = averager.step(timeout=60)
    if not group:
        print(f"peer {index}: no group formed in {GIVE_UP_SECONDS:.0f} s", flush=True)
        return 1
    with averager.get_tensors() as tensors:
        torch.save([t.clone() for t in tensors], work / f"result{index}.pt")
    # A peer's step ends once it has its own results, which can be before it has encoded and sent
    # the averages it owes the other peer (hivemind averages a part, hands the result to the local
    # step, and only then encodes the reply). So stay up until the other peer has its result too:
    # leaving earlier cuts that reply and hivemind keeps the other's part un-averaged. And count
    # the bytes only then: read earlier, the reply is not in them yet.
    (work / f"done{index}").touch()
    deadline = time.monotonic() + 120
    while not (work / f"done{1 - index}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    (work / f"traffic{index}.json").write_text(json.dumps(
        {"group_size": len(group), "sent": traffic.sent, "received": traffic.received}))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
