"""Renders a cloud VM's user-data from infra/: cloud-init that installs and starts the agent.

The agent's config (`spotrain.contracts.agent_config.AgentConfig`) goes in as JSON (see
infra/README.md); its one secret is the VM's own libp2p identity (`admission.identity`, written
0600 and handed to the agent as a systemd credential); `render_cloud_init` refuses keys that look
like cloud credentials. Without a `worker_image`, the VM installs what the controller shipped (the
config's `code`: spotrain/shipping.py) with infra/install_shipped.py, which verifies every
digest; the agent starts only when that succeeded. Nothing is installed by a package name of
spotrain's own.
"""

from __future__ import annotations

import base64
import re
import shlex
from importlib import resources
from string import Template

from spotrain.contracts.agent_config import AgentConfig, MetadataEndpoint

SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|private_key|access_key", re.IGNORECASE)
AGENT_CONFIG_PATH = "/etc/spotrain/user-data.json"  # 0600, root's: it holds the VM's identity
CREDENTIAL_PATH = "%d/user-data.json"  # systemd's LoadCredential copy, readable by the agent's dynamic user
INSTALLER_PATH = "/etc/spotrain/install_shipped.py"
VENV = "/opt/spotrain"  # the shipped wheel's venv; the task's code is unpacked into VENV/code
METADATA = {  # where each cloud's agent finds its metadata service
    "aws": MetadataEndpoint(kind="aws-imdsv2", url="http://169.254.169.254"),
    "gcp": MetadataEndpoint(kind="gce", url="http://metadata.google.internal"),
}


def infra_text(name: str) -> str:
    return resources.files("spotrain.infra").joinpath(name).read_text()


def b64_file(name: str) -> str:
    return base64.b64encode(infra_text(name).encode()).decode()


def secret_keys(value: object, path: str = "") -> list[str]:
    """Key paths in `value` whose names look like credentials."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if SECRET_KEY.search(str(key)):
                found.append(where)
            found += secret_keys(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += secret_keys(item, f"{path}.{index}")
    return found


def render_cloud_init(config: AgentConfig, cloud: str, worker_image: str | None = None) -> str:
    """The #cloud-config for one worker; `worker_image` runs the agent in Docker, else pip installs it."""
    leaked = secret_keys(config.wire())
    if leaked:
        raise ValueError(f"refusing to put credential-like keys in user-data: {', '.join(leaked)}")
    if worker_image:
        config = config.model_copy(update={"code": None})  # the image carries spotrain and the task
    elif config.code is None:
        raise ValueError("no shipped build in the agent's config and no worker_image: "
                         "nothing for the VM to install")
    metadata = METADATA[cloud]
    if worker_image:
        install = f"docker pull {shlex.quote(worker_image)}"
        exec_start = (f"/usr/bin/docker run --rm --name spotrain-agent --network host --gpus all "
                      f"-v {CREDENTIAL_PATH}:{AGENT_CONFIG_PATH}:ro -e SPOTRAIN_METADATA_KIND -e SPOTRAIN_METADATA_URL "
                      f"{worker_image} --user-data {AGENT_CONFIG_PATH}")
        groups = "docker"
    else:
        install = install_command()
        exec_start = f"/usr/bin/env PYTHONPATH={VENV}/code {VENV}/bin/spotrain agent --user-data {CREDENTIAL_PATH}"
        groups = ""
    unit = Template(infra_text("spotrain-agent.service")).substitute(
        metadata_kind=metadata.kind, metadata_url=metadata.url, exec_start=exec_start, groups=groups)
    return Template(infra_text("cloud-init.yaml.tmpl")).substitute(
        agent_json_b64=base64.b64encode(config.to_json().encode()).decode(),
        unit_b64=base64.b64encode(unit.encode()).decode(),
        failed_unit_b64=b64_file("spotrain-agent-failed.service"),
        failed_script_b64=b64_file("spotrain-agent-failed.sh"),
        installer_b64=b64_file("install_shipped.py"),
        install_command=install.replace('"', '\\"'),
    )


def install_command(user_data: str = AGENT_CONFIG_PATH, venv: str = VENV) -> str:
    """The shell step that installs the shipped build (tests run it against a local bucket)."""
    return f"python3 {INSTALLER_PATH} {shlex.quote(user_data)} {shlex.quote(venv)}"
