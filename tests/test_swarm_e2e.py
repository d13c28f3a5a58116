"""SWARM through the CLI: examples/local-swarm.yaml's 3 stages on 6 stage peers and a trainer,
all real agents on 127.0.0.1, until the loss falls with every stage served; then `down`."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, processes_under, run_cli, wait_for

from spotrain.config import LocalProvider as LocalConfig
from spotrain.providers.local import LocalProvider


def report(home: Path) -> dict | None:
    result = run_cli("report", "--json", home=home)
    return json.loads(result.stdout) if result.returncode == 0 else None  # None: no ledger written yet


@pytest.mark.slow  # about 4 minutes on 2 loaded cores: seven agents start torch and hivemind
def test_the_swarm_example_trains_through_every_stage_and_down_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    spec = yaml.safe_load((ROOT / "examples" / "local-swarm.yaml").read_text())
    spec["providers"]["local"]["time_compression"] = 0.001  # no preemption: the loopback tests cover those
    path = tmp_path / "local-swarm.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_cli("launch", str(path), "--detach", "--duration", "900", home=home, check=True)

    def trained_through_every_stage() -> dict | None:
        data = report(home)
        if data is None or len(data["stages"]) < 3 or data["loss_last"] is None:
            return None
        return data if data["loss_last"] < data["loss_first"] - 0.3 else None

    data = wait_for(trained_through_every_stage, 600, "the loss to fall with every stage served", every=5.0)
    assert [stage["stage"] for stage in data["stages"]] == [0, 1, 2]
    assert all(stage["peers"] >= 1 and stage["samples_per_second"] > 0 for stage in data["stages"])
    assert data["samples"] > 0 and data["compression"]["activations"]["codec"] == "blockwise8"

    result = run_cli("down", home=home, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    cloud = LocalProvider(LocalConfig(), home / "local-cloud").list_instances("local-swarm")
    # seven, and a VM for each time a stage had fewer than two serving peers and none on its way
    launched_for_stages = report(home)["stage_peer_launches"]  # the ledger after `down`
    assert len(cloud) == 7 + launched_for_stages and all(i.state == "terminated" for i in cloud)
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")
