"""An admitted peer turns malicious inside hivemind's all-reduce: real p2p daemons on 127.0.0.1,
hivemind's own AllReduceRunner for the attacker, spotrain's guarded runner for the honest peers.

Three peers, one part of 1,000 values each to average (the attacker averages the last third,
so its replies are poisoned too). The honest peers must end finite, with the honest mean on
the slices honest peers average and their own values on the attacker's, and each must count
the attacker once per round.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator  # noqa: UP035 - hivemind recognises typing's alias only

import pytest
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import averaging_pb2

from spotrain.kernels.poison_guard import GuardedAllReduceRunner, offences

SIZE, PART = 3000, 1000  # three peers, one part each: the last third is the attacker's to average


class Averaging(ServicerBase):
    """What DecentralizedAverager does for its runners: one handler name for every peer."""

    def __init__(self) -> None:
        self.runner: AllReduceRunner | None = None

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData],
                                 context: P2PContext) -> AsyncIterator[averaging_pb2.AveragingData]:
        assert self.runner is not None
        async for message in self.runner.rpc_aggregate_part(stream, context):
            yield message


def honest_tensor(index: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(SIZE, generator=torch.Generator().manual_seed(index)) * scale


async def average(tensors: list[torch.Tensor], weights: list[float], guarded: list[bool]) -> list[torch.Tensor]:
    p2ps: list[P2P] = []
    try:
        for _ in tensors:  # each knows every peer before it, so each pair has dialled once
            known = [a for p2p in p2ps for a in await p2p.get_visible_maddrs()]
            p2ps.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=known))
        peers = [p2p.peer_id for p2p in p2ps]
        results = [t.clone() for t in tensors]
        runners = []
        for p2p, result, weight, guard in zip(p2ps, results, weights, guarded):
            servicer = Averaging()
            await servicer.add_p2p_handlers(p2p)
            runner_class = GuardedAllReduceRunner if guard else AllReduceRunner
            servicer.runner = runner_class(p2p=p2p, servicer_type=Averaging, prefix=None, group_id=b"poison-test",
                                           tensors=[result], weight=weight, ordered_peer_ids=peers,
                                           peer_fractions=(1.0,) * len(peers), part_size_bytes=PART * 4)
            runners.append(servicer.runner)

        async def run(runner: AllReduceRunner, result: torch.Tensor) -> None:
            async for delta in runner:
                result.add_(delta)

        await asyncio.wait_for(asyncio.gather(*(run(r, t) for r, t in zip(runners, results))), 60)
        return results
    finally:
        for p2p in p2ps:
            await p2p.shutdown()


def _new_offences(before: dict[str, int]) -> int:
    after = offences.snapshot()
    return sum(count - before.get(peer, 0) for peer, count in after.items())


@pytest.mark.parametrize("attack, weight", [
    (torch.full((SIZE,), float("nan")), 1.0),
    (torch.full((SIZE,), float("inf")), 1.0),
    (honest_tensor(2) * 1e6, 1.0),  # finite, huge norm
    (honest_tensor(2), float("inf")),  # a plausible part with an infinite weight
], ids=["nan", "inf", "huge-norm", "inf-weight"])
def test_a_malicious_peer_is_dropped_at_the_receivers_and_counted(attack, weight):
    before = offences.snapshot()
    honest = [honest_tensor(0), honest_tensor(1, 2.0)]
    results = asyncio.run(average([*honest, attack], [1.0, 1.0, weight], [True, True, False]))
    mean = (honest[0] + honest[1]) / 2
    for own, result in zip(honest, results):
        assert bool(torch.isfinite(result).all())
        torch.testing.assert_close(result[: 2 * PART], mean[: 2 * PART])  # averaged by honest peers
        torch.testing.assert_close(result[2 * PART:], own[2 * PART:])  # the attacker's slice: kept
    assert _new_offences(before) == 2  # each honest peer counted the attacker once this round


def test_honest_peers_of_different_scales_are_all_averaged_and_nobody_is_counted():
    before = offences.snapshot()
    tensors = [honest_tensor(0), honest_tensor(1, 3.0), honest_tensor(2, 0.5)]
    results = asyncio.run(average(tensors, [1.0, 2.0, 1.0], [True, True, True]))
    mean = (tensors[0] + 2 * tensors[1] + tensors[2]) / 4
    for result in results:
        torch.testing.assert_close(result, mean)
    assert _new_offences(before) == 0
