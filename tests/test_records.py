"""The swarm's DHT records: tolerant parsing, the newest status per instance, the duty record."""

from types import SimpleNamespace

from spotrain.contracts.records import AgentStatus, newest_statuses
from spotrain.contracts.states import AgentState


def status(instance_id: str, at: float, state: AgentState = AgentState.TRAINING) -> AgentStatus:
    return AgentStatus(instance_id, state, epoch=3, samples=10, samples_per_second=1.5, loss=None, bytes_sent=1,
                       bytes_received=2, checkpoint_epoch=None, addresses=("/ip4/1.2.3.4/tcp/1",), time=at)


def found(*records: object) -> SimpleNamespace:
    """What DHT.get(key, latest=True) returns for a key with subkeys."""
    return SimpleNamespace(value={f"subkey{i}": SimpleNamespace(value=r) for i, r in enumerate(records)})


def test_a_status_round_trips_with_its_state_as_plain_text():
    record = status("i-a", 5.0, AgentState.DRAINING).to_record()
    assert record["state"] == "draining" and type(record["state"]) is str
    parsed = AgentStatus.from_record(record)
    assert parsed == status("i-a", 5.0, AgentState.DRAINING) and parsed.state is AgentState.DRAINING


def test_unknown_states_and_malformed_records_are_skipped():
    assert AgentStatus.from_record({**status("i-a", 1.0).to_record(), "state": "hibernating"}) is None
    assert AgentStatus.from_record({"instance_id": "i-a"}) is None
    assert AgentStatus.from_record("garbage") is None


def test_the_newest_status_of_each_instance_wins():
    older, newer, other = status("i-a", 1.0), status("i-a", 2.0, AgentState.DRAINING), status("i-b", 1.5)
    got = newest_statuses(found(newer.to_record(), older.to_record(), other.to_record(), {"bad": 1}), 10.0, None)
    assert got == {"i-a": newer, "i-b": other}
    assert newest_statuses(None, 10.0, None) == {} and newest_statuses(SimpleNamespace(value=[1]), 10.0, None) == {}


def test_counters_must_be_non_negative_integers_and_times_finite():
    good = status("i-a", 1.0).to_record()
    for key, bad in [("epoch", -1), ("epoch", 1.5), ("samples", True), ("samples", "9"), ("time", float("nan")),
                     ("samples_per_second", float("inf")), ("loss", float("nan")), ("bytes_sent", -5)]:
        assert AgentStatus.from_record({**good, key: bad}) is None, (key, bad)


def test_offence_counts_round_trip_and_a_malformed_or_oversized_table_is_refused():
    from dataclasses import replace

    from spotrain.contracts.records import MAX_OFFENDERS

    accusing = replace(status("i-a", 1.0), offenders={"QmEvil": 4})
    assert AgentStatus.from_record(accusing.to_record()) == accusing
    assert AgentStatus.from_record(status("i-a", 1.0).to_record()).offenders == {}  # an older agent: none
    record = status("i-a", 1.0).to_record()
    for bad in ([["QmEvil", 4]], {"QmEvil": -1}, {"QmEvil": 1.5}, {"QmEvil": True}, {"": 1}, {"x" * 129: 1},
                {f"Qm{i}": 1 for i in range(MAX_OFFENDERS + 1)}):
        assert AgentStatus.from_record({**record, "offenders": bad}) is None
