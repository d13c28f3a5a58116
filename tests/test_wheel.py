"""A built wheel installs the design card's folders under one namespace."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_imports_the_mapped_packages(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("spotrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("spotrain/providers/local.py", "spotrain/agents/daemon.py", "spotrain/kernels/codecs.py",
                 "spotrain/kernels/native_blockwise.c", "spotrain/policies/cost_per_sample.py",
                 "spotrain/data/traces/bamboo-p3.csv", "spotrain/data/NOTICE", "spotrain/providers/aws.py",
                 "spotrain/infra/cloud-init.yaml.tmpl", "spotrain/infra/spotrain-agent.service",
                 "spotrain/contracts/states.py", "spotrain/sim/provider.py", "spotrain/sim/swarm.py",
                 "spotrain/contracts/agent_config.py", "spotrain/agents/roles/data_parallel.py",
                 "spotrain/stores/s3.py", "spotrain/stores/gcs.py", "spotrain/stores/local.py"):
        assert path in names
    assert not [n for n in names if n.startswith(("providers/", "agents/", "kernels/", "infra/", "stores/", "tests/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # dependencies come from this environment; spotrain itself only from the wheel
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    code = ("import spotrain, spotrain.providers.local, spotrain.agents.daemon, spotrain.kernels as k; "
            "from spotrain.providers.local_schedule import trace_nodes; import spotrain.sim.engine; "
            "from spotrain.providers.bootstrap import render_cloud_init; "
            "print(spotrain.__file__); print(len(trace_nodes('bamboo-p3')[0])); print(k.get_codec('float16')); "
            "from spotrain.kernels import native; print(native.SOURCE.exists()); "
            "from spotrain.contracts.agent_config import AgentConfig; "
            "config = AgentConfig.model_validate({'cluster': 'c', 'initial_peers': [], 'task': 'm:t', "
            "'training': {'batch_size': 8, 'target_batch_size': 64, "
            "'compression': {'gradients': 'none', 'state': 'none'}, "
            "'matchmaking_time': 2.0, 'averaging_timeout': 15.0}, 'checkpoint': {'store': 'c', 'every_epochs': 1}, "
            "'code': {'wheel': {'url': 'file:///w', 'name': 'w.whl', 'sha256': 64 * 'a', 'size': 1}}}); "
            "print(render_cloud_init(config, 'aws').splitlines()[0]); "
            "from spotrain.stores import open_store; print(open_store('s3://bucket/run').url)")
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(venv))
    assert out[1] == "177"
    assert out[3] == "True"  # the C source of the fused codec path ships beside its loader
    assert out[4] == "#cloud-config"  # infra/ templates ship as package data
    assert out[5] == "s3://bucket/run"  # the stores wing, with its schemes

    # an installed spotrain ships itself: its files are packed back into a wheel (spotrain/wheel_build.py)
    repack = ("from pathlib import Path; from spotrain.wheel_build import running_wheel, source_root; "
              f"print(source_root()); print(running_wheel(Path({str(tmp_path / 'cache')!r})))")
    out = subprocess.run([str(python), "-c", repack], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.splitlines()
    assert out[0] == "None"
    packed = zipfile.ZipFile(out[1])
    assert packed.testzip() is None and Path(out[1]).name == wheel.name
    original = {n for n in names if not n.endswith("/RECORD")}
    assert {n for n in packed.namelist() if not n.endswith("/RECORD")} == original
    again = subprocess.run([str(python), "-c", repack], check=True, capture_output=True, text=True, env=env,
                           cwd=tmp_path).stdout.splitlines()
    assert again[1] == out[1]  # cached by the content's hash
