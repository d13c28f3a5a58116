"""The controller's pure rule: which instances to revoke for poisoning, from the agents' counts."""

from dataclasses import replace

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState
from spotrain.offenders import instances_to_revoke, peer_ids_of


def agent(instance_id: str, **offenders: int) -> AgentStatus:
    return AgentStatus(instance_id, AgentState.TRAINING, epoch=3, samples=10, samples_per_second=1.5, loss=None,
                       bytes_sent=1, bytes_received=2, checkpoint_epoch=None,
                       addresses=(f"/ip4/127.0.0.1/tcp/1/p2p/Qm{instance_id}", "/ip4/10.0.0.1/tcp/1"), time=1.0,
                       offenders={f"Qm{peer}": count for peer, count in offenders.items()})


def fleet(*statuses: AgentStatus) -> dict[str, AgentStatus]:
    return {s.instance_id: s for s in statuses}


def test_peer_ids_come_from_the_announced_addresses():
    assert peer_ids_of(agent("a")) == {"Qma"}


def test_an_instance_a_majority_of_the_others_counted_enough_times_is_revoked():
    assert instances_to_revoke(fleet(agent("a", evil=3), agent("b", evil=5), agent("evil", a=9))) == ["evil"]
    # under the threshold, or one accuser of two: nobody
    assert instances_to_revoke(fleet(agent("a", evil=2), agent("b", evil=2), agent("evil"))) == []
    assert instances_to_revoke(fleet(agent("a", evil=3), agent("b"), agent("evil"))) == []


def test_one_liar_cannot_have_an_honest_agent_revoked_but_two_agents_accusing_each_other_both_go():
    assert instances_to_revoke(fleet(agent("a"), agent("b"), agent("c"), agent("liar", a=100))) == []
    assert instances_to_revoke(fleet(agent("a", evil=3), agent("evil", a=3))) == ["a", "evil"]
    assert instances_to_revoke(fleet(agent("a", evil=3))) == []  # nobody to witness


def test_an_agent_without_a_peer_id_is_never_picked():
    hidden = replace(agent("evil"), addresses=("/ip4/10.0.0.1/tcp/1",))
    assert instances_to_revoke(fleet(agent("a", evil=9), agent("b", evil=9), hidden)) == []
