"""Where the controller's DHT peer starts from and what it tells the VMs: the live swarm.

Bootstrap peers come from live state: the running instances' addresses (the local provider's are
complete multiaddrs; a cloud's API gives IPs without the agent's peer id) and the peers the
controller last published, kept in the ledger so that a restarted controller finds the swarm its
predecessor saw. Whether agents can dial the controller decides if it is a DHT server or a client.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.providers.base import Instance

PUBLISHED_PEERS_META = "published-peers"  # ledger meta: the peers last published to the VMs
MAX_PUBLISHED_PEERS = 8
PROBE_TARGET = ("192.0.2.1", 9)  # TEST-NET-1: connecting a UDP socket sends nothing, it only picks a route


def is_complete(address: str) -> bool:
    """A multiaddr hivemind can bootstrap from names the peer (`/p2p/<id>`)."""
    return "/p2p/" in address


def bootstrap_peers(instances: Iterable[Instance], published: object) -> list[str]:
    """The running instances' complete addresses, then the peers published last (JSON from the ledger)."""
    found = [a for i in instances if i.state == InstanceState.RUNNING for a in i.addresses if is_complete(a)]
    if isinstance(published, list):
        found += [str(a) for a in published if is_complete(str(a))]
    return list(dict.fromkeys(found))


def live_peers(controller: Sequence[str], statuses: Iterable[AgentStatus], running: set[str]) -> list[str]:
    """What the VMs should bootstrap from now: the controller (when reachable) and training agents."""
    agents = [a for s in statuses if s.state == AgentState.TRAINING and s.instance_id in running
              for a in s.addresses if is_complete(a)]
    return list(dict.fromkeys([*controller, *agents]))[:MAX_PUBLISHED_PEERS]


def controller_reachable(setting: str, on_this_host: bool) -> bool:
    """yes/no as set; auto: yes when every VM shares this machine's network, else yes only when
    this machine's route out leaves from a public address (a private or carrier-grade NAT address
    means NAT: a laptop, or the emulated cloud's controller namespace)."""
    if setting != "auto":
        return setting == "yes"
    if on_this_host:
        return True
    return _outbound_address_is_public()


def _outbound_address_is_public() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(PROBE_TARGET)
            address = ipaddress.ip_address(probe.getsockname()[0])
    except OSError:
        return False  # no route out at all: nobody can dial in either
    return address.is_global


def swarm_options(on_this_host: bool, reachable_setting: str, running: Iterable[Instance],
                  published: object) -> dict:
    """`SwarmView`'s keyword arguments for a controller starting now (or again); `on_this_host`:
    every VM shares this machine's network (`Providers.on_this_host`)."""
    return {"initial_peers": bootstrap_peers(running, published),
            "host": "127.0.0.1" if on_this_host else "0.0.0.0",
            "client_mode": not controller_reachable(reachable_setting, on_this_host)}
