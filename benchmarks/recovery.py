"""Recovery on the emulated multi-region cloud (root only), measured in one run through the CLI.

The cluster is examples/local-geo.yaml's (two regions of two VMs, the controller behind NAT,
50 Mbit/s between regions, each region's bucket a moto server) with no trace preemptions: the
benchmark injects them with LocalProvider.interrupt, as tests/test_geo_e2e.py does. In order:

  1. one training VM preempted with notice; the replacement contributes when its first samples
     count toward the swarm's epoch: its agent's own line, stamped with seconds since its process
     started (agents/startup.py; also the controller's view: its first status record that trains
     with samples at the swarm's epoch, a status period and a tick later). Against the swarm's
     seconds per epoch measured before the notice. Target: within one epoch of its agent starting.
  2. the same notice: the global epoch (the highest a training agent reports, per controller
     tick) never falls below the epoch at the notice and keeps advancing until the replacement has
     contributed and one more epoch passed. Target: no epoch lost.
  3. once a checkpoint is durable in a bucket, every VM killed without notice: the epoch the new
     agents resume from ("resumed from checkpoint epoch N") against the swarm's epoch at the loss.
     Target: at most `checkpoint.every_epochs` epochs lost.
  4. the training thread's stall per checkpoint (agents/roles/data_parallel.py logs it: waiting
     for the delayed update plus the in-memory snapshot) against the mean local step's wall time
     (batch size over the agents' samples/s). Target: less than one step.

Figures come from the ledger's metrics (one row per agent status per controller tick, so times
are as fine as a tick: 2-5 s) and the agents' logs (0.1 s); recovery_figures.py computes them.
`--target-batch-size` sets the samples per epoch: the defaults give epochs of seconds, far
shorter than a real swarm's, which are what a replacement's start is to be measured against.

    sudo .venv/bin/python benchmarks/recovery.py [--quick] [--json] [--keep DIR] [--target-batch-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: benchmarks/ is then not on the path

from benchmarks import recovery_figures as fig  # noqa: E402
from spotrain.progress_bars import StepBars  # noqa: E402

CLUSTER = "recovery-bench"
RATE_EPOCHS = 3  # epochs the swarm passes before the notice, at least: its seconds per epoch
SUBNETS = {"us-east": 31, "eu-west": 32}  # 198.18.N.0/24: apart from the example's and the e2e test's
T = TypeVar("T")


STEPS = 7  # the bars' steps: launch, warm-up, notice, one more epoch, durable checkpoint, loss, down


def note(bars: StepBars, message: str) -> None:
    """A line above the bars, stamped to match it with the agents' logs."""
    bars.say(f"{time.strftime('%H:%M:%S')} recovery: {message}")


def write_spec(work: Path, quick: bool, target_batch_size: int | None = None) -> tuple[Path, dict[str, Any]]:
    spec = yaml.safe_load((ROOT / "examples" / "local-geo.yaml").read_text())
    spec["name"] = CLUSTER
    spec["budget"] = {"total_usd": 2.0}
    spec["training"].update(target_batch_size=target_batch_size or (64 if quick else 128), matchmaking_time=2.0)
    spec["checkpoint"]["every_epochs"] = 2 if quick else 3
    spec["checkpoint"]["stores"] = [{"url": f"s3://{region}/{CLUSTER}?endpoint=http://198.18.{n}.2:9000",
                                     "domain": f"local:{region}"} for region, n in SUBNETS.items()]
    local = spec["providers"]["local"]
    local["regions"] = {region: {**local["regions"][region], "subnet": f"198.18.{n}.0/24"}
                        for region, n in SUBNETS.items()}
    local["time_compression"] = 0.001  # no trace preemption: the benchmark preempts
    local["notice_seconds"] = 8
    path = work / "recovery.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


