"""SWARM stage duty, stage stores, measured stage costs and the worker-memory check: pure parts."""

from __future__ import annotations

import pytest

from spotrain.agents.pipeline.balance import best_move, measured_stage_costs
from spotrain.agents.pipeline.stage_checkpoints import stage_duty_holders, stage_store_url
from spotrain.contracts.stage_records import StageRecord
from spotrain.contracts.states import AgentState
from spotrain.worker_memory import BYTES_PER_PARAMETER, memory_refusal, training_bytes


def record(stage: int, peer: str, speed: float, state: AgentState = AgentState.TRAINING) -> StageRecord:
    return StageRecord(stage, peer, f"i-{peer}", speed, 0, state, 0.0)


def test_duty_goes_to_the_first_serving_peer_and_moves_on_when_it_drains():
    records = [record(0, "b", 1.0), record(0, "a", 1.0), record(1, "c", 1.0)]
    assert stage_duty_holders(records, 0) == ["a"] and stage_duty_holders(records, 1) == ["c"]
    drained = [record(0, "a", 1.0, AgentState.DRAINING)] + records[:1] + records[2:]
    assert stage_duty_holders(drained, 0) == ["b"]
    assert stage_duty_holders(records, 0, replicas=2) == ["a", "b"]


def test_each_stage_checkpoints_under_its_own_prefix():
    assert stage_store_url("s3://bucket/run/", 2) == "s3://bucket/run/stage2"
    assert stage_store_url("/var/ckpt", 0) == "/var/ckpt/stage0"


def test_stage_costs_come_from_the_median_peer_of_each_stage():
    records = [record(0, "a", 10.0), record(0, "b", 10.0), record(1, "c", 5.0), record(1, "d", 4.0),
               record(1, "e", 6.0), record(2, "f", 0.0, AgentState.STARTING)]
    costs = measured_stage_costs(records, 3)
    assert costs[0] == pytest.approx(0.1) and costs[1] == pytest.approx(0.2)
    assert costs[2] == pytest.approx(1 / 6)  # nothing measured there: the median of every serving peer
    assert measured_stage_costs([], 2) == [1.0, 1.0]


def test_a_peer_moving_to_a_slower_stage_is_predicted_at_that_stage_speed():
    # stage 0 peers serve 10 samples/s, stage 1 peers 5: stage 1 (2 peers, 10) limits stage 0 (4 peers, 40)
    records = [record(0, p, 10.0) for p in "abcd"] + [record(1, p, 5.0) for p in "ef"]
    move = best_move(records, 2, stage_costs=measured_stage_costs(records, 2))
    assert move is not None and move.source == 0 and move.target == 1
    assert move.throughput_after == pytest.approx(15.0)  # the mover serves stage 1 at 5, not at 10


def test_a_whole_model_over_the_worker_memory_is_refused_and_its_stages_fit():
    whole, parameters = training_bytes("spotrain.examples.wide_gpt:task", pipeline=False)
    stage, stage_parameters = training_bytes("spotrain.examples.wide_gpt:pipeline", pipeline=True)
    assert whole == parameters * BYTES_PER_PARAMETER and stage == stage_parameters * BYTES_PER_PARAMETER
    assert stage < whole / 3
    refusal = memory_refusal("spotrain.examples.wide_gpt:task", False, 0.25)
    assert refusal is not None and "\n" not in refusal and "training.mode: swarm" in refusal
    assert memory_refusal("spotrain.examples.wide_gpt:pipeline", True, 0.25) is None


def test_the_cli_refuses_data_parallelism_over_the_worker_memory_in_one_line(tmp_path):
    from conftest import ROOT, run_cli

    spec = tmp_path / "wide.yaml"
    spec.write_text("name: wide\nbudget: {total_usd: 1}\n"
                    "training: {task: 'spotrain.examples.wide_gpt:task', memory_per_worker_gb: 0.25}\n")
    result = run_cli("plan", str(spec), home=tmp_path / "home")
    assert result.returncode != 0 and "memory_per_worker_gb" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_cli("plan", str(ROOT / "examples" / "local-swarm-wide.yaml"), home=tmp_path / "home").returncode == 0
