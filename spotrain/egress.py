"""Egress as the controller charges it: the agents' byte counters, priced per path.

Each agent reports, in its signed status record, the tensor bytes it has sent to each peer id
since its process started (`AgentStatus.egress_bytes`, `egress_since`). The controller maps a
peer id to the instance that announced it (`/p2p/<id>` in a status record's addresses) and so
to a location, and prices the path with the market's egress model, the one the planner plans
with (`market.egress_usd_per_gb`; GB = 1e9 bytes, as the planner counts). A destination it
cannot place (an agent whose record expired before it was seen, or a stranger) is priced as
the dearest path from the source: the budget never pays less than the truth.

The ledger charges the growth of each counter (`Ledger.charge`), in the transaction that
charges instance time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from spotrain.contracts.records import AgentStatus
from spotrain.market import INTERNET, Location, egress_usd_per_gb

BYTES_PER_GB = 1e9
EGRESS_WINDOW_SECONDS = 60.0  # the egress burn the budget guard reserves for: the mean over this window
UNKNOWN = "unknown"  # the destination of bytes sent to a peer no status record names

PathPrice = Callable[[str, str], float]  # (source location, destination location or UNKNOWN) -> USD/GB


@dataclass(frozen=True)
class EgressReading:
    """One agent's cumulative counter for one destination, priced."""

    instance_id: str
    since: float  # the agent process's start: a restarted agent's counters start again at 0
    peer: str
    source: str  # location
    destination: str  # location, or UNKNOWN
    total_bytes: int
    usd_per_gb: float


def peer_id_of(address: str) -> str | None:
    """The peer id a multiaddr names (`.../p2p/<id>`), or None."""
    _, found, rest = address.partition("/p2p/")
    return rest.split("/", 1)[0] or None if found else None


def peer_instances(statuses: Iterable[AgentStatus]) -> dict[str, str]:
    """Peer id -> the instance whose agent announced it."""
    return {peer: status.instance_id for status in statuses for address in status.addresses
            if (peer := peer_id_of(address)) is not None}


def path_usd_per_gb(source: str, destination: str, known: Iterable[str] = ()) -> float:
    """What a GB from `source` to `destination` costs; to UNKNOWN, the dearest of the internet and
    every location in `known`."""
    src = Location.parse(source)
    if destination != UNKNOWN:
        return egress_usd_per_gb(src, Location.parse(destination))
    return max([egress_usd_per_gb(src, INTERNET)] + [egress_usd_per_gb(src, Location.parse(d)) for d in known])


def emulated_cloud_prices(priced_as: Mapping[str, str]) -> PathPrice:
    """The emulated cloud's paths priced as the catalog regions its regions stand for (local
    location -> catalog region, `providers.local.regions.<r>.egress_priced_as`); a location not in
    `priced_as` sends for free, as processes on one host do."""
    stand_ins = sorted(set(priced_as.values()))

    def price(source: str, destination: str) -> float:
        if source not in priced_as:
            return 0.0
        if destination == UNKNOWN:
            return path_usd_per_gb(priced_as[source], UNKNOWN, stand_ins)
        return path_usd_per_gb(priced_as[source], priced_as.get(destination, priced_as[source]))

    return price


def egress_readings(statuses: Iterable[AgentStatus], location_of: Mapping[str, str],
                    price: PathPrice | None = None, peers_seen: Mapping[str, str] = {}) -> list[EgressReading]:
    """Every counter of every status whose instance `location_of` places (instance id -> location).

    `peers_seen` (peer id -> instance id) names peers whose records have expired since; `price`
    defaults to the market's model, an emulated cloud may pass its own."""
    statuses = list(statuses)
    instance_of = {**peers_seen, **peer_instances(statuses)}
    known = sorted(set(location_of.values()))
    if price is None:
        def price(source: str, destination: str) -> float:
            return path_usd_per_gb(source, destination, known)
    readings = []
    for status in statuses:
        source = location_of.get(status.instance_id)
        if source is None:
            continue  # not ours (or not yet in the ledger): charged once the ledger knows it
        for peer, count in sorted(status.egress_bytes.items()):
            destination = location_of.get(instance_of.get(peer, ""), UNKNOWN)
            readings.append(EgressReading(status.instance_id, status.egress_since, peer, source, destination,
                                          count, price(source, destination)))
    return readings


def usd_of(byte_count: int, usd_per_gb: float) -> float:
    return byte_count / BYTES_PER_GB * usd_per_gb
