"""The cluster spec: frozen pydantic models, loaded from YAML with one-line errors."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from spotrain.contracts.errors import validation_error_line
from spotrain.errors import SpecError

if TYPE_CHECKING:
    from spotrain.providers.base import Offer

CLUSTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# spotrain.kernels.codecs.SPEC_CODECS names the same codecs (kept apart: the spec imports no hivemind)
GRADIENT_CODECS = ("none", "float16", "uniform8", "blockwise8", "blockwise4", "powersgd:RANK")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Frozen):
    total_usd: float = Field(gt=0)
    max_hourly_usd: float | None = Field(default=None, gt=0)
    deadline_hours: float | None = Field(default=None, gt=0, description="target_samples must be done by then")


class Compression(_Frozen):
    gradients: str = "none"
    state: str = "none"

    @field_validator("gradients")
    @classmethod
    def _known_gradient_codec(cls, value: str) -> str:
        prefix, _, rank = value.partition(":")
        if prefix == "powersgd" and rank.isdigit() and int(rank) > 0:
            return value
        return _known_codec(value, GRADIENT_CODECS)

    @field_validator("state")
    @classmethod
    def _known_state_codec(cls, value: str) -> str:
        return _known_codec(value, GRADIENT_CODECS[:-1])  # PowerSGD averages gradients, not parameters


def _known_codec(value: str, valid: tuple[str, ...]) -> str:
    if value not in valid or value == "powersgd:RANK":
        raise ValueError(f"unknown codec {value!r}; valid: {', '.join(valid)}")
    return value


class Training(_Frozen):
    mode: Literal["data-parallel"] = "data-parallel"
    code_dir: str | None = Field(
        default=None, validate_default=True,
        description="folder put first on the import path of the controller and every agent, so `task` may "
                    "live there; relative to the spec file; default: the spec file's folder")
    task: str = "spotrain.examples.tiny_gpt:task"
    target_batch_size: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0, description="samples per local step")
    target_epoch: int | None = Field(default=None, gt=0, description="end the run at this global epoch")
    target_samples: int | None = Field(default=None, gt=0, description="end the run after this many samples")
    t4_samples_per_second: float = Field(default=100.0, gt=0, description="one T4's samples/s on this task")
    throughput: dict[str, float] = Field(default_factory=dict, description="samples/s per GPU type, overrides")
    model_parameters: int | None = Field(
        default=None, gt=0, description="parameters averaged each step; None = counted from the task's model")
    compression: Compression = Compression()
    matchmaking_time: float = Field(default=3.0, gt=0)
    delayed_updates: bool = Field(
        default=True, description="average gradients and step the optimizer in the background, one epoch stale")
    averaging_timeout: float = Field(default=30.0, gt=0)

    @field_validator("code_dir")
    @classmethod
    def _absolute_code_dir(cls, value: str | None, info: ValidationInfo) -> str | None:
        spec_dir = (info.context or {}).get("spec_dir")
        if spec_dir is None:
            return value
        return str((Path(spec_dir) / (value or ".")).resolve())

    @field_validator("task")
    @classmethod
    def _task_imports(cls, value: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get("import_task", True):
            return value  # a stored spec, read to stop or show a cluster: user code plays no part
        from spotrain.contracts.task import load_task  # imports user code: only after the shape checks

        code_dir = info.data.get("code_dir")
        if code_dir and code_dir not in sys.path:
            sys.path.insert(0, code_dir)  # like a script's own folder: the user's modules come first
        load_task(value)
        return value


class Placement(_Frozen):
    # checked against spotrain.policies by the CLI: the spec imports no policy
    policy: str = "spotrain"
    workers: int = Field(default=2, gt=0)
    backups: int = Field(default=0, ge=0)
    gpu: tuple[str, ...] = ()
    locations: tuple[str, ...] | None = None


class Checkpoint(_Frozen):
    every_epochs: int = Field(default=5, gt=0)
    replicas: int = Field(default=2, gt=0)
    stores: tuple[str, ...] = Field(default=(), description="local directories (or file:// URLs)")

    @field_validator("stores")
    @classmethod
    def _local_stores(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for store in value:
            if "://" in store and not store.startswith("file://"):
                raise ValueError(f"unsupported store {store!r}: only local directories so far")
            if not store.removeprefix("file://").startswith("/"):
                raise ValueError(f"store {store!r} must be an absolute path")
        return value


class LocalLocation(_Frozen):
    price_usd_per_hour: float = Field(gt=0)
    trace: Literal["bamboo-p3", "bamboo-g4dn"] = "bamboo-p3"
    trace_offset_hours: float = Field(default=0.0, ge=0)


def _default_local_locations() -> dict[str, LocalLocation]:
    # Spot list prices of the instance types the traces were recorded on (us-east-1).
    return {
        "zone-a": LocalLocation(price_usd_per_hour=0.92, trace="bamboo-p3"),
        "zone-b": LocalLocation(price_usd_per_hour=0.19, trace="bamboo-g4dn"),
    }


class LocalProvider(_Frozen):
    locations: dict[str, LocalLocation] = Field(default_factory=_default_local_locations)
    time_compression: float = Field(default=60.0, gt=0, description="trace seconds per wall second")
    notice_seconds: float = Field(default=10.0, gt=0, description="wall seconds from notice to hard kill")
    unannounced_every: int = Field(default=0, ge=0, description="every Nth preemption has no notice; 0 = never")

    @field_validator("locations")
    @classmethod
    def _zone_names(cls, value: dict[str, LocalLocation]) -> dict[str, LocalLocation]:
        if not value:
            raise ValueError("at least one location is needed")
        for zone in value:
            if not zone or ":" in zone:
                raise ValueError(f"bad zone name {zone!r}")
        return value


_ZONE_PATTERN = r"^[a-z][a-z0-9-]*[a-z0-9]$"


class AwsProvider(_Frozen):
    """Spot instances on EC2; credentials come from boto3's standard chain, the endpoint from AWS_ENDPOINT_URL."""

    regions: tuple[str, ...] = Field(min_length=1)
    zones: tuple[str, ...] | None = Field(default=None, description="availability zones to use; None = all of regions'")
    instance_types: tuple[str, ...] = Field(default=("g4dn.xlarge",), min_length=1)
    max_price_usd_per_hour: float | None = Field(default=None, gt=0, description="spot bid cap; None = on-demand price")
    image_id: str | None = Field(default=None, description="AMI; None = the newest Ubuntu 22.04 Deep Learning AMI")
    key_name: str | None = None
    subnets: dict[str, str] = Field(default_factory=dict, description="availability zone -> subnet id")
    iam_instance_profile: str | None = Field(default=None, description="the worker role's instance profile name")
    worker_image: str | None = Field(default=None, description="run the agent from this image; None = pip install")
    swarm_port: int = Field(default=31337, ge=1024, le=65535)
    controller_cidr: str | None = Field(default=None, description="the controller's address, e.g. 203.0.113.7/32")

    @field_validator("regions", "zones")
    @classmethod
    def _names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            if not re.match(_ZONE_PATTERN, name):
                raise ValueError(f"bad region or zone name {name!r}")
        return value

    @model_validator(mode="after")
    def _zones_in_regions(self) -> AwsProvider:
        for zone in self.zones or ():
            if not any(region_of_zone("aws", zone) == region for region in self.regions):
                raise ValueError(f"zone {zone!r} is in none of the regions {', '.join(self.regions)}")
        return self


