"""What every chaos case asserts, read from the cluster's own files after the fault and `down`:
checkpoints whole and finite, the newest never older than before, the ledger balanced, spend within
the budget, nothing left running. And the run's driver: launch, sample, fault, sample, down."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import processes_under, run_cli, wait_for

from spotrain.config import LocalProvider as LocalConfig
from spotrain.providers.local import LocalProvider
from spotrain.stores import ANY_WRITER, ReplicatedStore
from spotrain.stores.payload import decode_state, named_constants

CLUSTER = "chaos"
SETTLE_SECONDS = 10.0  # how stale a status record may be next to the stores


def spec_file(tmp_path: Path, workers: int = 2, backups: int = 0, every_epochs: int = 2) -> Path:
    import yaml

    spec = {
        "name": CLUSTER, "budget": {"total_usd": 1.0},
        "training": {"target_batch_size": 64, "batch_size": 8, "matchmaking_time": 2.0,
                     "compression": {"gradients": "float16", "state": "none"}},
        "placement": {"workers": workers, "backups": backups},
        "checkpoint": {"every_epochs": every_epochs, "replicas": 1},
        # no preemption from the trace: the faults are the test's
        "providers": {"local": {"time_compression": 0.001, "notice_seconds": 10}},
    }
    path = tmp_path / "chaos.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def status(home: Path) -> dict | None:
    result = run_cli("status", CLUSTER, "--json", home=home)
    return json.loads(result.stdout) if result.returncode == 0 else None


def store_urls(home: Path) -> list[str]:
    return [str(home / "clusters" / CLUSTER / "checkpoints")]


def checkpoints(home: Path) -> dict[int, list[str]]:
    """Every complete checkpoint in the cluster's stores, read whole (sizes and SHA-256 checked) and
    decoded with the weights-only loader: epoch -> problems (empty when valid and finite)."""
    found: dict[int, list[str]] = {}
    for store in ReplicatedStore.from_urls(store_urls(home), trust=ANY_WRITER).stores:
        for manifest in store.manifests():
            problems = found.setdefault(manifest.epoch, [])
            try:
                files = store.read(manifest)
                # the checkpoint names its model's buffers, the only tensors that may be infinite (as export reads it)
                declared = decode_state({k: v for k, v in files.items() if k == "constants.pt"})
                decode_state(files, named_constants(declared.get("constants", ())))
            except Exception as error:  # noqa: BLE001 - every problem is reported, none raised
                problems.append(f"{store.url} {manifest.name}: {type(error).__name__}: {error}")
    return found


def newest_valid(home: Path) -> int | None:
    return max((epoch for epoch, problems in checkpoints(home).items() if not problems), default=None)


@dataclass
class Samples:
    """What the test saw while the run went: (time, swarm epoch, newest valid checkpoint epoch)."""

    points: list[tuple[float, int, int | None]] = field(default_factory=list)

    def take(self, home: Path) -> dict | None:
        now = status(home)
        if now is not None:
            self.points.append((time.time(), int(now["epoch"] or 0), newest_valid(home)))
        return now

    def assert_nothing_durable_lost(self) -> None:
        """The newest valid checkpoint never gets older, and the swarm never trains behind it
        (after a whole-fleet loss it restarts from it, not from anything older)."""
        newest = None
        for t, epoch, checkpoint in self.points:
            assert checkpoint is None or newest is None or checkpoint >= newest, (t, checkpoint, newest)
            newest = checkpoint if checkpoint is not None else newest
            # the swarm's epoch against a checkpoint seen a while before (status records lag a tick or two)
            settled = [c for s, _, c in self.points if s <= t - SETTLE_SECONDS and c is not None]
            if settled:
                assert epoch >= max(settled), f"at {t} the swarm trained at {epoch}, behind checkpoint {max(settled)}"
        assert newest is not None, "no checkpoint was ever written"


def training(home: Path, count: int) -> dict | None:
    now = status(home)
    if now is None:
        return None
    ready = [w for w in now["workers"] if w["state"] == "running" and w["agent_state"] == "training"]
    return now if len(ready) >= count else None


def launch(home: Path, path: Path, workers: int) -> dict:
    result = run_cli("launch", str(path), "--detach", "--duration", "900", home=home, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return wait_for(lambda: training(home, workers), 240, f"{workers} training workers", every=1.0)


def wait_for_checkpoint_after(home: Path, samples: Samples, epoch: int, timeout: float) -> int:
    def newer() -> int | None:
        samples.take(home)
        newest = newest_valid(home)
        return newest if newest is not None and newest > epoch else None

    return wait_for(newer, timeout, f"a checkpoint newer than epoch {epoch}", every=2.0)


def down_and_check(home: Path, samples: Samples) -> dict:
    """`down`, then every invariant; returns the report."""
    result = run_cli("down", home=home, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    samples.take(home)
    samples.assert_nothing_durable_lost()
    bad = {epoch: problems for epoch, problems in checkpoints(home).items() if problems}
    assert bad == {}, f"checkpoints that are not whole or not finite: {bad}"
    cloud = LocalProvider(LocalConfig(), home / "local-cloud").list_instances(CLUSTER)
    assert cloud and all(i.state != "running" for i in cloud), [(i.instance_id, i.state) for i in cloud]
    assert wait_for(lambda: processes_under(home) == [], 60, "no process left after down")
    report = json.loads(run_cli("report", "--json", home=home, check=True).stdout)
    assert report["spent_usd"] <= report["budget_usd"]
    assert_ledger_balances(home / "clusters" / CLUSTER / "ledger.db", report["spent_usd"])
    return report


def assert_ledger_balances(path: Path, spent: float) -> None:
    """Spend is price x charged seconds, instance by instance, with no charge counted twice."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        total = 0.0
        for row in db.execute("SELECT * FROM instances WHERE launched_at IS NOT NULL"):
            charges = db.execute("SELECT t_start, t_end, usd FROM spend WHERE request_id = ? ORDER BY t_start",
                                 (row["request_id"],)).fetchall()
            seconds = sum(c["t_end"] - c["t_start"] for c in charges)
            assert math.isclose(seconds, (row["charged_until"] or row["launched_at"]) - row["launched_at"],
                                abs_tol=1e-6), dict(row)
            for before, after in zip(charges, charges[1:], strict=False):
                assert after["t_start"] >= before["t_end"] - 1e-9, "a charge counted twice"
            usd = sum(c["usd"] for c in charges)
            assert math.isclose(usd, row["price_usd_per_hour"] * seconds / 3600, rel_tol=1e-9, abs_tol=1e-12)
            if row["ended_at"] is not None:
                assert row["charged_until"] <= row["ended_at"] + 1e-6  # nothing charged after the end
            total += usd
        assert math.isclose(total, spent, rel_tol=1e-9, abs_tol=1e-12)
    finally:
        db.close()


def vm_dirs(home: Path, running: dict) -> list[Path]:
    return [home / "local-cloud" / "vms" / w["instance_id"] for w in running["workers"] if w["state"] == "running"]


def agent_pid(vm: Path) -> int:
    lines = [line for line in (vm / "supervisor.log").read_text().splitlines() if "agent started (pid" in line]
    return int(lines[-1].split("pid ")[1].rstrip(")"))


def supervisor_pid(vm: Path) -> int:
    (pid,) = [int(entry.split(":")[0]) for entry in processes_under(vm) if "spotrain.providers.local_vm" in entry]
    return pid


def duty_holders(home: Path) -> list[str]:
    lines = [line for line in (home / "clusters" / CLUSTER / "controller.log").read_text().splitlines()
             if "checkpoint duty: " in line]
    return lines[-1].split("checkpoint duty: ", 1)[1].split(", ") if lines else []
