"""The controller's Prometheus endpoint over a real control loop, and the CLI's polish: version,
help on every option, the hidden agent command, the spec's JSON schema, progress off stdout."""

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import typer
import yaml
from conftest import ROOT, run_cli
from prometheus_client.parser import text_string_to_metric_families

from spotrain.cli import app
from spotrain.config import ClusterSpec
from spotrain.contracts.states import InstanceState
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.errors import SpecError, SpotrainError
from spotrain.ledger import Ledger
from spotrain.metrics import MetricsEndpoint
from spotrain.sim.clock import SimClock
from spotrain.sim.provider import SimProvider
from spotrain.sim.swarm import SimSwarm
from spotrain.sim.traces import load_traces
from spotrain.spec_file import load_spec
from spotrain.swarm_view import _orphan_safe_dht_class


def _simulated_loop(tmp_path: Path) -> tuple[ControlLoop, Ledger, SimSwarm, SimClock]:
    trace = tmp_path / "us-east-1a_v100_1.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [2] * 20}))
    spec = ClusterSpec.model_validate({"name": "metered", "budget": {"total_usd": 50.0},
                                       "placement": {"workers": 2, "locations": ["aws:us-east-1a"]}})
    clock = SimClock(0.0)
    provider = SimProvider(load_traces([trace]), clock)
    swarm = SimSwarm(provider, spec.task_profile(), clock, startup_seconds=60.0)
    ledger = Ledger(":memory:")
    run = ledger.open_run(spec.budget.total_usd, json.loads(spec.model_dump_json()), clock.now())
    loop = ControlLoop(spec, ledger, run, provider, swarm, LoopSettings(tick_seconds=120.0), say=lambda _: None,
                       clock=clock.now)
    return loop, ledger, swarm, clock


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_the_endpoint_serves_what_the_loop_last_saw(tmp_path):
    loop, ledger, swarm, clock = _simulated_loop(tmp_path)
    endpoint = MetricsEndpoint("127.0.0.1", 0)
    try:
        assert "spotrain_budget_usd" not in _scrape(endpoint.port)  # no loop yet: nothing to say
        endpoint.serve(loop)
        assert _scrape(endpoint.port)["spotrain_budget_usd"][0].value == 50.0  # before a tick: the budget only
        for _ in range(6):
            swarm.advance(120.0)
            clock.advance(120.0)
            loop.tick()
        families = _scrape(endpoint.port)
        observed = loop.last_observed
        assert observed is not None and observed.spent_usd > 0
        assert families["spotrain_spent_usd"][0].value == pytest.approx(observed.spent_usd)
        assert families["spotrain_samples_per_second"][0].value == pytest.approx(observed.samples_per_second)
        assert families["spotrain_global_epoch"][0].value == observed.global_epoch
        running = [i for i in observed.instances if i.state == InstanceState.RUNNING]
        assert sum(s.value for s in families["spotrain_workers"]) == len(running) == 2
        assert {s.labels["location"] for s in families["spotrain_workers"]} == {"aws:us-east-1a"}
        burn = sum(i.price_usd_per_hour for i in running) + observed.egress_usd_per_hour
        assert families["spotrain_burn_usd_per_hour"][0].value == pytest.approx(burn)
        left = families["spotrain_budget_left_seconds"][0].value
        assert left == pytest.approx((50.0 - observed.spent_usd) / burn * 3600.0)
    finally:
        endpoint.close()
        ledger.close()


