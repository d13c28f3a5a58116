"""A stage peer's computation (agents/pipeline/stage_compute.py) against the whole model's, with
the real tiny_gpt stages: microbatches in flight within a step are exactly data parallelism's
accumulated batch, and a backward that crosses a step uses the parameters its forward used."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.serializer import MSGPackSerializer

from spotrain.agents.pipeline.protocol import StageUnavailable, request_message, request_version
from spotrain.agents.pipeline.stage_compute import NonFiniteLoss, StageCompute, step_samples_per_peer
from spotrain.contracts.pipeline import pipeline_loss
from spotrain.examples import tiny_gpt_pipeline

TASK = tiny_gpt_pipeline.task
MICROBATCH = 4


def microbatches(count: int, seed: int = 0) -> list[torch.Tensor]:
    batches = TASK.batches(seed, MICROBATCH)
    return [next(batches) for _ in range(count)]


def run_interleaved(stages: list[StageCompute], batches: list[torch.Tensor]) -> list[float]:
    """Every microbatch forward through every stage first, then each one's tail and backward: all
    of them in flight at once, as a trainer's lanes interleave them."""
    tail = len(stages) - 1
    inputs = []
    for batch in batches:
        source, targets = TASK.split_batch(batch)
        per_stage = [(source, None)]
        for stage in stages[:tail]:
            output, version = stage.forward(per_stage[-1][0])
            per_stage.append((output, version))
        inputs.append((per_stage, targets))
    losses = []
    for per_stage, targets in inputs:
        grad, loss = stages[tail].tail(per_stage[tail][0].clone(), targets)
        losses.append(loss)
        for index in reversed(range(tail)):
            source = per_stage[index][0].clone()
            version = per_stage[index + 1][1]
            grad = stages[index].backward(source, grad, version)
    return losses


def data_parallel_steps(steps: list[list[torch.Tensor]]) -> list[torch.nn.Module]:
    """The whole model (the stages composed in one process), one Adam step per list of microbatches
    on their mean gradient: hivemind's Optimizer accumulating `batch_size` steps to its target."""
    modules = [TASK.build_stage(stage) for stage in range(TASK.num_stages)]
    optimizers = [TASK.make_optimizer(stage, module.parameters()) for stage, module in enumerate(modules)]
    for batches in steps:
        for batch in batches:
            (pipeline_loss(TASK, modules, batch) * batch.shape[0]).backward()
        for module in modules:
            for param in module.parameters():
                assert param.grad is not None
                param.grad.div_(sum(batch.shape[0] for batch in batches))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return modules


def assert_same_parameters(stages: list[StageCompute], modules: list[torch.nn.Module]) -> None:
    for stage, module in zip(stages, modules, strict=True):
        for (name, mine), theirs in zip(stage.module.named_parameters(), module.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=f"stage {stage.stage} {name}")


def test_microbatches_in_flight_within_a_step_train_exactly_as_data_parallelism():
    torch.manual_seed(0)
    batches = microbatches(6)
    stages = [StageCompute(TASK, stage, step_samples=3 * MICROBATCH) for stage in range(TASK.num_stages)]
    for step in (batches[:3], batches[3:]):
        run_interleaved(stages, step)
    assert all(stage.steps == 2 and stage.accumulated == 0 and stage.stale_backwards == 0 for stage in stages)
    assert_same_parameters(stages, data_parallel_steps([batches[:3], batches[3:]]))


def test_stepping_on_every_microbatch_with_two_in_flight_differs_from_data_parallelism():
    """The old schedule (a step per microbatch, two in flight) is not data parallelism's, so the
    comparison above can fail."""
    batches = microbatches(2)
    stages = [StageCompute(TASK, stage, step_samples=MICROBATCH) for stage in range(TASK.num_stages)]
    run_interleaved(stages, batches)
    reference = data_parallel_steps([[batch] for batch in batches])
    with pytest.raises(AssertionError):
        assert_same_parameters(stages, reference)