class GcpProvider(_Frozen):
    """Spot VMs on Compute Engine; credentials from Application Default Credentials."""

    project: str = Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    zones: tuple[str, ...] = Field(min_length=1)
    machine_types: tuple[str, ...] = Field(default=("g2-standard-4",), min_length=1)
    api_endpoint: str | None = Field(default=None, description="Compute Engine API root; None = Google's")
    image: str = "projects/ubuntu-os-cloud/global/images/family/ubuntu-2204-lts"
    network: str = "global/networks/default"
    service_account: str | None = Field(default=None, description="the worker's service account e-mail")
    worker_image: str | None = Field(default=None, description="run the agent from this image; None = pip install")
    spot_prices_usd_per_hour: dict[str, float] = Field(default_factory=dict, description="machine type -> USD/h")
    swarm_port: int = Field(default=31337, ge=1024, le=65535)
    controller_cidr: str | None = None

    @model_validator(mode="after")
    def _priced(self) -> GcpProvider:
        from spotrain.providers.gcp_prices import SPOT_USD_PER_HOUR, spot_price

        for machine_type in self.machine_types:
            if spot_price(machine_type, self.spot_prices_usd_per_hour) is None:
                raise ValueError(f"no spot price for machine type {machine_type!r}: set spot_prices_usd_per_hour "
                                 f"or use one of {', '.join(SPOT_USD_PER_HOUR)}")
        return self

    @field_validator("zones")
    @classmethod
    def _zone_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for zone in value:
            if not re.match(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$", zone):
                raise ValueError(f"bad zone name {zone!r} (e.g. us-central1-a)")
        return value


def region_of_zone(provider: str, zone: str) -> str:
    """us-east-1a -> us-east-1 (AWS); us-central1-a -> us-central1 (GCP)."""
    return zone.rsplit("-", 1)[0] if provider == "gcp" else zone.rstrip("abcdefghijklmnopqrstuvwxyz")


class Providers(_Frozen):
    # The embedded default: enabled when named in the spec or when no cloud provider is.
    local: LocalProvider = LocalProvider()
    aws: AwsProvider | None = None
    gcp: GcpProvider | None = None

    def enabled(self) -> list[str]:
        clouds = [name for name in ("aws", "gcp") if getattr(self, name) is not None]
        return (["local"] if "local" in self.model_fields_set or not clouds else []) + clouds

    @model_serializer(mode="wrap")
    def _dump_enabled_only(self, handler):  # a dumped spec (the ledger keeps one) loads back the same
        data = handler(self)
        enabled = self.enabled()
        return {key: value for key, value in data.items() if key in enabled}


class Controller(_Frozen):
    reachable: Literal["auto", "yes", "no"] = Field(
        default="auto", description="can agents dial the controller? no: it joins the swarm as a DHT client "
                                    "(a laptop behind NAT); auto: yes for the local cloud, else probed")


class ClusterSpec(_Frozen):
    name: str = Field(pattern=CLUSTER_NAME_PATTERN)
    budget: Budget
    training: Training = Training()
    placement: Placement = Placement()
    checkpoint: Checkpoint = Checkpoint()
    providers: Providers = Providers()
    controller: Controller = Controller()

    @model_validator(mode="after")
    def _locations_known(self) -> ClusterSpec:
        known = self.known_locations()
        for index, location in enumerate(self.placement.locations or ()):
            if location not in known:
                raise ValueError(f"placement.locations.{index}: unknown location {location!r} "
                                 f"(known: local zones and the catalog's, see `spotrain prices`)")
        return self

    def known_locations(self) -> list[str]:
        """Every location a spec may name: its providers' and the catalog's (for planning)."""
        from spotrain.market import known_locations

        return self.provider_locations() + sorted(known_locations() - set(self.provider_locations()))

    def provider_locations(self) -> list[str]:
        """Local zones, cloud regions and their configured zones, of the enabled providers."""
        providers, known = self.providers, []
        if "local" in providers.enabled():
            known += [f"local:{zone}" for zone in providers.local.locations]
        if providers.aws is not None:
            known += [f"aws:{region}" for region in providers.aws.regions]
            known += [f"aws:{zone}" for zone in providers.aws.zones or ()]
        if providers.gcp is not None:
            known += list(dict.fromkeys(f"gcp:{region_of_zone('gcp', z)}" for z in providers.gcp.zones))
            known += [f"gcp:{zone}" for zone in providers.gcp.zones]
        return known

    def allowed_locations(self) -> list[str]:
        return list(self.placement.locations or self.provider_locations())

    def allows(self, location: str) -> bool:
        """True when `location` ("aws:us-east-1a") is allowed itself or through its region ("aws:us-east-1")."""
        allowed = self.allowed_locations()
        if location in allowed:
            return True
        provider, _, zone = location.partition(":")
        return provider in ("aws", "gcp") and f"{provider}:{region_of_zone(provider, zone)}" in allowed

    def usable_offers(self, offers: Iterable[Offer]) -> tuple[Offer, ...]:
        """The offers the loop may use, for plan, launch and simulate alike: in an allowed location
        (a region allows its zones) and of a wanted GPU type (local CPU workers always qualify)."""
        gpus = set(self.placement.gpu)
        return tuple(o for o in offers
                     if self.allows(o.location) and (not gpus or o.gpu in gpus or o.provider == "local"))

    def with_budget(self, total_usd: float) -> ClusterSpec:
        if total_usd <= 0:
            raise SpecError(f"--budget: must be greater than 0 (got {total_usd})")
        budget = self.budget.model_copy(update={"total_usd": total_usd})
        return self.model_copy(update={"budget": budget})


def parse_spec(data: object, path: Path, import_task: bool = True) -> ClusterSpec:
    """Validate a spec read from `path`: `training.code_dir` is resolved against its folder, and the
    task is imported (from there) unless `import_task` is False."""
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    try:
        return ClusterSpec.model_validate(data, context={"spec_dir": path.parent, "import_task": import_task})
    except ValidationError as error:
        raise SpecError(validation_error_line(path, error)) from None


def stored_spec(data: dict) -> ClusterSpec:
    """A spec as the ledger keeps it (its code_dir already absolute), read without importing the task:
    `down`, `status`, `report`, `logs` and `export` must work when the user's code is gone."""
    try:
        return ClusterSpec.model_validate(data, context={"import_task": False})
    except ValidationError as error:
        raise SpecError(validation_error_line(Path("stored spec"), error)) from None


def load_spec(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecError(f"{path}: {where}YAML syntax error: {problem}") from None
    return parse_spec(data, path)