def listening_holders(port: int) -> set[int]:
    """Pids of the processes holding a descriptor of the socket listening on `port` (from /proc:
    /proc/net/tcp* names the socket's inode, /proc/PID/fd links name "socket:[inode]")."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile (the listing's own descriptor, for one)
                continue
            if link in {f"socket:[{inode}]" for inode in inodes}:
                holders.add(int(fd_dir.parent.name))
    assert inodes, f"nothing listens on port {port}"
    return holders


def test_only_the_controller_holds_the_metrics_port_not_its_forked_dht():
    endpoint = MetricsEndpoint("127.0.0.1", 0)
    try:
        # the controller's own DHT class, forked after the port is taken, as `launch` does
        dht = _orphan_safe_dht_class()(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        try:
            assert dht.is_alive() and dht.pid != os.getpid()
            assert listening_holders(endpoint.port) == {os.getpid()}
            assert "spotrain_budget_usd" not in _scrape(endpoint.port)  # the parent still serves
        finally:
            dht.shutdown()
    finally:
        endpoint.close()


def test_a_busy_metrics_port_is_one_line_and_launch_writes_nothing(tmp_path):
    home, spec = tmp_path / "home", tmp_path / "busy.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SpotrainError, match=f"controller.metrics_port: cannot listen on 127.0.0.1:{port}"):
            MetricsEndpoint("127.0.0.1", port)
        spec.write_text(yaml.safe_dump({"name": "busy", "budget": {"total_usd": 1.0},
                                        "controller": {"metrics_port": port}}))
        result = run_cli("launch", str(spec), home=home, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"spotrain: error: controller.metrics_port: cannot listen on 127.0.0.1:{port}")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert not (home / "clusters" / "busy").exists()  # no lock file, no log, no ledger


def test_launch_without_gcp_credentials_is_one_line_and_writes_nothing(tmp_path):
    """Application Default Credentials looked for everywhere, found nowhere: no key file, no gcloud
    login, and the metadata server not asked (NO_GCE_CHECK; its address on a closed loopback port)."""
    home, spec = tmp_path / "home", tmp_path / "gcp.yaml"
    spec.write_text(yaml.safe_dump({"name": "nocreds", "budget": {"total_usd": 1.0},
                                    "providers": {"gcp": {"project": "my-proj", "zones": ["us-central1-a"]}}}))
    env = {key: value for key, value in os.environ.items() if key != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(SPOTRAIN_HOME=str(home), HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
               NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "spotrain", "launch", str(spec)], env=env, capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("spotrain: error: gcp: no credentials found")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""  # google.auth's own warning is quiet
    assert not home.exists()  # not even $SPOTRAIN_HOME


@pytest.mark.parametrize("controller, problem", [
    ({"metrics_port": 0}, "controller.metrics_port"),
    ({"metrics_port": 70000}, "controller.metrics_port"),
    ({"metrics_port": 9464, "metrics_host": "not-an-address"}, "controller.metrics_host"),
])
def test_bad_metrics_settings_name_the_key(tmp_path, controller, problem):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"name": "m", "budget": {"total_usd": 1.0}, "controller": controller}))
    with pytest.raises(SpecError, match=problem):
        load_spec(spec)


def test_version_is_the_installed_distribution(tmp_path):
    from importlib.metadata import version

    result = run_cli("--version", home=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"spotrain {version('spotrain')}"


def test_every_option_and_argument_has_help_and_agent_is_hidden(tmp_path):
    root = typer.main.get_command(app)
    assert hasattr(root, "commands")
    for name, command in root.commands.items():
        for param in command.params:
            if param.name in ("help",):
                continue
            assert getattr(param, "help", None), f"`spotrain {name}`: {param.name} has no help text"
    assert root.commands["agent"].hidden
    assert "agent" not in run_cli("--help", home=tmp_path).stdout.split("Commands")[-1].split()


def test_the_schema_describes_every_example_spec(tmp_path):
    result = run_cli("schema", home=tmp_path)
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False and schema["required"] == ["name", "budget"]
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        keys = set(yaml.safe_load(example.read_text()))
        assert keys <= set(schema["properties"]), f"{example.name}: {keys - set(schema['properties'])}"


def test_simulate_keeps_stdout_one_json_object(tmp_path):
    trace = tmp_path / "us-east-1a_v100_1.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": [1] * 24}))
    spec = tmp_path / "sim.yaml"
    spec.write_text(yaml.safe_dump({"name": "sim", "budget": {"total_usd": 100.0}}))
    result = run_cli("simulate", str(spec), "--trace", str(trace), "--policy", "spotrain", "--policy", "oracle",
                     "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p["policy"] for p in json.loads(result.stdout)["policies"]] == ["spotrain", "oracle"]
    assert "[2/2] oracle" in result.stderr  # the bars went to stderr
