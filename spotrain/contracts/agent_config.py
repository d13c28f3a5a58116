"""The agent's input: the user-data every VM is started with (documented in infra/README.md).

The controller builds one `AgentConfig` per launch (`ControlLoop.agent_config`); a provider only
completes what it alone knows (`AgentConfig.for_vm`); the agent parses it once
(`AgentConfig.from_json`). It is frozen, rejects unknown keys, and carries a version, so an agent
older than its controller refuses a config it cannot read instead of misreading it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spotrain.contracts.errors import validation_error_line

CONFIG_VERSION = 1  # raise when a field changes meaning or a required one is added

MetadataKind = Literal["aws-imdsv2", "gce"]
TrainingMode = Literal["data-parallel", "swarm"]


class AgentConfigError(ValueError):
    """User-data the agent cannot use: one line naming the file and the key."""


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CompressionSettings(_Contract):
    gradients: str  # a codec of spotrain.kernels.table
    state: str
    activations: str | None = None  # swarm mode: activations and their gradients between stages


class TrainingSettings(_Contract):
    batch_size: int = Field(gt=0)  # samples per local step
    target_batch_size: int = Field(gt=0)  # samples per global epoch
    compression: CompressionSettings
    matchmaking_time: float = Field(gt=0)
    averaging_timeout: float = Field(gt=0)
    delayed_updates: bool = False
    group_size: int | None = Field(default=None, gt=0)  # the swarm's expected size, for averaging groups


class PipelineSettings(_Contract):
    """Swarm mode: the controller names the role; a stage peer picks its stage from the DHT's records."""

    role: Literal["trainer", "stage"]
    stages: int = Field(ge=2)
    max_in_flight: int = Field(default=2, gt=0)  # a trainer's microbatches in flight
    rebalance_seconds: float = Field(default=30.0, gt=0)  # a stage peer's move checks, jittered


class CheckpointSettings(_Contract):
    store: str  # the store this agent writes, its own failure domain's: a path, s3:// or gs:// (spotrain.stores)
    every_epochs: int = Field(gt=0)
    restore: tuple[str, ...] = ()  # every store, nearest first, to restore from; empty: `store` alone

    def restore_order(self) -> tuple[str, ...]:
        return self.restore or (self.store,)


class MetadataEndpoint(_Contract):
    """Where the VM's metadata service answers (the environment may override it)."""

    kind: MetadataKind
    url: str


class ShippedFile(_Contract):
    """One object the controller shipped for the VM to install: where to fetch it and what it must be."""

    url: str  # https:// (an S3 URL the controller presigned), file:// (a directory store), or a GCS media URL
    auth: Literal["none", "gce-metadata"] = "none"  # gce-metadata: a bearer token of the VM's service account
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")  # the file name (pip reads a wheel's)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ShippedCode(_Contract):
    """What a cloud VM installs before its agent starts (spotrain/shipping.py ships it; the VM's
    bootstrap, spotrain/infra/install_shipped.py, fetches, verifies and installs it)."""

    wheel: ShippedFile  # the exact spotrain build the controller runs
    archive: ShippedFile | None = None  # the task's code_dir as a tar.gz, unpacked onto the agent's PYTHONPATH


class AgentConfig(_Contract):
    version: int = Field(default=CONFIG_VERSION, ge=1)
    cluster: str  # also the hivemind run_id and the prefix of the swarm's DHT records
    initial_peers: tuple[str, ...]  # multiaddrs of the controller's DHT peer and running agents
    task: str  # "module:attr" of a TrainingTask (a PipelineTask in swarm mode)
    training: TrainingSettings
    mode: TrainingMode = "data-parallel"
    pipeline: PipelineSettings | None = None  # swarm mode only
    checkpoint: CheckpointSettings
    torch_threads: int = Field(default=1, gt=0)
    sigterm_grace_seconds: float = Field(default=10.0, gt=0)  # a user's termination: drain this long
    # completed by the provider
    instance_id: str | None = None  # None on EC2: only the VM knows its id, the agent asks IMDS
    location: str | None = None
    metadata: MetadataEndpoint | None = None
    host: str = "127.0.0.1"  # where the agent's swarm peer listens; port 0: a free port, kept across restarts
    port: int = Field(default=0, ge=0, le=65535)
    # the address peers reach the agent at; None: ask the metadata service (a VM's private and public IPs)
    announce_host: str | None = None
    code: ShippedCode | None = None  # cloud VMs: the build and the task's code to install; absent: already there

    @model_validator(mode="after")
    def _pipeline_in_swarm_mode(self) -> AgentConfig:
        if (self.mode == "swarm") != (self.pipeline is not None):
            raise ValueError("pipeline is given in swarm mode and only then")
        if self.mode == "swarm" and self.training.compression.activations is None:
            raise ValueError("swarm mode needs training.compression.activations")
        return self

    def for_vm(self, *, location: str, instance_id: str | None = None, metadata: MetadataEndpoint | None = None,
               host: str | None = None, port: int | None = None, announce_host: str | None = None) -> AgentConfig:
        """This config completed with what only the provider knows; fields left None stay as they are."""
        update: dict[str, Any] = {"location": location, "instance_id": instance_id, "metadata": metadata,
                                  "host": host, "port": port, "announce_host": announce_host}
        return self.model_copy(update={k: v for k, v in update.items() if v is not None})

    def wire(self) -> dict[str, Any]:
        """The JSON document a VM gets (absent optional fields are left out, and so is the
        data-parallel mode: agents older than swarm mode read such a config as before)."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.mode == "data-parallel":
            del data["mode"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.wire(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: object = "user-data") -> AgentConfig:
        """Parse user-data; AgentConfigError (one line, naming `source` and the key) when it is unusable."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise AgentConfigError(f"{source}: not JSON: {error}") from None
        if not isinstance(data, dict):
            raise AgentConfigError(f"{source}: user-data must be a JSON object")
        version = data.get("version", CONFIG_VERSION)
        # before the fields: a newer config may have keys this agent would call unknown
        if isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_VERSION:
            raise AgentConfigError(f"{source}: user-data version {version} is newer than this agent "
                                   f"understands ({CONFIG_VERSION}): upgrade spotrain on the VM")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise AgentConfigError(validation_error_line(source, error)) from None
