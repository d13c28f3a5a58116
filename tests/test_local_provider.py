"""The local provider's VMs: idempotent launch, trace-driven preemption with and without notice,
termination, crash restarts. The workload is a small process that speaks IMDSv2 like the agent."""

import json
import os
import sys
from pathlib import Path

from conftest import agent_config, processes_under, wait_for

from spotrain.config import LocalLocation
from spotrain.config import LocalProvider as LocalConfig
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.base import LaunchRequest, Offer
from spotrain.providers.local import LocalProvider

WATCHER = """
import os, sys, time
from pathlib import Path
from spotrain.agents.metadata_watch import ImdsV2Client
client = ImdsV2Client(os.environ["SPOTRAIN_METADATA_URL"])
Path("started").write_text(str(os.getpid()))
while True:
    notice = client.spot_notice()
    if notice is not None:
        Path("notice").write_text(notice.time)
        sys.exit(0)
    time.sleep(0.1)
"""


def provider(root: Path, workload, **config) -> LocalProvider:
    values = dict(locations={"zone-a": LocalLocation(price_usd_per_hour=0.5)}, time_compression=1.0,
                  notice_seconds=1.0)
    values.update(config)
    return LocalProvider(LocalConfig(**values), root, workload=workload)


def request(n: int) -> LaunchRequest:
    return LaunchRequest(f"c-r{n:05d}", "c", Offer("local", "local:zone-a", "local.cpu", None, 0.5), agent_config())


def state_of(p: LocalProvider, instance_id: str):
    return next(i for i in p.list_instances("c") if i.instance_id == instance_id)


def test_launch_is_idempotent_per_request_id(tmp_path):
    p = provider(tmp_path, [sys.executable, "-c", WATCHER])
    first = p.launch(request(0))
    again = p.launch(request(0))
    assert first.instance_id == again.instance_id
    assert len(p.list_instances("c")) == 1
    assert p.list_instances("other-cluster") == []
    p.terminate(first.instance_id)
    wait_for(lambda: state_of(p, first.instance_id).state == "terminated")


def test_trace_preemption_posts_a_notice_then_the_vm_ends(tmp_path):
    # p3's first trace node lives 34 minutes: 6.8 s at 300x, time for the watcher to import and poll
    # before the notice (at 1000x a slow start under load missed the whole window)
    p = provider(tmp_path, [sys.executable, "-c", WATCHER], time_compression=300.0)
    instance = p.launch(request(0))
    work = tmp_path / "vms" / instance.instance_id / "work"
    wait_for(lambda: (work / "notice").exists())
    ended = wait_for(lambda: (i := state_of(p, instance.instance_id)).state != "running" and i)
    assert ended.state == InstanceState.PREEMPTED and ended.end_reason == EndReason.SPOT_PREEMPTION
    vm = json.loads((tmp_path / "vms" / instance.instance_id / "vm.json").read_text())
    assert ended.ended_at >= vm["preempt_at"] - 0.5  # the VM lives until the cloud reclaims it
    wait_for(lambda: processes_under(tmp_path / "vms" / instance.instance_id) == [])


def test_unannounced_preemption_kills_the_workload_without_notice(tmp_path):
    p = provider(tmp_path, [sys.executable, "-c", WATCHER], time_compression=1000.0, unannounced_every=1)
    instance = p.launch(request(0))
    work = tmp_path / "vms" / instance.instance_id / "work"
    pid = int(wait_for(lambda: (work / "started").exists() and (work / "started").read_text()))
    ended = wait_for(lambda: (i := state_of(p, instance.instance_id)).state != "running" and i)
    assert ended.state == InstanceState.PREEMPTED and ended.end_reason == EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE
    assert not (work / "notice").exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def test_an_interruption_reclaims_a_vm_now_with_or_without_notice(tmp_path):
    p = provider(tmp_path, [sys.executable, "-c", WATCHER], time_compression=0.001)  # the trace never preempts
    noticed, silent = p.launch(request(2)), p.launch(request(3))
    for instance in (noticed, silent):
        wait_for(lambda i=instance: (tmp_path / "vms" / i.instance_id / "work" / "started").exists())
    p.interrupt(noticed.instance_id, notice=True)
    p.interrupt(silent.instance_id, notice=False)
    wait_for(lambda: (tmp_path / "vms" / noticed.instance_id / "work" / "notice").exists())
    ends = [wait_for(lambda i=i: (e := state_of(p, i.instance_id)).state != "running" and e) for i in (noticed, silent)]
    assert [(e.state, e.end_reason) for e in ends] == [
        (InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION),
        (InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE)]
    assert not (tmp_path / "vms" / silent.instance_id / "work" / "notice").exists()
    assert (tmp_path / "vms" / silent.instance_id / "work").exists()  # on this host's network the disk stays


