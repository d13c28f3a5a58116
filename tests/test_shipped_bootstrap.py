"""The whole path a cloud VM takes, here: the controller builds the wheel of this checkout and ships
it and a task folder to moto's S3; the AWS provider's cloud-init is rendered; its install step
runs (the installer and user-data it writes, the command it runs) into a fresh venv with
--system-site-packages; spotrain then imports from that venv and the task from the unpacked code."""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import agent_config

from spotrain.providers.bootstrap import AGENT_CONFIG_PATH, INSTALLER_PATH, VENV, install_command, render_cloud_init
from spotrain.shipping import Shipment, ship_for
from spotrain.store_domains import DomainStore, StorePlacement
from spotrain.wheel_build import running_wheel


@pytest.mark.slow  # a venv and a pip install: about 90 s on two busy cores
def test_a_vm_installs_the_shipped_build_from_the_bucket_and_imports_the_task(aws, tmp_path):
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="boot")
    code = tmp_path / "my-model"
    code.mkdir()
    (code / "my_task.py").write_text("ANSWER = 'from the shipped code'\n")
    placement = StorePlacement((DomainStore("s3://boot/run", "aws:us-east-1"),))
    lines: list[str] = []
    shipment: Shipment = ship_for(placement, ["aws:us-east-1a"], running_wheel, str(code), lines.append)
    assert lines and lines[0].startswith("shipped spotrain-") and "s3://boot/run/code/" in lines[0]
    config = agent_config(task="my_task:task", code=shipment.code_for("aws:us-east-1b"))
    cloud_init = yaml.safe_load(render_cloud_init(config, "aws"))
    files = {f["path"]: base64.b64decode(f["content"]) for f in cloud_init["write_files"]}
    vm = tmp_path / "vm"  # the VM's /etc/spotrain and /opt/spotrain, moved under tmp_path
    (vm / "etc").mkdir(parents=True)
    (vm / "etc" / "install_shipped.py").write_bytes(files[INSTALLER_PATH])
    (vm / "etc" / "user-data.json").write_bytes(files[AGENT_CONFIG_PATH])
    step = cloud_init["runcmd"][0][-1].split(" && ")[0]
    assert step == install_command()
    command = (step.replace(INSTALLER_PATH, str(vm / "etc" / "install_shipped.py"))
               .replace(AGENT_CONFIG_PATH, str(vm / "etc" / "user-data.json")).replace(VENV, str(vm / "opt")))
    # offline here: the wheel's dependencies come from this environment instead of the index
    argv = [sys.executable, *shlex.split(command)[1:], "--no-deps", "--no-index"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("spotrain bootstrap: installed spotrain-")

    python = vm / "opt" / "bin" / "python"
    assert "include-system-site-packages = true" in (vm / "opt" / "pyvenv.cfg").read_text()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(vm / "opt" / "code"), sysconfig.get_paths()["purelib"]]))
    probe = ("import spotrain, my_task; from spotrain.agents import daemon; "
             "print(spotrain.__file__); print(my_task.ANSWER)")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120, check=True).stdout.splitlines()
    assert Path(out[0]).is_relative_to(vm / "opt")  # the shipped build, not this checkout
    assert out[1] == "from the shipped code"
    agent = subprocess.run([str(vm / "opt" / "bin" / "spotrain"), "--version"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert agent.returncode == 0 and "0.1.0" in agent.stdout
