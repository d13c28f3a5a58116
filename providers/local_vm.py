"""One local "VM": a supervisor process that plays the cloud's part for one spot instance.

It serves the instance's IMDSv2 endpoint, runs `spotrain agent` as the VM's workload (in its
own process group, so the agent's p2pd dies with it), restarts it on a crash like systemd
would, posts the preemption notice the trace schedules, and hard-kills the VM when the notice
window ends (or at once, for a preemption without notice). SIGTERM is a user's termination:
notice, drain window, then kill. Run as `python -m spotrain.providers.local_vm VM_DIR`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from spotrain.contracts.live_peers import PEERS_TAG
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.imds_server import MetadataServer, MetadataState

POLL_SECONDS = 0.2
MAX_AGENT_RESTARTS = 3
# An agent that ran this long before crashing was healthy: its crash starts a new count, so only
# crashes in a row end the VM, not three spread over a long run. A broken task or a bad config
# kills the agent within seconds to a minute or two; ten minutes of training is not that. The
# cloud unit counts in the same window (infra/spotrain-agent.service: StartLimitIntervalSec=600).
HEALTHY_RUN_SECONDS = 600.0
PEERS_FILE = "peers"  # the live swarm's peers, rewritten by the provider each tick
INTERRUPT_FILE = "interrupt"  # {"notice": bool}: the cloud reclaims the VM now (LocalProvider.interrupt)


def write_json_atomic(path: Path, data: dict) -> None:
    """0600: a VM's files are its own (user-data holds its identity; vm.json the command it runs)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(fd, 0o600)
        out.write(json.dumps(data))
    os.replace(tmp, path)


class CrashCount:
    """How many times in a row the agent crashed, and whether it may be restarted once more."""

    def __init__(self, limit: int = MAX_AGENT_RESTARTS, healthy_seconds: float = HEALTHY_RUN_SECONDS):
        self.limit, self.healthy_seconds = limit, healthy_seconds
        self.restarts = 0

    def may_restart(self, ran_seconds: float) -> bool:
        """After a crash of an agent that ran `ran_seconds`: True (and counted) while under the limit."""
        if ran_seconds >= self.healthy_seconds:
            self.restarts = 0
        if self.restarts >= self.limit:
            return False
        self.restarts += 1
        return True


class Supervisor:
    def __init__(self, vm_dir: Path):
        self.vm_dir = vm_dir
        self.vm = json.loads((vm_dir / "vm.json").read_text())
        # the peers the controller publishes (LocalProvider.publish_peers), served as EC2 serves a tag
        self.state = MetadataState(self.vm["instance_id"], self.vm["zone"],
                                   live_files={f"tags/instance/{PEERS_TAG}": vm_dir / PEERS_FILE})
        self.server = MetadataServer(self.state)
        self.agent: subprocess.Popen | None = None
        self.agent_started = 0.0
        self.terminate_requested = False
        self.deadline: float | None = None
        self.end_state = InstanceState.TERMINATED
        self.end_reason = EndReason.TERMINATED_BY_REQUEST
        self.end_detail = ""

    def log(self, message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} vm {self.vm['instance_id']}: {message}", flush=True)

    def write_state(self, state: InstanceState, **extra) -> None:
        write_json_atomic(self.vm_dir / "state.json",
                          {"state": state, "pid": os.getpid(), "imds_url": self.server.url, **extra})

    def start_agent(self) -> None:
        work = self.vm_dir / "work"
        work.mkdir(exist_ok=True)
        env = dict(os.environ, SPOTRAIN_METADATA_URL=self.server.url)
        python_path = [*self.vm.get("python_path", []), *filter(None, [env.get("PYTHONPATH")])]
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        with open(self.vm_dir / "agent.log", "ab") as log:
            command = self.vm.get("workload") or [
                sys.executable, "-m", "spotrain", "agent", "--user-data", str(self.vm_dir / "user-data.json")]
            self.agent = subprocess.Popen(
                command,
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # the agent and its p2pd share a group we can kill at once
            )
        self.agent_started = time.time()
        self.log(f"agent started (pid {self.agent.pid})")

    def kill_agent_group(self) -> None:
        if self.agent is None:
            return
        try:
            os.killpg(self.agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.agent.wait()

    def post_notice(self, terminate_at: float, state: InstanceState, reason: EndReason) -> None:
        if self.deadline is not None:
            return
        self.state.post_notice(terminate_at)
        self.deadline, self.end_state, self.end_reason = terminate_at, state, reason
        self.log(f"notice posted: {reason}, terminate at {terminate_at:.1f}")

    def interruption(self) -> bool | None:
        """A reclaim the cloud asked for now: True with notice, False without, None when none."""
        try:
            return bool(json.loads((self.vm_dir / INTERRUPT_FILE).read_text())["notice"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "terminate_requested", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is not the cloud's business
        self.server.start_background()
        self.write_state(InstanceState.RUNNING, launched_at=self.vm["launched_at"])
        self.start_agent()
        preempt_at, announced = self.vm.get("preempt_at"), self.vm.get("announced", True)
        notice_s = float(self.vm["notice_seconds"])
        crashes = CrashCount()
        while True:
            now = time.time()
            interrupted = self.interruption()
            if interrupted is not None:  # from now on, exactly as the trace's preemption at this moment
                preempt_at, announced = min(preempt_at or now + notice_s, now + notice_s), interrupted
                if not announced:
                    preempt_at = now
            if self.terminate_requested:
                self.post_notice(now + notice_s, InstanceState.TERMINATED, EndReason.TERMINATED_BY_REQUEST)
            if preempt_at is not None and announced and now >= preempt_at - notice_s:
                self.post_notice(max(preempt_at, now), InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION)
            if preempt_at is not None and not announced and now >= preempt_at and self.deadline is None:
                self.end_state = InstanceState.PREEMPTED
                self.end_reason = EndReason.SPOT_PREEMPTION_WITHOUT_NOTICE
                self.log("preempted without notice")
                break
            if self.deadline is not None and now >= self.deadline:
                self.log("notice window over")
                break
            assert self.agent is not None
            code = self.agent.poll()
            if code is not None:
                if self.deadline is not None:
                    if self.end_state == InstanceState.TERMINATED:
                        self.log(f"agent drained (exit {code})")
                        break
                    # a drained spot VM still exists until the cloud reclaims it
                elif crashes.may_restart(now - self.agent_started):
                    self.log(f"agent exited with {code}; restart {crashes.restarts}/{MAX_AGENT_RESTARTS} in a row")
                    # what the crashed agent started (its p2pd holds its identity) goes too, as systemd's
                    # control-group kill does; else the restarted agent finds its peer id taken
                    self.kill_agent_group()
                    time.sleep(1.0)
                    self.start_agent()
                else:
                    self.end_state, self.end_reason = InstanceState.TERMINATED, EndReason.AGENT_FAILED
                    self.end_detail = f"exit {code}"
                    break
            time.sleep(POLL_SECONDS)
        self.kill_agent_group()
        self.write_state(self.end_state, launched_at=self.vm["launched_at"], ended_at=time.time(),
                         end_reason=self.end_reason, end_detail=self.end_detail)
        if self.vm.get("ephemeral_disk"):  # a cloud VM's disk goes with it
            shutil.rmtree(self.vm_dir / "work", ignore_errors=True)
        self.log(f"{self.end_state}: {self.end_reason}" + (f" ({self.end_detail})" if self.end_detail else ""))
        self.server.shutdown()


def main() -> None:
    Supervisor(Path(sys.argv[1])).run()


if __name__ == "__main__":
    main()
