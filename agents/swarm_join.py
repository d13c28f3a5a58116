"""How an agent joins the swarm: at a stable identity and port, announcing the address its peers
can reach, bootstrapping from live peers when the ones it was launched with are gone.

The user-data's `initial_peers` were right when the VM was launched; an agent restarted later
(its crash, a controller restarted meanwhile) may find none of them. It then reads the peers the
controller last published for its VM through the metadata service (an EC2 tag, a GCE attribute,
the local VM's file), and starts the swarm alone only when no peer is listed at all.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from spotrain.contracts.agent_config import AgentConfig

if TYPE_CHECKING:
    from hivemind import DHT

IDENTITY_FILE = "swarm-identity.key"  # the libp2p private key: the same peer id after a restart
PORT_FILE = "swarm-port"  # the port picked when the spec gives none: the same address after a restart
ADDRESSES_FILE = "swarm-addresses.json"  # read by the local provider as the instance's addresses
JOIN_ATTEMPTS = 5
RETRY_SECONDS = 3.0
MERGE_SECONDS = 20.0  # how often a joined agent pings the published peers (heals a swarm that split)


class LiveSource(Protocol):
    """The VM's metadata service, as far as joining needs it (agents/metadata_watch.py's clients)."""

    def reachable_hosts(self) -> list[str]: ...

    def live_peers(self) -> list[str] | None: ...


def listen_port(config: AgentConfig, work: Path) -> int:
    """The spec's port; else the port this VM's agent used before, while it is free; else a free one."""
    if config.port:
        return config.port
    saved = work / PORT_FILE
    try:
        port = int(saved.read_text())
        if _port_free(config.host, port):
            return port
    except (OSError, ValueError):
        pass
    with socket.socket() as probe:
        probe.bind((config.host, 0))
        port = probe.getsockname()[1]
    saved.write_text(str(port))
    return port


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a predecessor's TIME_WAIT is no owner
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def announce_hosts(config: AgentConfig, source: LiveSource | None) -> list[str]:
    """Where peers reach this agent: the user-data's `announce_host`, else the VM's IPs."""
    if config.announce_host:
        return [config.announce_host]
    if source is None:
        return []
    try:
        return source.reachable_hosts()
    except (OSError, ValueError):
        return []  # hivemind then announces the addresses it listens on


def own_peer_id(identity: Path) -> str | None:
    from hivemind.p2p import PeerID

    return PeerID.from_identity(identity.read_bytes()).to_base58() if identity.exists() else None


def others(peers: Sequence[str], peer_id: str | None) -> list[str]:
    """The peers that are not this agent (a restarted agent may find its own old address listed)."""
    return [p for p in peers if peer_id is None or not p.rstrip("/").endswith(f"/p2p/{peer_id}")]


def _read_live(source: LiveSource | None) -> list[str] | None:
    """The published peers; [] with no live source at all; None when nothing is published (yet)."""
    if source is None:
        return []
    try:
        return source.live_peers()
    except (OSError, ValueError):
        return None


def join_swarm(config: AgentConfig, source: LiveSource | None, log: Callable[[str], None],
               work: Path | None = None) -> DHT:
    """A started DHT peer in the swarm, or alone when no peer is listed anywhere."""
    from spotrain.agents.dht_requests import LostRequestSafeDHT

    work = work or Path.cwd()
    port = listen_port(config, work)
    identity = work / IDENTITY_FILE
    announce = [f"/ip4/{host}/tcp/{port}" for host in announce_hosts(config, source)]
    options = dict(host_maddrs=[f"/ip4/{config.host}/tcp/{port}"], announce_maddrs=announce or None,
                   identity_path=str(identity), start=True)
    own = own_peer_id(identity)
    live: list[str] = []
    for attempt in range(JOIN_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_SECONDS)
        published = _read_live(source)  # fresher than the user-data: tried first
        live = others(published or [], own)
        peers = list(dict.fromkeys([*live, *others(config.initial_peers, own)]))
        if live:
            log(f"bootstrapping from {len(live)} live peer(s) the controller published")
        if peers:
            try:
                return _joined(LostRequestSafeDHT(initial_peers=peers, **options), work)
            except Exception as error:  # p2pd's "failed to connect to bootstrap peers", hivemind's failed ping
                log(f"none of {len(peers)} bootstrap peer(s) answered: {str(error).splitlines()[0][:200]}")
        if published is not None and not live:
            break  # nobody is listed: there is no one to wait for
    if live:
        raise RuntimeError(f"none of the live peers answered in {JOIN_ATTEMPTS} attempts")
    log("no bootstrap peer answered and no live peer is listed: starting the swarm alone")
    return _joined(LostRequestSafeDHT(initial_peers=[], **options), work)


def _joined(dht: DHT, work: Path) -> DHT:
    addresses = [str(a) for a in dht.get_visible_maddrs()]
    (work / ADDRESSES_FILE).write_text(json.dumps(addresses))  # the local provider reports these
    return dht


async def ping_peers(peers: list[str], dht: object, node: Any) -> int:
    """Run in the DHT's process (`DHT.run_coroutine`): connect to and ping each peer, which puts the
    ones that answer into the routing table; returns how many answered."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    answered = 0
    for peer in peers:
        try:
            address = Multiaddr(peer)
            peer_id = PeerID.from_base58(address["p2p"])
            await node.p2p._client.connect(peer_id, [address.decapsulate(Multiaddr(f"/p2p/{address['p2p']}"))])
            answered += await node.protocol.call_ping(peer_id) is not None
        except Exception:  # a peer that is gone or malformed: the next one may answer
            continue
    return answered


def keep_merged(dht: DHT, source: LiveSource, stop: threading.Event, log: Callable[[str], None]) -> None:
    """Until `stop`: ping the published peers now and then. Agents that started alone at the same
    moment (a controller behind NAT lists nobody at first) become one swarm once they are listed."""
    own = str(dht.peer_id)
    while not stop.wait(MERGE_SECONDS):
        peers = others(_read_live(source) or [], own)
        if peers:
            try:
                dht.run_coroutine(partial(ping_peers, peers))
            except Exception as error:  # the DHT is shutting down, or busy: try again later
                log(f"pinging live peers failed: {type(error).__name__}: {error}")
