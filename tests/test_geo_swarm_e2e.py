"""SWARM on the emulated multi-region cloud through the CLI: examples/local-geo-swarm.yaml (3 stages,
a trainer and 7 stage peers in two regions, the controller behind NAT) until every stage has a peer
in each region; then a stage peer of one stage is preempted with notice and one of each other
stage without, the controller refills the stages, stages span both regions again, and the demo's
check (loss fell, retries, stage checkpoints in each region's bucket, spend, `down` leaving
nothing) passes."""

import json
import os
import re
import signal
import subprocess
import sys
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
NAME = "geoswarm-e2e"
REGIONS = ("local:eu-west", "local:us-east")


def spec_file(tmp_path: Path) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "local-geo-swarm.yaml").read_text())
    spec["name"] = NAME
    spec["checkpoint"]["stores"] = [{"url": f"s3://{region}/{NAME}?endpoint=http://198.18.{n}.2:9000",
                                     "domain": f"local:{region}"} for n, region in ((31, "us-east"), (32, "eu-west"))]
    local = spec["providers"]["local"]
    local["regions"] = {"us-east": {"subnet": "198.18.31.0/24"}, "eu-west": {"subnet": "198.18.32.0/24"}}
    local["time_compression"] = 0.001  # no trace preemption: the test preempts
    spec["checkpoint"]["every_epochs"] = 2  # stage checkpoints every 2 averaging rounds: sooner in both regions
    path = tmp_path / "geo-swarm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def report(home: Path) -> dict | None:
    result = run_cli("report", "--json", home=home)
    return json.loads(result.stdout) if result.returncode == 0 else None


def spanning(home: Path, peers: int = 1) -> dict | None:
    """The report once every stage has `peers` serving peers and one in each region."""
    data = report(home)
    stages = data["stages"] if data else []
    ok = len(stages) == 3 and all(s["peers"] >= peers and tuple(s.get("domains", ())) == REGIONS for s in stages)
    return data if ok else None


def serving_stage_peers(vms: Path) -> dict[str, int]:
    """Instance id -> the stage its agent serves now, of the running VMs whose user-data names the stage role."""
    found = {}
    for vm in vms.iterdir():
        log, data = vm / "agent.log", vm / "user-data.json"
        if not (vm / "work").exists() or not log.exists() or not data.exists():
            continue  # gone (its disk deleted) or not booted yet
        if json.loads(data.read_text()).get("pipeline", {}).get("role") != "stage":
            continue
        stages = re.findall(r"(?:serving stage|now serving stage) (\d+)", log.read_text(errors="replace"))
        if stages and "drained after" not in log.read_text(errors="replace"):
            found[vm.name] = int(stages[-1])
    return found


def check_script():
    """examples/check_geo_swarm_demo.py as a module (its checks run only as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_geo_swarm_demo", ROOT / "examples" / "check_geo_swarm_demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_span_two_regions_survive_preemptions_and_the_demo_check_passes(tmp_path):
    home = tmp_path / "home"
    path = spec_file(tmp_path)
    provider = LocalProvider(load_spec(path).providers.local, home / "local-cloud")
    cloud = provider.cloud(NAME).plan.cloud
    vms = home / "local-cloud" / "vms"
    try:
        run_cli("launch", str(path), "--detach", "--duration", "1500", home=home, check=True)
        wait_for(lambda: spanning(home), 600, "every stage served from both regions", every=5)
        peers = serving_stage_peers(vms)
        for instance_id in peers:  # stage peers announce their namespace's address
            assert re.search(r"joined the swarm as \S+ at /ip4/198\.18\.3[12]\.\d+/",
                             (vms / instance_id / "agent.log").read_text(errors="replace"))
        # a stage peer of each stage: one with notice, two without (a retry needs a call in flight to a
        # killed peer, or one routed to it before its record goes: one kill had neither in a run)
        by_stage: dict[int, str] = {}
        for instance_id, stage in sorted(peers.items()):
            by_stage.setdefault(stage, instance_id)
        noticed, *killed = list(by_stage.values())
        provider.interrupt(noticed, notice=True)
        for instance_id in killed:
            provider.interrupt(instance_id, notice=False)
        wait_for(lambda: all(i.state != "running" for i in provider.list_instances(NAME)
                             if i.instance_id in (noticed, *killed)), 120, "the preempted VMs to end")
        # the controller refills the stages; newcomers join where their region is missing
        wait_for(lambda: len(set(serving_stage_peers(vms)) - set(peers)) >= 3, 600, "three new stage peers serving",
                 every=5)
        wait_for(lambda: spanning(home, peers=2), 600, "two peers per stage, from both regions, again", every=5)
        # the demo's check wants a stage checkpoint in each region's bucket: a short run may not have one yet
        wait_for(lambda: all(check_script().checkpoints_in_buckets(home, NAME).values()), 600,
                 "a stage checkpoint in each region's bucket", every=10)
        check = subprocess.run([sys.executable, str(ROOT / "examples" / "check_geo_swarm_demo.py")],
                               env={**os.environ, "SPOTRAIN_HOME": str(home)}, capture_output=True, text=True,
                               timeout=600, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        data = report(home)
        assert data["preemptions"] >= 3 and data["preemptions_without_notice"] >= 2
    finally:
        run_cli("down", home=home, timeout=300)
        left = [n for n in namespaces() if n.startswith(cloud)]
        groups = [str(p) for p in Path("/sys/fs/cgroup").rglob(f"{cloud}*")]
        procs = processes_under(home)
        for pid in [int(p.split(":")[0]) for p in procs]:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", *left], check=False) if left else None
    assert left == [] and groups == [] and procs == []