def test_a_backward_after_a_step_uses_the_parameters_its_forward_used():
    stage = StageCompute(TASK, 1, step_samples=2 * MICROBATCH)  # a middle stage
    before = TASK.build_stage(1)  # the parameters all three forwards use
    inputs = [torch.randn(MICROBATCH, 8, 192) for _ in range(3)]
    grads = [torch.randn(MICROBATCH, 8, 192) for _ in range(3)]
    versions = [stage.forward(source)[1] for source in inputs]
    assert len(set(versions)) == 1
    for index in (0, 1):  # the second backward steps while the third forward awaits its backward
        stage.backward(inputs[index].clone(), grads[index], versions[index])
    assert stage.steps == 1
    got = stage.backward(inputs[2].clone(), grads[2], versions[2])
    expected_source = inputs[2].clone().requires_grad_()
    before(expected_source).backward(grads[2])
    assert stage.stale_backwards == 1 and stage.steps == 1 and stage.accumulated == MICROBATCH
    torch.testing.assert_close(got, expected_source.grad)
    # its parameters' gradient (at the old parameters) waits for the next step, weighted by its samples
    for live, old in zip(stage.module.parameters(), before.parameters(), strict=True):
        assert old.grad is not None
        torch.testing.assert_close(live.grad, old.grad * MICROBATCH, rtol=1e-5, atol=1e-6)


def test_a_backward_of_another_version_uses_the_current_parameters():
    stage = StageCompute(TASK, 1, step_samples=MICROBATCH)
    source, grad = torch.randn(MICROBATCH, 8, 192), torch.randn(MICROBATCH, 8, 192)
    stage.forward(source)
    stage.backward(source.clone(), grad, stage.version)  # steps; nothing open, nothing stashed
    current = TASK.build_stage(1)
    current.load_state_dict(stage.module.state_dict())
    expected = source.clone().requires_grad_()
    current(expected).backward(grad)
    foreign = (stage.token + 1, 0)  # a retry from another peer's forward
    torch.testing.assert_close(stage.backward(source.clone(), grad, foreign), expected.grad)
    assert stage.stale_backwards == 0


def test_a_restored_stage_forgets_what_it_accumulated_and_stashed():
    stage = StageCompute(TASK, 1, step_samples=2 * MICROBATCH)
    source, grad = torch.randn(MICROBATCH, 8, 192), torch.randn(MICROBATCH, 8, 192)
    stage.backward(source, grad, None)
    assert stage.accumulated == MICROBATCH
    stage.steps = 7
    assert stage.accumulated == 0 and stage.version == (stage.token, 7)
    assert all(param.grad is None for param in stage.module.parameters())


def test_a_non_finite_loss_is_refused_and_nothing_is_accumulated():
    stage = StageCompute(TASK, TASK.num_stages - 1, step_samples=MICROBATCH)
    source = torch.full((MICROBATCH, 8, 192), float("nan"))
    with pytest.raises(NonFiniteLoss):
        stage.tail(source, torch.zeros(MICROBATCH, 8, dtype=torch.long))
    assert stage.accumulated == 0 and stage.steps == 0


def test_a_backward_request_carries_its_version_and_a_malformed_one_is_refused():
    assert request_version(request_message([], (5, 2))) == (5, 2)
    assert request_version(request_message([])) is None
    for bad in ({"version": [1]}, {"version": [-1, 2]}, {"version": [True, 2]}, {"version": "x"}, [1, 2]):
        with pytest.raises(StageUnavailable):
            request_version(runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps(bad)))


def test_the_stage_peers_share_the_target_batch_and_step_on_at_least_a_microbatch():
    assert step_samples_per_peer(64, 4, 4) == 16  # four peers of a stage, a quarter of the batch each
    assert step_samples_per_peer(64, 4, 3) == 22  # rounded up: never more steps than data parallelism
    assert step_samples_per_peer(8, 4, 4) == 4
    assert step_samples_per_peer(64, 4, 0) == 64
