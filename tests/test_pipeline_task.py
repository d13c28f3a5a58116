"""The PipelineTask contract and tiny_gpt's pipeline form (no network)."""

from __future__ import annotations

import itertools

import pytest
import torch

from spotrain.contracts.pipeline import PipelineTask, pipeline_loss
from spotrain.examples import tiny_gpt, tiny_gpt_pipeline
from spotrain.examples.tiny_gpt_pipeline import block_ranges, make_pipeline_task


def test_stages_composed_compute_the_data_parallel_forward_and_loss():
    task = tiny_gpt_pipeline.task
    modules = [task.build_stage(stage) for stage in range(task.num_stages)]
    model = tiny_gpt.task.build_model()
    batch = next(task.batches(7, 4))
    inputs, _ = task.split_batch(batch)
    activations = inputs
    for module in modules:
        activations = module(activations)
    torch.testing.assert_close(activations, model(inputs), rtol=0, atol=0)
    torch.testing.assert_close(pipeline_loss(task, modules, batch), tiny_gpt.loss(model, batch), rtol=0, atol=0)


def test_stage_gradients_add_up_to_the_data_parallel_gradients():
    task = tiny_gpt_pipeline.task
    modules = [task.build_stage(stage) for stage in range(task.num_stages)]
    model = tiny_gpt.task.build_model()
    batch = next(task.batches(3, 4))
    pipeline_loss(task, modules, batch).backward()
    tiny_gpt.loss(model, batch).backward()
    head, middle, tail = modules
    # the tied weight's gradient is the sum of its two untied copies'
    torch.testing.assert_close(head.embed.weight.grad + tail.unembed.grad, model.embed.weight.grad)
    torch.testing.assert_close(middle.blocks[0].mlp[0].weight.grad, model.blocks[1].mlp[0].weight.grad)
    torch.testing.assert_close(tail.norm.weight.grad, model.norm.weight.grad)


def test_every_peer_of_a_stage_builds_the_same_weights_and_only_its_part():
    task = tiny_gpt_pipeline.task
    for stage in range(task.num_stages):
        first, second = task.build_stage(stage).state_dict(), task.build_stage(stage).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)
    whole = sum(p.numel() for p in tiny_gpt.task.build_model().parameters())
    parts = [sum(p.numel() for p in task.build_stage(s).parameters()) for s in range(task.num_stages)]
    # every parameter once, plus the tail's copy of the embedding
    assert sum(parts) == whole + tiny_gpt.VOCAB * 192
    assert max(parts) < whole / 2


def test_each_stage_has_its_own_optimizer_and_the_tail_is_known():
    task = tiny_gpt_pipeline.task
    modules = [task.build_stage(stage) for stage in range(task.num_stages)]
    optimizers = [task.make_optimizer(stage, module.parameters()) for stage, module in enumerate(modules)]
    assert all(isinstance(opt, torch.optim.Adam) for opt in optimizers)
    assert {id(p) for p in optimizers[0].param_groups[0]["params"]} == {id(p) for p in modules[0].parameters()}
    assert [task.is_tail(stage) for stage in range(3)] == [False, False, True]
    with pytest.raises(IndexError):
        task.build_stage(3)


@pytest.mark.parametrize("depth,stages", [(3, 3), (4, 3), (5, 2), (7, 4)])
def test_block_ranges_cover_every_block_once(depth, stages):
    ranges = block_ranges(depth, stages)
    assert len(ranges) == stages and all(len(r) >= 1 for r in ranges)
    assert list(itertools.chain.from_iterable(ranges)) == list(range(depth))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_a_pipeline_with_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot cut 2 blocks into 3 stages"):
        make_pipeline_task(width=32, depth=2, heads=2, context=16, stages=3)


def test_the_contract_checks_its_stage_and_optimizer_counts():
    one = (lambda: torch.nn.Identity(),)
    sgd = (lambda params: torch.optim.SGD(params, lr=0.1),)
    with pytest.raises(ValueError, match="at least 2 stages"):
        PipelineTask(stages=one, optimizers=sgd, batches=tiny_gpt.batches,
                     split_batch=tiny_gpt_pipeline.split_batch, loss=tiny_gpt_pipeline.loss)
    with pytest.raises(ValueError, match="as many optimizer factories"):
        PipelineTask(stages=one * 2, optimizers=sgd, batches=tiny_gpt.batches,
                     split_batch=tiny_gpt_pipeline.split_batch, loss=tiny_gpt_pipeline.loss)
