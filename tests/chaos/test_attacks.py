"""Attacks on a real running local cluster (controller, local VMs, real agents on 127.0.0.1, through
the CLI), each ending in the invariants of issue 15: the honest agents keep training (the global
epoch never falls, no non-finite storm, no NaN in any checkpoint), the controller launches nothing
it does not need, `status` never shows a forged record, the attacker gets nothing, every secret
under $SPOTRAIN_HOME is closed to other users, and `down` leaves no process behind.

- A stranger that knows every address (tests/chaos/stranger.py, its own process and keys) reads
  and stores records, forges status, duty, admission and codec records, calls the averagers
  directly (join a group, download the state) and averages NaN gradients with a real Optimizer.
- A malicious checkpoint in the store (a pickle that would create a file on load, unsigned; and a
  NaN state, signed by the stranger's own key under the cluster's real admission record), newer
  than every honest one, before an agent restarts: refused with a line each, unread (neither seal
  is an admitted peer's), and never shown by `status`, `report` or `export` as the newest.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import processes_under, run_cli, wait_for

from spotrain.config import LocalProvider as LocalConfig
from spotrain.providers.local import LocalProvider

from .invariants import assert_ledger_balances

CLUSTER = "attacked"
STRANGER = Path(__file__).with_name("stranger.py")
FORGED_EPOCH = 10**6


def launch(tmp_path: Path) -> Path:
    """Two workers training, no preemption (so every launch after the first two is needless)."""
    home = tmp_path / "home"
    spec = {
        "name": CLUSTER, "budget": {"total_usd": 1.0},
        "training": {"target_batch_size": 64, "batch_size": 8, "matchmaking_time": 2.0,
                     "compression": {"gradients": "float16"}},
        "placement": {"workers": 2, "backups": 0},
        "checkpoint": {"every_epochs": 2, "replicas": 1},
        "providers": {"local": {"time_compression": 0.001}},  # a trace hour lasts 3.6 ms: nobody is preempted
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_cli("launch", str(path), "--detach", "--duration", "900", home=home, check=True)
    wait_for(lambda: len(training(status(home))) == 2, 240, "two training workers", every=1.0)
    return home


def status(home: Path) -> dict:
    result = run_cli("status", CLUSTER, "--json", home=home)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def training(seen: dict) -> list[dict]:
    return [w for w in seen.get("workers", []) if w["state"] == "running" and w["agent_state"] == "training"]


class StatusWatch:
    """`spotrain status --json`, every two seconds, on a thread, while an attack runs."""

    def __init__(self, home: Path):
        self.home, self.seen, self._stop = home, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            if seen := status(self.home):
                self.seen.append(seen)

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.seen


def vms(home: Path) -> list[Path]:
    return sorted((home / "local-cloud" / "vms").iterdir())


def agent_logs(home: Path) -> str:
    return "".join((vm / "agent.log").read_text(errors="replace") for vm in vms(home))


def step_skips(home: Path) -> list[str]:
    """The lines an agent logs for each step it skips on a non-finite loss or gradient."""
    return [line for line in agent_logs(home).splitlines()
            if "non-finite loss" in line or "non-finite gradients" in line]


def checkpoint_dir(home: Path) -> Path:
    return home / "clusters" / CLUSTER / "checkpoints"


def honest_checkpoints(home: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir(home).glob("ckpt-*.json") if "-evil-" not in p.name)


def newest_honest_epoch(home: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in honest_checkpoints(home)), default=-1)


def assert_secrets_closed(home: Path) -> None:
    """Every secret 0600, in folders 0700: the cluster key, the controller's identity, the admission
    table and record, each VM's user-data, identity and admission record."""
    cluster = home / "clusters" / CLUSTER
    secrets = [cluster / name for name in ("cluster-key.pem", "controller-identity.key", "admission.json",
                                           "admitted.json")]
    for vm in vms(home):
        secrets += [vm / "user-data.json", vm / "vm.json", vm / "work" / "swarm-identity.key",
                    vm / "work" / "admitted.json"]
    for path in secrets:
        assert path.stat().st_mode & 0o777 == 0o600, f"{path}: {oct(path.stat().st_mode & 0o777)}"
    for folder in (cluster, *vms(home), home / "local-cloud" / "vms"):
        assert folder.stat().st_mode & 0o777 == 0o700, f"{folder}: {oct(folder.stat().st_mode & 0o777)}"


