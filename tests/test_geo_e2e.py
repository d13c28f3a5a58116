"""The emulated multi-region cloud through the CLI: two regions of two VMs, the controller behind NAT,
preemptions with and without notice, a whole region lost, then every VM: training resumes from the
regions' buckets, and `down` leaves nothing."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, processes_under, run_cli, wait_for

from spotrain.providers.geo_cloud import host_problem
from spotrain.providers.geo_network import namespaces
from spotrain.providers.local import LocalProvider
from spotrain.spec_file import load_spec

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or host_problem() is not None,
                                 reason=f"the emulated cloud needs root and its tools: {host_problem()}")]


def spec_file(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "local-geo.yaml").read_text())
    spec["name"] = "geo-e2e"
    spec["budget"] = {"total_usd": 2.0}
    spec["training"].update(target_batch_size=64, matchmaking_time=2.0)
    spec["checkpoint"]["every_epochs"] = 2
    spec["checkpoint"]["stores"] = [{"url": f"s3://{region}/geo-e2e?endpoint=http://198.18.{n}.2:9000",
                                     "domain": f"local:{region}"} for n, region in ((11, "us-east"), (12, "eu-west"))]
    local = spec["providers"]["local"]
    local["regions"] = {"us-east": {"subnet": "198.18.11.0/24"}, "eu-west": {"subnet": "198.18.12.0/24"}}
    local["time_compression"] = 0.001  # no trace preemption: the test preempts
    local["notice_seconds"] = 8
    path = tmp_path / "geo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Cluster:
    def __init__(self, path: Path, home: Path):
        self.home = home
        self.provider = LocalProvider(load_spec(path).providers.local, home / "local-cloud")
        self.cloud = self.provider.cloud("geo-e2e").plan.cloud

    def status(self) -> dict:
        return json.loads(run_cli("status", "geo-e2e", "--json", home=self.home, check=True).stdout)

    def training(self, count: int = 4, exclude: set[str] = frozenset()) -> dict[str, str]:
        """instance id -> location of `count` training workers, none of `exclude`."""
        def ready():
            result = run_cli("status", "geo-e2e", "--json", home=self.home)
            if result.returncode != 0:
                return None
            workers = {w["instance_id"]: w["location"] for w in json.loads(result.stdout)["workers"]
                       if w["agent_state"] == "training" and w["instance_id"] not in exclude}
            return workers if len(workers) >= count else None
        return wait_for(ready, 420, f"{count} training workers", every=2)

    def epoch(self) -> int:
        return self.status()["epoch"] or 0

    def durable_epoch(self) -> int | None:
        return json.loads(run_cli("report", "--json", home=self.home, check=True).stdout)["checkpoint_epoch"]

    def agent_log(self, instance_id: str) -> str:
        return (self.home / "local-cloud" / "vms" / instance_id / "agent.log").read_text(errors="replace")

    def interrupt(self, instance_ids, notice: bool) -> None:
        for instance_id in instance_ids:
            self.provider.interrupt(instance_id, notice=notice)


def test_two_regions_survive_preemptions_and_a_whole_fleet_loss_then_down_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    path = spec_file(tmp_path)
    cluster = Cluster(path, home)
    try:
        assert run_cli("launch", str(path), "--detach", "--duration", "1500", home=home, check=True).returncode == 0
        first = cluster.training()
        by_region = {loc: sorted(i for i, at in first.items() if at == loc) for loc in set(first.values())}
        assert sorted(map(len, by_region.values())) == [2, 2]  # two VMs in each region

        # the controller runs in the cloud's NAT'd namespace and found itself unreachable: a DHT client
        pid = cluster.status()["controller_pid"]
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{cluster.cloud}-ctl").st_ino
        log = (home / "clusters" / "geo-e2e" / "controller.log").read_text()
        assert "the controller behind NAT" in log
        for instance_id in first:  # agents announce their VM's own address
            assert re.search(r"joined the swarm as \S+ at /ip4/198\.18\.1[12]\.\d+/", cluster.agent_log(instance_id))

        wait_for(lambda: cluster.epoch() >= 3, 420, "epoch 3", every=3)
        # one VM per region, with notice: drained and replaced
        noticed = [ids[0] for ids in by_region.values()]
        cluster.interrupt(noticed, notice=True)
        second = cluster.training(exclude=set(noticed))
        assert len(set(second) - set(first)) == 2
        # a whole region at once, without notice
        region = sorted(by_region)[0]
        lost_region = [i for i, loc in second.items() if loc == region]
        cluster.interrupt(lost_region, notice=False)
        third = cluster.training(exclude=set(lost_region))
        assert sum(loc == region for loc in third.values()) == 2

        # every VM, without notice, once a checkpoint is durable in a bucket
        durable = wait_for(lambda: cluster.durable_epoch(), 420, "a durable checkpoint", every=5)
        cluster.interrupt(list(third), notice=False)
        fourth = cluster.training(exclude=set(third))
        resumed_at = time.time()
        resumed = [int(m) for i in fourth for m in re.findall(r"resumed from checkpoint epoch (\d+) of s3://",
                                                                cluster.agent_log(i))]
        assert resumed and min(resumed) >= durable, (resumed, durable)
        wait_for(lambda: cluster.epoch() > max(resumed), 420, "training past the restored epoch", every=3)
        gone = set(first) | set(second) | set(third)
        assert all(not (home / "local-cloud" / "vms" / i / "work").exists() for i in gone)  # disks deleted

        result = run_cli("down", home=home, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(run_cli("report", "--json", home=home, check=True).stdout)
        assert report["preemptions"] >= 2 + 2 + 4 and report["preemptions_without_notice"] >= 2 + 4
        after = _global_epochs(home, report["run"], since=resumed_at)
        assert after and min(after) >= durable and all(b >= a for a, b in zip(after, after[1:]))  # never fell
    finally:
        run_cli("down", home=home, timeout=300)
        left = [n for n in namespaces() if n.startswith(cluster.cloud)]
        groups = [str(p) for p in Path("/sys/fs/cgroup").rglob(f"{cluster.cloud}*")]
        procs = processes_under(home)
        for pid in [int(p.split(":")[0]) for p in procs]:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", *left], check=False) if left else None
    assert left == [] and groups == [] and procs == []
    instances = cluster.provider.list_instances("geo-e2e")
    assert instances and all(i.state != "running" for i in instances)


def _global_epochs(home: Path, run: int, since: float) -> list[int]:
    """The swarm's epoch at each controller tick from `since` on (the highest any agent reported)."""
    from spotrain.ledger import Ledger

    ledger = Ledger.open_existing(home / "clusters" / "geo-e2e" / "ledger.db")
    by_tick: dict[float, int] = {}
    for m in (m for m in ledger.metrics(run) if m["t"] >= since and m["state"] == "training"):
        by_tick[m["t"]] = max(by_tick.get(m["t"], 0), m["epoch"])
    return [by_tick[t] for t in sorted(by_tick)]
