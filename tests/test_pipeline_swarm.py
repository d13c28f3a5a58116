"""SWARM on loopback: 3 stages x 2 stage servers and a trainer, each on its own hivemind P2P."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from spotrain.agents.pipeline.protocol import (
    StageOp,
    StageReply,
    StageUnavailable,
    parse_reply,
    reply_message,
)
from spotrain.agents.pipeline.routing import RouteTable, RoutingPolicy
from spotrain.agents.pipeline.stage_server import StageServer, ThroughputMeter
from spotrain.agents.pipeline.trainer import PipelineTrainer
from spotrain.contracts.states import AgentState
from spotrain.examples import tiny_gpt_pipeline
from spotrain.kernels import install_codecs

CLUSTER = "test-swarm"
MICROBATCH = 8
LOOPBACK = {"nat_port_map": False, "auto_nat": False, "use_relay": False}  # nothing to traverse on 127.0.0.1


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Seven peers share this process and two cores: one intra-op thread keeps them from thrashing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_stage_peer_measures_forward_and_backward_together():
    meter = ThroughputMeter(alpha=0.5, warmup=0, measured_after=1)
    meter.add(StageOp.FORWARD, samples=10, seconds=1.0)
    assert meter.samples_per_second(tail=False) == 0.0  # no backward measured yet
    meter.add(StageOp.BACKWARD, samples=10, seconds=3.0)
    assert meter.samples_per_second(tail=False) == pytest.approx(2.5)  # 0.1 + 0.3 s per sample
    meter.add(StageOp.FORWARD, samples=10, seconds=3.0)  # the average moves halfway to 0.3
    assert meter.samples_per_second(tail=False) == pytest.approx(2.0)
    assert meter.samples_per_second(tail=True) == 0.0


def test_a_stage_peer_skips_its_first_call_and_publishes_a_speed_only_after_a_few():
    meter = ThroughputMeter(alpha=0.5, warmup=1, measured_after=2)
    meter.add(StageOp.TAIL, samples=4, seconds=40.0)  # the first call: building what later calls reuse
    meter.add(StageOp.TAIL, samples=4, seconds=1.0)
    assert meter.samples_per_second(tail=True) == 0.0  # one counted call is not a measurement
    meter.add(StageOp.TAIL, samples=4, seconds=1.0)
    assert meter.samples_per_second(tail=True) == pytest.approx(4.0)  # the first call left no trace


def test_replies_carry_the_load_and_a_malformed_one_is_refused():
    reply = StageReply(tensors=(), queued=3, samples_per_second=12.5, loss=2.25)
    assert parse_reply(reply_message(reply)) == reply
    for metadata in (b"", MSGPackSerializer.dumps([1]), MSGPackSerializer.dumps({"queued": 1})):
        with pytest.raises(StageUnavailable):
            parse_reply(runtime_pb2.ExpertResponse(metadata=metadata))


async def start_servers(per_stage: int) -> list[StageServer]:
    task = tiny_gpt_pipeline.task
    p2ps = await asyncio.gather(*(P2P.create(**LOOPBACK) for _ in range(task.num_stages * per_stage)))
    servers = [StageServer(p2p, task, index // per_stage, cluster=CLUSTER) for index, p2p in enumerate(p2ps)]
    await asyncio.gather(*(server.start() for server in servers))
    return servers


async def start_trainer(servers: list[StageServer]) -> PipelineTrainer:
    maddrs = [maddr for server in servers for maddr in await server.p2p.get_visible_maddrs()]
    p2p = await P2P.create(initial_peers=maddrs, **LOOPBACK)
    directory: dict[int, list[PeerID]] = {}
    for server in servers:
        directory.setdefault(server.stage, []).append(server.p2p.peer_id)
    routes = RouteTable(RoutingPolicy(max_in_flight=2, ban_seconds=0.5, max_ban_seconds=4.0))
    return PipelineTrainer(p2p, tiny_gpt_pipeline.task, lambda stage: directory[stage], cluster=CLUSTER,
                           routes=routes, max_in_flight=2, call_timeout=10.0)


async def shutdown(servers: list[StageServer], trainer: PipelineTrainer) -> None:
    for server in servers:
        await server.stop()
        await server.p2p.shutdown()
    await trainer.p2p.shutdown()


def test_training_survives_draining_and_lost_stage_peers_and_counts_what_it_drops(one_torch_thread):
    """One swarm through four phases (a swarm's seven p2p daemons take seconds to start)."""
    install_codecs()

    async def scenario() -> None:
        servers = await start_servers(per_stage=2)
        trainer = await start_trainer(servers)
        batches = tiny_gpt_pipeline.task.batches(0, MICROBATCH)
        try:
            stats = await trainer.train(batches, 10)  # 1. all peers serve
            assert stats.completed == 10 and all(server.served > 0 for server in servers)

            draining, tail_mate = servers[4], servers[5]  # 2. a tail peer drains: its mate takes over
            draining.drain()
            served = draining.served, tail_mate.served
            stats = await trainer.train(batches, 10)
            assert stats.completed == 20 and draining.served == served[0] and tail_mate.served == served[1] + 10

            lost, survivor = servers[2], servers[3]  # 3. a middle peer vanishes without notice
            served = survivor.served
            await lost.p2p.shutdown()
            stats = await trainer.train(batches, 20)
            assert stats.started == stats.completed == 40 and stats.dropped == 0
            # routing may never pick the lost peer (its expected busy time is higher); when it did, the
            # failure is remembered and the peer banned (a success would have cleared the entry)
            lost_health = trainer.routes.health.get((lost.stage, str(lost.p2p.peer_id)))
            assert lost_health is None or lost_health.failures >= 1
            assert survivor.served > served
            early, late = sum(stats.losses[:8]) / 8, sum(stats.losses[-8:]) / 8
            assert late < early - 0.3, f"loss fell from {early:.3f} to only {late:.3f}"
            records = [server.record("i", time.time()) for server in (servers[0], survivor, tail_mate)]
            assert all(r.samples_per_second > 0 and r.state == AgentState.TRAINING for r in records)
            assert draining.record("i", 0.0).state == AgentState.DRAINING

            await survivor.p2p.shutdown()  # 4. the middle stage has no peer left: microbatches are dropped
            trainer.call_timeout = 1.0
            stats = await trainer.train(batches, 2)
            assert stats.started == 42 and stats.completed == 40 and stats.dropped == 2, "no microbatch is lost"
        finally:
            await shutdown(servers, trainer)

    asyncio.run(scenario())


def test_a_peer_the_admission_does_not_list_is_routed_around_not_fatal(one_torch_thread, tmp_path):
    """A preempted peer's admission is revoked while its stage record lingers in the DHT: the trainer's
    call is refused before it is made (NotAdmitted), and the microbatch goes to an admitted peer."""
    import base64

    from spotrain.access import ClusterAccess
    from spotrain.agents import admission
    from spotrain.agents.admission import Gate, write_private
    from spotrain.contracts.admission import peer_id_of_identity

    install_codecs()
    access = ClusterAccess(tmp_path / "cluster", CLUSTER)
    _, _, each = access.admit_only(["trainer", "s0", "s1", "s2"], time.time(), 60.0)
    keys = {}
    for name, admitted in each.items():
        keys[name] = tmp_path / f"{name}.key"
        write_private(keys[name], base64.b64decode(admitted["identity"]))
    own = peer_id_of_identity(base64.b64decode(each["trainer"]["identity"]))
    gate = Gate(tmp_path / "admitted.json", CLUSTER, access.public_key, own, log=lambda _: None)
    assert gate.accept(each["trainer"]["record"], from_user_data=True) is not None
    admission.install(gate)  # this process's calls and handlers; conftest uninstalls it

    async def scenario() -> None:
        task = tiny_gpt_pipeline.task
        p2ps = [await P2P.create(identity_path=str(keys[f"s{stage}"]), **LOOPBACK) for stage in range(3)]
        p2ps.append(await P2P.create(**LOOPBACK))  # a second stage-0 peer the admission does not list
        servers = [StageServer(p2p, task, stage, cluster=CLUSTER) for stage, p2p in zip([0, 1, 2, 0], p2ps)]
        await asyncio.gather(*(server.start() for server in servers))
        maddrs = [maddr for server in servers for maddr in await server.p2p.get_visible_maddrs()]
        directory: dict[int, list[PeerID]] = {}
        for server in servers:
            directory.setdefault(server.stage, []).append(server.p2p.peer_id)
        p2p = await P2P.create(initial_peers=maddrs, identity_path=str(keys["trainer"]), **LOOPBACK)
        routes = RouteTable(RoutingPolicy(max_in_flight=2, ban_seconds=60.0, max_ban_seconds=60.0))
        trainer = PipelineTrainer(p2p, task, lambda stage: directory[stage], cluster=CLUSTER, routes=routes,
                                  max_in_flight=2, call_timeout=10.0)
        try:
            stats = await trainer.train(task.batches(0, MICROBATCH), 6)
            assert stats.completed == 6 and stats.dropped == 0 and servers[3].served == 0
            assert trainer.stats.failed_calls >= 1  # the stranger was chosen, refused, routed around
        finally:
            await shutdown(servers, trainer)

    asyncio.run(scenario())


def test_lanes_keep_training_until_stopped_and_draw_nothing_while_a_stage_has_no_peer(one_torch_thread):
    """`train_until`, the agent's trainer loop: every lane draws its next batch as its microbatch ends
    until told to stop, then the microbatches in flight finish; with a stage unserved nothing starts
    (nothing could complete)."""
    import threading

    install_codecs()

    async def scenario() -> None:
        servers = await start_servers(per_stage=1)
        trainer = await start_trainer(servers)
        directory = {stage: [server.p2p.peer_id] for stage, server in enumerate(servers)}
        unserved = {**directory, 1: []}
        trainer.stage_peers = lambda stage: unserved[stage]
        batches = tiny_gpt_pipeline.task.batches(0, MICROBATCH)
        stop = threading.Event()
        try:
            lanes = asyncio.ensure_future(trainer.train_until(batches, stop))
            await asyncio.sleep(1.5)
            assert trainer.stats.started == 0, "a lane drew a batch while stage 1 had no peer"
            trainer.stage_peers = lambda stage: directory[stage]
            while trainer.stats.completed < 6:
                await asyncio.sleep(0.05)
            stop.set()
            stats = await asyncio.wait_for(lanes, 60)
            assert stats.started == stats.completed >= 6 and stats.dropped == 0
            assert len(trainer.take_losses()) == stats.completed and trainer.take_losses() == []
        finally:
            await shutdown(servers, trainer)

    asyncio.run(scenario())


def test_a_lane_waiting_for_a_full_stage_wakes_when_a_call_to_it_returns(one_torch_thread, monkeypatch):
    """More lanes than the peers take: the lanes beyond wait for a call to return (no polling); with
    the fallback wait made longer than the whole test may take, only those wake-ups finish it."""
    from spotrain.agents.pipeline import trainer as trainer_module

    install_codecs()
    monkeypatch.setattr(trainer_module, "WAIT_FOR_PEER_SECONDS", 600.0)

    async def scenario() -> None:
        servers = await start_servers(per_stage=1)
        trainer = await start_trainer(servers)
        trainer.routes = RouteTable(RoutingPolicy(max_in_flight=1))  # one microbatch per peer at a time
        trainer.max_in_flight = 4
        try:
            stats = await asyncio.wait_for(trainer.train(tiny_gpt_pipeline.task.batches(0, MICROBATCH), 8), 120)
            assert stats.completed == 8 and stats.dropped == 0
        finally:
            await shutdown(servers, trainer)

    asyncio.run(scenario())
