"""Admission with real hivemind peers on 127.0.0.1: a controller's DHT peer with the cluster key, two
admitted peers set up as agents set themselves up (agents/admission.py: their identity from the
controller, the gate installed before hivemind forks), and a stranger with its own keys that knows
every address. The stranger's DHT requests and its calls to both kinds of handler (unary:
DHT, matchmaking; stream: all-reduce parts, state downloads, stage requests) are refused; the
admitted peers are served until one is revoked; forged records change nothing the controller reads."""

from __future__ import annotations

import time
from functools import partial

import hivemind
import pytest
from conftest import admit, agent_config, wait_for
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import dht_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from spotrain.access import ClusterAccess
from spotrain.agents import admission as gate_module
from spotrain.agents.swarm_join import IDENTITY_FILE
from spotrain.contracts.admission import admission_key, owner_marker
from spotrain.contracts.records import AgentStatus, duty_key, status_key
from spotrain.contracts.states import AgentState
from spotrain.swarm_view import SwarmView

CLUSTER = "gate-test"


async def _serve(_dht, node) -> None:
    """In a peer's DHT process: one handler of each kind hivemind registers."""
    async def unary(request, context):
        return dht_pb2.PingResponse(available=True)

    async def stream(request, context):
        yield dht_pb2.PingResponse(available=True)

    await node.p2p.add_protobuf_handler("gate-test.unary", unary, dht_pb2.PingRequest)
    await node.p2p.add_protobuf_handler("gate-test.stream", stream, dht_pb2.PingRequest, stream_output=True)


async def _call(address: str, _dht, node) -> tuple[bool, bool]:
    """In the caller's DHT process: (unary answered, stream answered) by the peer at `address`."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    maddr = Multiaddr(address)
    peer = PeerID.from_base58(maddr["p2p"])
    await node.p2p._client.connect(peer, [maddr.decapsulate(Multiaddr(f"/p2p/{maddr['p2p']}"))])
    try:
        await node.p2p.call_protobuf_handler(peer, "gate-test.unary", dht_pb2.PingRequest(), dht_pb2.PingResponse)
        unary = True
    except Exception:
        unary = False
    try:
        answers = [r async for r in await node.p2p.iterate_protobuf_handler(
            peer, "gate-test.stream", dht_pb2.PingRequest(), dht_pb2.PingResponse)]
        stream = bool(answers)
    except Exception:
        stream = False
    return unary, stream


def agent_peer(tmp_path, name: str, admission: dict, peers: list[str]):
    """A DHT peer set up as the agent sets itself up; returns (dht, gate)."""
    work = tmp_path / name
    work.mkdir()
    config = agent_config(CLUSTER, instance_id=name, admission=admission)
    gate = gate_module.admit_self(config, work, print)
    dht = hivemind.DHT(initial_peers=peers, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       identity_path=str(work / IDENTITY_FILE), start=True)
    dht.add_validators([RSASignatureValidator()])  # the process-wide key: the identity's (admit_self)
    return dht, gate


def status(instance_id: str, **changes) -> dict:
    fields = dict(instance_id=instance_id, state=AgentState.TRAINING, epoch=3, samples=10, samples_per_second=1.5,
                  loss=None, bytes_sent=1, bytes_received=2, checkpoint_epoch=None, addresses=(), time=time.time())
    return AgentStatus(**{**fields, **changes}).to_record()


@pytest.fixture
def peers():
    started: list = []
    yield started
    gate_module.install(None)
    for dht in reversed(started):
        dht.shutdown()


def test_a_stranger_is_refused_everywhere_and_admitted_peers_are_served_until_revoked(tmp_path, peers):
    access = ClusterAccess(tmp_path / "cluster", CLUSTER)
    swarm = SwarmView(CLUSTER, access)
    peers.append(swarm)
    admissions = admit(swarm, ["i-a", "i-b"])
    a, gate_a = agent_peer(tmp_path, "i-a", admissions["i-a"], swarm.addresses())
    peers.append(a)
    a.run_coroutine(_serve)
    b, _ = agent_peer(tmp_path, "i-b", admissions["i-b"], swarm.addresses())
    peers.append(b)
    a_address = next(str(m) for m in a.get_visible_maddrs())
    a.store(status_key(CLUSTER), status("i-a"), get_dht_time() + 30,
            subkey=b"i-a" + owner_marker(_public_key_of(tmp_path / "i-a")))
    wait_for(lambda: "i-a" in swarm.statuses(), 20, "the admitted agent's status")

    # the stranger: no gate, its own keys, every address
    gate_module.install(None)
    stranger_key = RSAPrivateKey()
    stranger_validator = RSASignatureValidator(stranger_key)
    stranger = hivemind.DHT(initial_peers=[*swarm.addresses(), a_address], host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                            record_validators=[stranger_validator], ensure_bootstrap_success=False, start=True)
    peers.append(stranger)
    marker = stranger_validator.local_public_key
    assert stranger.get(status_key(CLUSTER), latest=True) is None  # nothing read
    stranger.store(status_key(CLUSTER), status("i-a", state=AgentState.DRAINING, time=time.time() + 3600),
                   get_dht_time() + 60, subkey=b"i-a" + marker)
    stranger.store(status_key(CLUSTER), status("i-x", epoch=10**6, samples=10**12, codec_table="evil"),
                   get_dht_time() + 60, subkey=b"i-x" + marker)
    stranger.store(duty_key(CLUSTER), [], get_dht_time() + 600)
    stranger.store(admission_key(CLUSTER), {"kind": "admission"}, get_dht_time() + 600, subkey=marker)
    assert stranger.run_coroutine(partial(_call, a_address)) == (False, False)  # both kinds of handler refuse

    # an admitted peer is served; what the stranger stored reached nobody
    assert b.run_coroutine(partial(_call, a_address)) == (True, True)
    seen = swarm.statuses()
    assert set(seen) == {"i-a"} and seen["i-a"].state == AgentState.TRAINING and seen["i-a"].epoch == 3
    for key in (status_key(CLUSTER), duty_key(CLUSTER), admission_key(CLUSTER)):
        found = swarm.dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        assert not any(isinstance(k, bytes) and marker in k for k in entries), key

    # revoked: b is left out of the next admission; a's gate takes it from the DHT and refuses b
    admit(swarm, ["i-a"])
    wait_for(lambda: (gate_a.refresh(a), "i-b" not in gate_a.peers().values())[1], 20, "a's gate to revoke b")
    assert b.run_coroutine(partial(_call, a_address)) == (False, False)


def _public_key_of(work) -> str:
    """The OpenSSH public key of the identity an agent wrote in `work`."""
    from spotrain.contracts.admission import hivemind_private_key, identity_private_der

    key = hivemind_private_key(identity_private_der((work / IDENTITY_FILE).read_bytes()))
    return key.get_public_key().to_bytes().decode()


async def _knows(peer_id: str, _dht, node) -> bool:
    """In a peer's DHT process: whether `peer_id` is in its routing table (it would be asked in lookups)."""
    from hivemind.p2p import PeerID

    return PeerID.from_base58(peer_id) in node.protocol.routing_table