class Bench:
    def __init__(self, spec_path: Path, home: Path):
        from spotrain.providers.local import LocalProvider
        from spotrain.spec_file import load_spec

        self.spec_path, self.home = spec_path, home
        self.provider = LocalProvider(load_spec(spec_path).providers.local, home / "local-cloud")
        self.cloud = self.provider.cloud(CLUSTER).plan.cloud

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, SPOTRAIN_HOME=str(self.home))
        result = subprocess.run([sys.executable, "-m", "spotrain", *args], env=env, capture_output=True, text=True,
                                timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise RuntimeError(f"spotrain {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
        return result

    def status(self) -> dict[str, Any] | None:
        result = self.cli("status", CLUSTER, "--json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def training(self, count: int, exclude: set[str]) -> dict[str, str]:
        """instance id -> location of `count` training workers, none of `exclude`."""
        def ready() -> dict[str, str] | None:
            status = self.status()
            workers = {w["instance_id"]: w["location"] for w in (status or {}).get("workers", [])
                       if w["agent_state"] == "training" and w["instance_id"] not in exclude}
            return workers if len(workers) >= count else None
        return wait_for(ready, 600, f"{count} training workers", every=2)

    def running(self) -> list[str]:
        return [w["instance_id"] for w in (self.status() or {}).get("workers", [])
                if w["state"] == "running" and w["instance_id"]]

    def ledger_rows(self) -> list[dict[str, Any]]:
        # read-only: the controller owns the ledger and writes it every tick
        path = self.home / "clusters" / CLUSTER / "ledger.db"
        if not path.exists():
            return []
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute(
                "SELECT * FROM metrics WHERE run_id = (SELECT MAX(id) FROM runs) ORDER BY t, id")]
        finally:
            db.close()

    def durable_epoch(self) -> int | None:
        return json.loads(self.cli("report", CLUSTER, "--json").stdout)["checkpoint_epoch"]

    def vm_file(self, instance_id: str, name: str) -> str:
        try:
            return (self.home / "local-cloud" / "vms" / instance_id / name).read_text(errors="replace")
        except OSError:
            return ""

    def vm_ids(self) -> list[str]:
        vms = self.home / "local-cloud" / "vms"
        return sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []

    def launched_at(self, instance_id: str) -> float:
        return float(json.loads(self.vm_file(instance_id, "vm.json") or "{}").get("launched_at", time.time()))

    def global_epoch_now(self) -> int:
        return int((self.status() or {}).get("epoch") or 0)


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, every: float = 3.0) -> T:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def noticed_preemption(bench: Bench, first: dict[str, str], warm_epochs: int, bars: StepBars) -> tuple[dict, dict]:
    """Figures 1 and 2: preempt one training VM with notice, follow its replacement."""
    # the swarm's seconds per epoch from its second epoch on (the first waits for peers still
    # joining: three times as long in a 2048-sample run), over enough epochs before the notice
    # (a fast swarm passes the warm-up epochs before the first poll)
    bars.start("warm-up: the swarm's seconds per epoch, measured before the notice")
    started_at = bench.global_epoch_now()
    wait_for(lambda: bench.global_epoch_now() > started_at, 900, "the swarm's first epoch")
    trained_from, first_epoch = time.time(), bench.global_epoch_now()
    warm = max(warm_epochs, first_epoch + RATE_EPOCHS)
    wait_for(lambda: bench.global_epoch_now() >= warm, 900, f"epoch {warm}")
    victim = sorted(first)[0]
    noticed_at = time.time()
    bars.start(f"{victim} preempted with notice: waiting for its replacement to contribute")
    note(bars, f"preempting {victim} with notice at epoch {bench.global_epoch_now()}")
    bench.provider.interrupt(victim, notice=True)
    known = set(bench.vm_ids())

    def contributed() -> tuple[str, float] | None:
        rows = bench.ledger_rows()
        for new in sorted(set(bench.vm_ids()) - known):
            t = fig.first_contribution(rows, new)
            if t is not None:
                return new, t
        return None
    replacement, contributed_at = wait_for(contributed, 900, "the replacement to contribute")
    reached = fig.epoch_at(fig.global_epochs(bench.ledger_rows()), contributed_at) or 0
    bars.start(f"{replacement} contributed: one more epoch after epoch {reached}")
    wait_for(lambda: bench.global_epoch_now() > reached, 600, "one more epoch after the replacement joined")
    rows = bench.ledger_rows()
    started = fig.agent_started_at(bench.vm_file(replacement, "supervisor.log"), bench.launched_at(replacement))
    note(bars, f"replacement {replacement} contributed {contributed_at - noticed_at:.1f}s after the notice")
    notice = fig.noticed_preemption(fig.global_epochs(rows), noticed_at, time.time(), trained_from)
    breakdown = fig.startup(bench.vm_file(replacement, "agent.log"))
    return ({"preempted": victim, "replacement": replacement,
             **fig.replacement_times(breakdown, started, contributed_at, noticed_at),
             "start_breakdown": breakdown}, notice)


def fleet_loss(bench: Bench, every_epochs: int, bars: StepBars) -> dict[str, Any]:
    """Figure 3: every VM killed without notice once a checkpoint is durable in a bucket."""
    bars.start("waiting for a checkpoint durable in a bucket")
    durable = wait_for(lambda: bench.durable_epoch(), 900, "a durable checkpoint")
    victims = bench.running()
    epoch = max(bench.global_epoch_now(), fig.epoch_at(fig.global_epochs(bench.ledger_rows()), time.time()) or 0)
    bars.start(f"all {len(victims)} VMs killed without notice: waiting for training to resume")
    note(bars, f"killing all {len(victims)} VMs without notice at epoch {epoch} (durable: {durable})")
    for instance_id in victims:
        bench.provider.interrupt(instance_id, notice=False)
    lost_at = time.time()
    after = bench.training(3, exclude=set(victims))
    resumed = [e for i in after for e in fig.resumed_epochs(bench.vm_file(i, "agent.log"))]
    resumed_epoch = max(resumed) if resumed else 0
    note(bars, f"resumed from epoch {resumed_epoch} {time.time() - lost_at:.0f}s after the loss")
    return {"epoch_at_loss": epoch, "durable_epoch_at_loss": durable, "resumed_epoch": resumed_epoch,
            "epochs_lost": max(0, epoch - resumed_epoch), "every_epochs": every_epochs,
            "seconds_to_training_again": time.time() - lost_at}


def measure(bench: Bench, spec: dict[str, Any], quick: bool, duration: int, bars: StepBars) -> dict[str, Any]:
    bars.start("launch: waiting for 4 training workers")
    bench.cli("launch", str(bench.spec_path), "--detach", "--duration", str(duration))
    first = bench.training(4, exclude=set())
    replacement, notice = noticed_preemption(bench, first, 3 if quick else 6, bars)
    every = int(spec["checkpoint"]["every_epochs"])
    fleet = fleet_loss(bench, every, bars)
    rows = bench.ledger_rows()
    stall = {"stalls": [s for i in bench.vm_ids() for s in fig.stalls(bench.vm_file(i, "agent.log"))],
             "mean_step_seconds": fig.mean_step_seconds(rows, int(spec["training"]["batch_size"]))}
    return fig.figures(replacement, notice, fleet, stall)


def tear_down(bench: Bench, bars: StepBars) -> list[str]:
    """`spotrain down`, then the cloud's namespaces still there (none, if down did its job)."""
    from spotrain.providers.geo_network import namespaces

    bars.start("spotrain down: the cluster and its namespaces removed")
    result = bench.cli("down", CLUSTER, check=False)
    if result.returncode != 0:
        note(bars, f"down exited {result.returncode}: {result.stderr.strip()[-300:]}")
    return [n for n in namespaces() if n.startswith(bench.cloud)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller epochs, fewer of them: a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, ledger)")
    parser.add_argument("--target-batch-size", type=int, metavar="N",
                        help="samples per epoch (default 64 quick, 128 normal: epochs of seconds; real swarms' "
                             "last minutes, e.g. 4096 here gives epochs of about a minute)")
    args = parser.parse_args(argv)
    if args.target_batch_size is not None and not 8 <= args.target_batch_size <= 1_000_000:
        print(f"recovery: --target-batch-size: must be from 8 to 1000000 (got {args.target_batch_size})",
              file=sys.stderr)
        return 2
    from spotrain.providers.geo_cloud import host_problem

    if os.geteuid() != 0 or host_problem() is not None:
        print(f"recovery: the emulated cloud needs root and its tools: {host_problem() or 'not root'}", file=sys.stderr)
        return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="spotrain-recovery-"))
    work.mkdir(parents=True, exist_ok=True)
    spec_path, spec = write_spec(work, args.quick, args.target_batch_size)
    bench = Bench(spec_path, work / "home")
    started = time.time()
    with StepBars(STEPS) as bars:
        try:
            result: dict[str, Any] = {"mode": "quick" if args.quick else "full",
                                      **measure(bench, spec, args.quick, 1200 if args.quick else 2400, bars)}
        except (TimeoutError, RuntimeError) as error:
            result = {"mode": "quick" if args.quick else "full", "error": str(error)}
        finally:
            left = tear_down(bench, bars)
    result.update(seconds=round(time.time() - started, 1), namespaces_left=left,
                  spec={"target_batch_size": spec["training"]["target_batch_size"],
                        "batch_size": spec["training"]["batch_size"], "vm_cpus": spec["providers"]["local"]["vm_cpus"],
                        "every_epochs": spec["checkpoint"]["every_epochs"]})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=None if args.json else 2, default=float))
    return 1 if "error" in result or left else 0


if __name__ == "__main__":
    sys.exit(main())
