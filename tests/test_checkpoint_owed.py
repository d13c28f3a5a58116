"""A checkpoint that falls due while hivemind's delayed update runs in the background is owed, not
waited for: the training thread snapshots it at the first step boundary where the update has
finished and been applied, so parameters and optimizer state belong to one step; a drain still
writes what is owed, waiting for the update if it has to.

One real agent role (DataParallelRole: hivemind.Optimizer with delayed updates, a real DHT, a
checkpoint store on disk) alone in its swarm. The test holds the averager's optimizer lock, which
hivemind's background step takes before it touches the optimizer: the update stays pending for
as long as the test wants, with no timing involved.
"""

import concurrent.futures
import threading
from pathlib import Path

import hivemind
import pytest
import torch
from conftest import agent_config

from spotrain.agents.progress import Progress
from spotrain.agents.roles.base import RoleContext
from spotrain.agents.roles.data_parallel import DataParallelRole
from spotrain.stores import ANY_WRITER, ReplicatedStore, named_constants

MAX_STEPS = 200  # steps allowed for the first epoch to pass alone (target batch = one local batch)


@pytest.fixture
def role(tmp_path: Path):
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    config = agent_config("owed", training={
        "batch_size": 4, "target_batch_size": 4, "delayed_updates": True, "matchmaking_time": 1.0,
        "averaging_timeout": 5.0, "compression": {"gradients": "float16", "state": "none"}},
        checkpoint={"store": str(tmp_path / "ckpt"), "every_epochs": 1})
    role = DataParallelRole()
    role.start(RoleContext(config, "i-owed", dht, Progress(), has_duty=lambda: True,
                           checkpoint_soon=threading.Event(), checkpoint_trust=ANY_WRITER, checkpoint_signer=None))
    yield role
    role.shutdown()
    dht.shutdown()


def step_into_epoch_one_with_the_update_held(role: DataParallelRole) -> tuple[list[torch.Tensor], int]:
    """Steps until epoch 1 begins, the background optimizer step of epoch 0 blocked on the lock the
    caller holds; the parameters and the optimizer's step count before it."""
    training = role._started()
    before = [p.detach().clone() for p in training.model.parameters()]
    steps_before = optimizer_steps(training.optimizer)
    batches = training.task.batches(0, 4)
    for _ in range(MAX_STEPS):
        role.train_step(next(batches))
        if training.optimizer.local_epoch == 1:
            assert training.optimizer.samples_counted > 0  # alone, every step is in sync with the swarm
            return before, steps_before
    raise AssertionError(f"no epoch passed in {MAX_STEPS} steps")


def optimizer_steps(optimizer) -> int:
    """The step count hivemind's (offloaded) Adam holds for the first parameter."""
    state = optimizer.state_averager.optimizer.state
    return int(next(iter(state.values()))["step"])


def offloaded_parameters(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.state_averager.optimizer.param_groups for p in group["params"]]


def stored(tmp_path: Path, role: DataParallelRole):
    training = role._started()
    assert training.writer.flush(30.0)
    constants = named_constants([f"model.{name}" for name, _ in training.model.named_buffers()])
    return ReplicatedStore.from_urls([str(tmp_path / "ckpt")], trust=ANY_WRITER).load_newest(constants)


def test_an_owed_checkpoint_is_snapshotted_once_the_background_update_is_applied(tmp_path, role):
    training = role._started()
    averager = training.optimizer.state_averager
    with averager.lock_optimizer:
        before, steps_before = step_into_epoch_one_with_the_update_held(role)
        assert averager.pending_updates and not any(u.done() for u in averager.pending_updates)
        role._snapshot_owed_if_settled("before a step,")  # what every step does: pending, so nothing
        assert role._submitted is None and role._owed is not None
    concurrent.futures.wait(list(averager.pending_updates))
    # finished, not yet applied: the model still has epoch 0's parameters
    assert all(torch.equal(p, b) for p, b in zip(training.model.parameters(), before))
    role._snapshot_owed_if_settled("before a step,")
    assert role._submitted == 1 and role._owed is None
    checkpoint = stored(tmp_path, role)
    assert checkpoint is not None and checkpoint.epoch == 1
    saved = [checkpoint.state["model"][name] for name, _ in training.model.named_parameters()]
    # the update is in the snapshot, the offloaded optimizer's parameters are the model's, and
    # the optimizer state is that of the same step
    assert any(not torch.equal(s, b) for s, b in zip(saved, before))
    assert all(torch.equal(s, o.detach()) for s, o in zip(saved, offloaded_parameters(training.optimizer)))
    assert optimizer_steps(training.optimizer) == steps_before + 1
    first = next(iter(checkpoint.state["optimizer"]["state"].values()))
    assert int(first["step"]) == steps_before + 1 and checkpoint.state["optimizer"]["state"]["local_epoch"] == 1