def test_an_agent_calls_no_peer_its_admission_leaves_out_and_reads_nothing_from_one(tmp_path, peers):
    """Outgoing calls are gated too: once b is revoked, a neither calls b's handlers (unary: DHT,
    matchmaking; stream: all-reduce parts, state downloads, stage requests) nor takes a value that b
    alone holds in a DHT lookup, though b was in a's routing table from before the revocation."""
    access = ClusterAccess(tmp_path / "cluster", CLUSTER)
    swarm = SwarmView(CLUSTER, access)
    peers.append(swarm)
    admissions = admit(swarm, ["i-a", "i-b"])
    a, gate_a = agent_peer(tmp_path, "i-a", admissions["i-a"], swarm.addresses())
    peers.append(a)
    b, _ = agent_peer(tmp_path, "i-b", admissions["i-b"], [*swarm.addresses(), *map(str, a.get_visible_maddrs())])
    peers.append(b)
    b.run_coroutine(_serve)
    b_address = next(str(m) for m in b.get_visible_maddrs())
    assert a.run_coroutine(partial(_call, b_address)) == (True, True)  # admitted: a calls b
    wait_for(lambda: a.run_coroutine(partial(_knows, str(b.peer_id))), 20, "b in a's routing table")

    admit(swarm, ["i-a"])  # b revoked
    wait_for(lambda: (gate_a.refresh(a), "i-b" not in gate_a.peers().values())[1], 20, "a's gate to revoke b")
    assert a.run_coroutine(partial(_call, b_address)) == (False, False)  # a calls neither kind of b's handler
    key = f"{CLUSTER}.from-b"
    b.store(key, "b's value", get_dht_time() + 60)  # a and the controller refuse it: only b holds it
    assert b.get(key, latest=True).value == "b's value"
    assert a.get(key, latest=True) is None  # a asked only admitted peers
