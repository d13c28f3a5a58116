"""Chaos: kill -9 of an agent, of the duty holder, of the controller (then relaunched); a notice to
every VM at once; every VM killed at once. Real agents and controller on the local provider; each
case ends with `down` and asserts the invariants of invariants.py (nothing durable lost, every
checkpoint whole and finite, the ledger balanced, spend within the budget, nothing left running)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import processes_under, run_cli, wait_for

from .invariants import (
    CLUSTER,
    Samples,
    agent_pid,
    down_and_check,
    duty_holders,
    launch,
    newest_valid,
    spec_file,
    status,
    supervisor_pid,
    training,
    vm_dirs,
    wait_for_checkpoint_after,
)


def started(tmp_path) -> tuple:
    home = tmp_path / "home"
    samples = Samples()
    running = launch(home, spec_file(tmp_path), workers=2)
    first = wait_for_checkpoint_after(home, samples, -1, 240)
    return home, samples, running, first


@pytest.mark.slow  # 256 s on 2 shared cores: more than the default suite's 15 minutes leave room for
def test_kill_9_of_an_agent_loses_nothing(tmp_path):
    """The VM's supervisor restarts the agent, as systemd would."""
    home, samples, running, first = started(tmp_path)
    vm = vm_dirs(home, running)[0]
    os.kill(agent_pid(vm), signal.SIGKILL)
    wait_for_checkpoint_after(home, samples, first, 240)
    wait_for(lambda: training(home, 2), 180, "both workers training again", every=1.0)
    down_and_check(home, samples)


@pytest.mark.slow
def test_kill_9_of_the_duty_holder_moves_duty_and_loses_nothing(tmp_path):
    home, samples, running, first = started(tmp_path)
    holders = wait_for(lambda: duty_holders(home), 60, "a duty holder")
    vm = home / "local-cloud" / "vms" / holders[0]
    os.kill(agent_pid(vm), signal.SIGKILL)
    wait_for_checkpoint_after(home, samples, first, 240)
    down_and_check(home, samples)


@pytest.mark.slow
def test_kill_9_of_the_controller_then_relaunch_loses_nothing(tmp_path):
    home, samples, running, first = started(tmp_path)
    os.kill(running["controller_pid"], signal.SIGKILL)
    wait_for(lambda: (s := status(home)) is not None and s["controller_pid"] is None, 30, "the lock to drop")
    result = run_cli("launch", str(tmp_path / "chaos.yaml"), "--detach", home=home, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_checkpoint_after(home, samples, first, 240)
    log = (home / "clusters" / CLUSTER / "controller.log").read_text()
    assert "adopting 2 running instance(s)" in log
    down_and_check(home, samples)


@pytest.mark.slow
def test_a_notice_to_every_vm_at_once_leaves_a_checkpoint_of_the_epoch_in_progress(tmp_path):
    home, samples, running, first = started(tmp_path)
    vms = vm_dirs(home, running)
    in_progress = samples.take(home)["epoch"]
    for vm in vms:  # SIGTERM to a local VM is a user's termination: a notice, the drain window, the kill
        os.kill(supervisor_pid(vm), signal.SIGTERM)
    wait_for(lambda: all(not processes_under(vm) for vm in vms), 60, "every noticed VM gone")
    newest = newest_valid(home)
    assert newest is not None and newest >= in_progress, (newest, in_progress)
    logs = "\n".join((vm / "agent.log").read_text() for vm in vms)
    assert f"checkpoint epoch {newest}" in logs  # the holder that wrote it says so
    wait_for(lambda: training(home, 2), 240, "the replacements training", every=1.0)
    wait_for_checkpoint_after(home, samples, newest, 240)
    down_and_check(home, samples)


@pytest.mark.slow
def test_every_vm_killed_at_once_resumes_from_the_store_without_waiting_on_dead_peers(tmp_path):
    home, samples, running, first = started(tmp_path)
    vms = vm_dirs(home, running)
    before = newest_valid(home)
    for vm in vms:  # the VM and everything in it, at once: no notice, no drain
        for entry in processes_under(vm):
            try:
                os.kill(int(entry.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    killed_at = time.time()
    replaced = wait_for(lambda: (s := training(home, 2)) and {w["instance_id"] for w in s["workers"]
                                                              if w["agent_state"] == "training"}.isdisjoint(
        {vm.name for vm in vms}) and s, 240, "two replacements training", every=1.0)
    assert replaced["epoch"] >= before  # resumed from the store, nothing older
    wait_for_checkpoint_after(home, samples, before, 240)
    new_logs = "\n".join((home / "local-cloud" / "vms" / w["instance_id"] / "agent.log").read_text()
                         for w in replaced["workers"] if w["agent_state"] == "training")
    assert f"resumed from checkpoint epoch {before}" in new_logs or "resumed from checkpoint epoch" in new_logs
    print(f"replacements training at epoch {replaced['epoch']}, {time.time() - killed_at:.0f}s after the loss")
    down_and_check(home, samples)