def test_a_drain_writes_the_owed_checkpoint_waiting_for_the_update(tmp_path, role):
    training = role._started()
    averager = training.optimizer.state_averager
    with averager.lock_optimizer:
        before, steps_before = step_into_epoch_one_with_the_update_held(role)
        assert role._submitted is None and role._owed is not None
        training.context.draining.set()  # the notice: steps no longer snapshot, flush_duty does
    role.flush_duty()  # waits for the update the test just let go
    assert role._owed is None and not averager.pending_updates
    checkpoint = stored(tmp_path, role)
    assert checkpoint is not None and checkpoint.epoch == 1
    saved = [checkpoint.state["model"][name] for name, _ in training.model.named_parameters()]
    assert all(torch.equal(s, o.detach()) for s, o in zip(saved, offloaded_parameters(training.optimizer)))
    assert any(not torch.equal(s, b) for s, b in zip(saved, before))
    assert int(next(iter(checkpoint.state["optimizer"]["state"].values()))["step"]) == steps_before + 1


def test_hivemind_waiting_for_the_update_before_the_next_epoch_snapshots_what_is_owed(tmp_path, role):
    training = role._started()
    averager = training.optimizer.state_averager
    with averager.lock_optimizer:
        before, steps_before = step_into_epoch_one_with_the_update_held(role)
        assert role._submitted is None and role._owed is not None
    # what hivemind.Optimizer calls before it schedules the next epoch's update (_update_global_epoch)
    averager.step(wait_for_delayed_updates=True)
    assert role._submitted == 1 and role._owed is None
    checkpoint = stored(tmp_path, role)
    assert checkpoint is not None and checkpoint.epoch == 1
    saved = [checkpoint.state["model"][name] for name, _ in training.model.named_parameters()]
    assert all(torch.equal(s, p.detach()) for s, p in zip(saved, training.model.parameters()))  # applied
    assert any(not torch.equal(s, b) for s, b in zip(saved, before))
    assert int(next(iter(checkpoint.state["optimizer"]["state"].values()))["step"]) == steps_before + 1


def test_a_new_role_resumes_the_snapshot_into_its_built_optimizer(tmp_path, role):
    """The checkpoint is read while the optimizer is built, then loaded into it: the model, hivemind's
    offloaded copy of the parameters, the optimizer state and the epoch are all the checkpoint's."""
    training = role._started()
    with training.optimizer.state_averager.lock_optimizer:
        step_into_epoch_one_with_the_update_held(role)
    role.flush_duty()
    saved = stored(tmp_path, role)
    assert saved is not None and saved.epoch == 1
    dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)  # a swarm of its own: no peer to ask
    resumed = DataParallelRole()
    try:
        resumed.start(RoleContext(training.context.config, "i-resumed", dht, Progress(), has_duty=lambda: True,
                                  checkpoint_soon=threading.Event(), checkpoint_trust=ANY_WRITER,
                                  checkpoint_signer=None))
        new = resumed._started()
        assert new.optimizer.local_epoch == 1 and new.context.progress.checkpoint_epoch == 1
        names = [name for name, _ in new.model.named_parameters()]
        assert all(torch.equal(p.detach(), saved.state["model"][n]) for n, p in zip(names, new.model.parameters()))
        assert all(torch.equal(o.detach(), saved.state["model"][n])
                   for n, o in zip(names, offloaded_parameters(new.optimizer)))
        assert optimizer_steps(new.optimizer) == int(next(iter(saved.state["optimizer"]["state"].values()))["step"])
    finally:
        resumed.shutdown()
        dht.shutdown()