def assert_no_nan_in_checkpoints(home: Path) -> int:
    files = sorted(checkpoint_dir(home).glob("ckpt-*/*.pt"))
    for path in files:
        if "-evil-" in path.parent.name:
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        for tensor in _tensors(state):
            assert not (tensor.is_floating_point() and torch.isnan(tensor).any()), path
    return len(files)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, float):
        assert not math.isnan(value)


def run_stranger(home: Path, tmp_path: Path, average_seconds: float) -> dict:
    out = tmp_path / "stranger.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTRAIN_")}  # nothing the cluster gave
    with open(tmp_path / "stranger.log", "w") as log:
        result = subprocess.run([sys.executable, str(STRANGER), str(home), CLUSTER, str(out), str(average_seconds)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300, start_new_session=True)
    assert result.returncode == 0, (tmp_path / "stranger.log").read_text()[-3000:]
    return json.loads(out.read_text())


def assert_stranger_got_nothing(got: dict, home: Path) -> None:
    assert got["agents"] and len(got["addresses"]) == 3  # it knew the controller and both agents
    # another user could read only the local cloud's schedule and locks: no secret, no address
    assert all(name.startswith("local-cloud/") and "/vms/" not in name for name in got["readable"]), got["readable"]
    assert all(value is None for value in got["dht"]["got"].values()), got["dht"]["got"]
    for peer, calls in got["rpc"].items():
        assert not calls["join"].startswith("answered") and not calls["download"].startswith("answered"), (peer, calls)
    assert got["load_state"] == "None"
    assert got["average"]["steps"] > 0 and got["average"]["max_peers_seen"] <= 1, got["average"]
    log = agent_logs(home)
    for handler in ("rpc_join_group", "rpc_download_state", "DHTProtocol.rpc_"):
        assert f"{handler}" in log and "not admitted" in log, handler


def assert_nothing_forged(seen: list[dict], instances: set[str]) -> None:
    epochs = [s["epoch"] for s in seen if s.get("epoch") is not None]
    assert epochs and epochs == sorted(epochs), epochs  # the global epoch never falls
    assert max(epochs) < 1000, max(epochs)
    for snapshot in seen:
        workers = snapshot["workers"]
        assert {w["instance_id"] for w in workers} == instances, workers  # no stranger, nobody replaced
        assert all(w["agent_state"] != "draining" and (w["epoch"] or 0) < 1000 for w in workers), workers


def assert_down_cleans_up(home: Path) -> dict:
    result = run_cli("down", home=home, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert wait_for(lambda: processes_under(home) == [], 60, "no process left")
    cloud = LocalProvider(LocalConfig(), home / "local-cloud").list_instances(CLUSTER)
    assert len(cloud) == 2 and all(i.state == "terminated" for i in cloud)  # nothing but the first two launched
    report = json.loads(run_cli("report", "--json", home=home, check=True).stdout)
    assert report["preemptions"] == 0 and report["replacements"] == 0, report
    assert report["epochs"] < 1000
    assert report["spent_usd"] <= report["budget_usd"]
    assert_ledger_balances(home / "clusters" / CLUSTER / "ledger.db", report["spent_usd"])
    return report


@pytest.mark.slow  # 60-200 s; the default suite keeps tests/test_admission_gate.py (the gate, real peers)
def test_a_stranger_that_knows_every_address_gets_nothing_and_changes_nothing(tmp_path):
    home = launch(tmp_path)
    try:
        assert_secrets_closed(home)
        instances = {vm.name for vm in vms(home)}
        watch = StatusWatch(home)
        got = run_stranger(home, tmp_path, average_seconds=5)
        after = status(home)["epoch"]
        wait_for(lambda: status(home)["epoch"] >= after + 2, 120, "two more epochs after the attack", every=1.0)
        # the forged duty records stopped no checkpoint: the duty holder writes one after the attack
        wait_for(lambda: newest_honest_epoch(home) > after, 120, "a checkpoint after the attack", every=1.0)
        seen = watch.stop()
        assert_stranger_got_nothing(got, home)
        assert_nothing_forged(seen, instances)
        assert not step_skips(home)
        controller_log = (home / "clusters" / CLUSTER / "controller.log").read_text()
        assert "exit 78" not in controller_log and "retiring" not in controller_log
        assert controller_log.count("launched i-") == 2, controller_log  # the first two, no replacement
    finally:
        assert_down_cleans_up(home)
    assert_secrets_closed(home)
    assert assert_no_nan_in_checkpoints(home)  # once nothing writes or prunes them, the final one too


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): a file appears if a loader ever runs a pickle's code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_malicious_checkpoints(home: Path, marker: Path) -> int:
    """Two checkpoints newer than every honest one, as whoever can write the store would, both with
    valid sizes and SHA-256 sums: an unsigned pickle that runs code on load, and a NaN state sealed
    by a key of the stranger's own with the cluster's real admission record (which does not list
    it). Returns the newest epoch."""
    import io

    from spotrain.access import new_identity
    from spotrain.examples import tiny_gpt
    from spotrain.stores import ManifestSigner
    from spotrain.stores.local import LocalDirStore

    def saved(value) -> bytes:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()

    store, model = LocalDirStore(checkpoint_dir(home)), tiny_gpt.build_model()
    epoch = newest_honest_epoch(home) + 100
    store.write(epoch, {"model.pt": saved({"weights": _CreatesMarker(marker)}), "optimizer.pt": saved({})},
                "evil-pickle")
    nan_model = {name: torch.full_like(value, math.nan) for name, value in model.state_dict().items()}
    record = json.loads((home / "clusters" / CLUSTER / "admitted.json").read_text())
    stranger = ManifestSigner.from_identity(new_identity(), lambda: record)
    store.write(epoch + 1, {"model.pt": saved(nan_model), "optimizer.pt": saved({})}, "evil-nan", stranger)
    return epoch + 1


def restart_agent(vm: Path) -> None:
    """kill -9 the agent on `vm`; its supervisor starts it again, as systemd would."""
    started = [line for line in (vm / "supervisor.log").read_text().splitlines() if "agent started (pid" in line]
    os.kill(int(started[-1].split("pid ")[1].rstrip(")")), signal.SIGKILL)
    wait_for(lambda: (vm / "supervisor.log").read_text().count("agent started (pid") > len(started), 60,
             "the agent to start again")


@pytest.mark.slow
def test_a_stranger_averaging_nan_then_a_malicious_checkpoint_before_a_restart(tmp_path):
    home = launch(tmp_path)
    marker = tmp_path / "code-ran"
    try:
        instances = {vm.name for vm in vms(home)}
        watch = StatusWatch(home)
        got = run_stranger(home, tmp_path, average_seconds=30)
        assert_stranger_got_nothing(got, home)

        forged = plant_malicious_checkpoints(home, marker)
        vm = vms(home)[0]
        log_before = len((vm / "agent.log").read_text(errors="replace"))
        restart_agent(vm)
        # it trains again from the newest state it may trust: an honest checkpoint, or a live peer's
        # state when that is newer (then it logs no "resumed from checkpoint" line)
        wait_for(lambda: "first step done" in (vm / "agent.log").read_text(errors="replace")[log_before:], 120,
                 "the restarted agent to train again")
        restarted_log = (vm / "agent.log").read_text(errors="replace")[log_before:]
        resumed = [line for line in restarted_log.splitlines() if "resumed from checkpoint epoch" in line]
        print("".join(line + "\n" for line in restarted_log.splitlines() if "skipping checkpoint" in line))
        assert f"skipping checkpoint ckpt-{forged - 1:08d}-evil-pickle: unsigned" in restarted_log
        assert (f"skipping checkpoint ckpt-{forged:08d}-evil-nan: signed by a key its admission record does not "
                f"list") in restarted_log
        assert not [line for line in restarted_log.splitlines()  # refused unread: no payload check reached
                    if "evil" in line and ("weights-only" in line or "non-finite" in line)]
        assert all(int(line.split("epoch ")[1].split()[0]) < forged - 1 for line in resumed)  # an honest one
        report = json.loads(run_cli("report", CLUSTER, "--json", home=home, check=True).stdout)
        assert report["checkpoint_epoch"] is not None and report["checkpoint_epoch"] < forged - 1
        after = status(home)["epoch"]
        wait_for(lambda: len(training(status(home))) == 2 and status(home)["epoch"] >= after + 2, 180,
                 "both agents training two more epochs", every=1.0)
        seen = watch.stop()
        print("status during the attacks (epochs):", [s["epoch"] for s in seen])
        print("newest checkpoint shown:", seen[-1]["checkpoint_path"])
        shown = {int(s["checkpoint_path"].split("(epoch ")[1].split(";")[0]) for s in seen if s.get("checkpoint_path")}
        assert shown and max(shown) < forged - 1, shown  # no planted epoch was ever shown as the newest
        assert_nothing_forged(seen, instances)
        assert not step_skips(home)
        assert not marker.exists()
    finally:
        assert_down_cleans_up(home)
    assert assert_no_nan_in_checkpoints(home)
    exported = run_cli("export", CLUSTER, str(tmp_path / "model.pt"), home=home, check=True).stdout
    assert "evil" not in exported and not marker.exists()
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(not torch.isnan(t).any() for t in weights.values())