def test_terminate_drains_then_ends(tmp_path):
    p = provider(tmp_path, [sys.executable, "-c", WATCHER], notice_seconds=5.0)
    instance = p.launch(request(1))
    work = tmp_path / "vms" / instance.instance_id / "work"
    wait_for(lambda: (work / "started").exists())
    p.terminate(instance.instance_id)
    p.terminate(instance.instance_id)  # idempotent
    wait_for(lambda: (work / "notice").exists())
    ended = wait_for(lambda: (i := state_of(p, instance.instance_id)).state != "running" and i)
    assert ended.state == InstanceState.TERMINATED and ended.end_reason == EndReason.TERMINATED_BY_REQUEST
    assert ended.ended_at - ended.launched_at < 10  # it drained early; no need to wait out the window
    wait_for(lambda: processes_under(tmp_path / "vms" / instance.instance_id) == [])


def test_a_crashing_workload_is_restarted_then_the_vm_gives_up(tmp_path):
    crash = ("import pathlib; p = pathlib.Path('runs'); "
             "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); raise SystemExit(3)")
    p = provider(tmp_path, [sys.executable, "-c", crash])
    instance = p.launch(request(2))
    ended = wait_for(lambda: (i := state_of(p, instance.instance_id)).state != "running" and i, timeout=60)
    assert ended.state == InstanceState.TERMINATED and ended.end_reason == EndReason.AGENT_FAILED
    assert ended.end_detail == "exit 3"
    assert (tmp_path / "vms" / instance.instance_id / "work" / "runs").read_text() == "xxxx"  # 1 + 3 restarts


def test_only_crashes_in_a_row_count_a_healthy_run_starts_the_count_again():
    from spotrain.providers.local_vm import HEALTHY_RUN_SECONDS, MAX_AGENT_RESTARTS, CrashCount

    spread = CrashCount()  # three crashes, each after hours of training, then a fourth: all restarted
    assert all(spread.may_restart(3 * 3600.0) for _ in range(MAX_AGENT_RESTARTS + 1))
    assert spread.restarts == 1
    in_a_row = CrashCount()
    assert in_a_row.may_restart(HEALTHY_RUN_SECONDS)  # a healthy run, then quick crashes
    assert [in_a_row.may_restart(2.0) for _ in range(MAX_AGENT_RESTARTS)] == [True] * (MAX_AGENT_RESTARTS - 1) + [False]
    late = CrashCount(limit=2, healthy_seconds=60.0)
    assert late.may_restart(1.0) and late.may_restart(59.9) and not late.may_restart(59.9)
    assert late.may_restart(60.0) and late.restarts == 1  # the count restarts even after the limit was reached


def test_a_killed_supervisor_shows_as_lost(tmp_path):
    p = provider(tmp_path, [sys.executable, "-c", WATCHER])
    instance = p.launch(request(3))
    work = tmp_path / "vms" / instance.instance_id / "work"
    workload_pid = int(wait_for(lambda: (work / "started").exists() and (work / "started").read_text()))
    state = json.loads((tmp_path / "vms" / instance.instance_id / "state.json").read_text())
    os.kill(state["pid"], 9)
    ended = wait_for(lambda: (i := state_of(p, instance.instance_id)).state != "running" and i)
    assert ended.end_reason == EndReason.VM_LOST
    # with its metadata service gone, the workload fails its next poll and ends
    wait_for(lambda: not Path(f"/proc/{workload_pid}/cmdline").exists()
             or Path(f"/proc/{workload_pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z")
