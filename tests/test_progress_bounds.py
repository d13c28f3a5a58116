"""The controller believes only the progress the agents' samples make plausible (spotrain/progress_bounds.py)."""

from dataclasses import replace

from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import AgentState
from spotrain.progress_bounds import STALL_SECONDS, ProgressBounds


def status(instance_id: str, epoch: int, samples: int, at: float, state=AgentState.TRAINING) -> AgentStatus:
    return AgentStatus(instance_id, state, epoch=epoch, samples=samples, samples_per_second=10.0, loss=1.0,
                       bytes_sent=0, bytes_received=0, checkpoint_epoch=None, addresses=(), time=at)


def bounds() -> ProgressBounds:
    return ProgressBounds(target_batch_size=100, max_rate=lambda instance: 50.0)


def test_honest_progress_is_believed_as_claimed():
    b = bounds()
    launched = {"i-a": 0.0, "i-b": 0.0}
    for t in range(1, 20):
        seen = b.bound({i: status(i, t // 2, 40 * t, float(t)) for i in launched}, launched, float(t))
        assert all(s.samples == 40 * t and s.epoch == t // 2 for s in seen.values())
        assert all(s.state == AgentState.TRAINING for s in seen.values())


def test_a_forged_epoch_and_sample_count_are_clamped_to_what_samples_pay_for():
    b = bounds()
    launched = {"i-a": 0.0, "i-b": 0.0, "i-liar": 0.0}
    b.bound({i: status(i, 0, 0, 0.0) for i in launched}, launched, 0.0)
    for t in range(1, 11):  # two honest agents: 40 samples/s each; the liar claims everything
        claims = {i: status(i, t * 80 // 100, 40 * t, float(t)) for i in ("i-a", "i-b")}
        claims["i-liar"] = status("i-liar", 10**6, 10**12, float(t))
        seen = b.bound(claims, launched, float(t))
    assert seen["i-liar"].samples <= 50 * 10  # at most its plausible rate since launch
    paid = (80 + 50) * 10 // 100  # every sample believed, in epochs
    assert b.epoch <= paid + 2 * 10 and seen["i-liar"].epoch == b.epoch  # per look: rounding up, +1
    assert b.epoch < 10**6


def test_one_liar_cannot_set_the_first_epoch_of_a_run():
    b = bounds()
    launched = {"i-a": 0.0, "i-b": 0.0, "i-liar": 0.0}
    b.bound({"i-a": status("i-a", 40, 0, 1.0), "i-b": status("i-b", 40, 0, 1.0),
             "i-liar": status("i-liar", 10**6, 0, 1.0)}, launched, 1.0)
    assert b.epoch == 40  # a resumed swarm's epoch, not the liar's


def test_an_agent_whose_samples_do_not_advance_is_not_training():
    b = bounds()
    launched = {"i-a": 0.0}
    b.bound({"i-a": status("i-a", 0, 100, 10.0)}, launched, 10.0)
    seen = b.bound({"i-a": status("i-a", 0, 100, 10.0 + STALL_SECONDS)}, launched, 10.0 + STALL_SECONDS)
    assert seen["i-a"].state == AgentState.STARTING
    seen = b.bound({"i-a": status("i-a", 0, 150, 11.0 + STALL_SECONDS)}, launched, 11.0 + STALL_SECONDS)
    assert seen["i-a"].state == AgentState.TRAINING
    draining = b.bound({"i-a": status("i-a", 0, 150, 200.0, AgentState.DRAINING)}, launched, 200.0)
    assert draining["i-a"].state == AgentState.DRAINING  # only "training" needs proof


def test_a_stage_peer_trains_while_the_microbatches_it_serves_grow():
    """SWARM stage peers count no samples (their trainers do): the calls they answer are their progress."""
    b = ProgressBounds(64, lambda _: 1000.0)
    launched = {"s": 0.0}

    def look(served: int, now: float) -> AgentState:
        record = replace(status("s", 0, 0, now), role="stage", served=served)
        return b.bound({"s": record}, launched, now)["s"].state

    assert look(0, 0.0) == AgentState.TRAINING
    assert look(10, 50.0) == AgentState.TRAINING
    assert look(25, 100.0) == AgentState.TRAINING  # 50 s after the first look: still advancing
    assert look(25, 130.0) == AgentState.TRAINING
    assert look(25, 170.0) == AgentState.STARTING  # nothing served for 70 s: stalled
    assert look(26, 171.0) == AgentState.TRAINING
