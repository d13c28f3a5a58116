"""The cluster spec: frozen pydantic models (spotrain.spec_file reads them from YAML with one-line errors)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from spotrain.errors import SpecError
from spotrain.policies import check_policy_name
from spotrain.store_domains import PROVIDERS, DomainStore, StorePlacement
from spotrain.throughput import TaskProfile, counted_parameters, wire_ratio

if TYPE_CHECKING:
    from spotrain.providers.base import Offer

CLUSTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# spotrain.kernels.codecs.SPEC_CODECS names the same codecs (kept apart: the spec imports no hivemind)
GRADIENT_CODECS = ("none", "float16", "uniform8", "blockwise8", "blockwise4", "powersgd:RANK")


# Upper bounds (docs/bad-input.md lists them): far beyond any real run, they keep a typo such as
# `workers: 100000000` from becoming a planner that spins for minutes or a runaway fleet.
MAX_INSTANCES = 1000
MAX_HOURS = 87_600.0  # ten years


class _Frozen(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` anywhere (a budget, a throughput) is an error, not "no limit"
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Budget(_Frozen):
    total_usd: float = Field(gt=0)
    max_hourly_usd: float | None = Field(default=None, gt=0)
    deadline_hours: float | None = Field(default=None, gt=0, le=MAX_HOURS,
                                         description="target_samples must be done by then")


class Compression(_Frozen):
    gradients: str = "none"
    state: str = "none"
    activations: str = Field(default="blockwise8", description="swarm mode: activations and their gradients")

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

    @field_validator("activations")
    @classmethod
    def _known_activation_codec(cls, value: str) -> str:
        return _known_codec(value, GRADIENT_CODECS[:-1])  # PowerSGD needs a gradient history


def _known_codec(value: str, valid: tuple[str, ...]) -> str:
    if value not in valid or value == "powersgd:RANK":
        raise ValueError(f"unknown codec {value!r}; valid: {', '.join(valid)}")
    return value


class Pipeline(_Frozen):
    """`training.mode: swarm`: the task's stages, served by stage peers, driven by trainers."""

    stages: int = Field(default=3, ge=2, description="must equal the PipelineTask's number of stages")
    trainers: int = Field(default=1, gt=0, description="workers that draw batches; the rest serve stages")
    max_in_flight: int = Field(default=2, gt=0, description="microbatches each trainer has in flight")
    rebalance: bool = Field(default=True, description="false: stage peers never move to another stage (a newcomer "
                                                      "still joins the stage that limits the pipeline)")
    rebalance_seconds: float = Field(default=30.0, gt=0, le=86_400,
                                     description="how often (jittered) a stage peer checks whether to move stage")


class Training(_Frozen):
    mode: Literal["data-parallel", "swarm"] = "data-parallel"
    pipeline: Pipeline = Pipeline()
    code_dir: str | None = Field(
        default=None, validate_default=True,
        description="folder put first on the import path of the controller and every agent, so `task` may "
                    "live there; relative to the spec file; default: the spec file's folder")
    task: str = "spotrain.examples.tiny_gpt:task"
    target_batch_size: int = Field(default=256, gt=0, le=10**9)
    batch_size: int = Field(default=8, gt=0, le=10**6, description="samples per local step")
    target_epoch: int | None = Field(default=None, gt=0, le=10**9, description="end the run at this global epoch")
    target_samples: int | None = Field(default=None, gt=0, le=10**15,
                                       description="end the run after this many samples")
    t4_samples_per_second: float = Field(default=100.0, gt=0, le=1e9, description="one T4's samples/s on this task")
    throughput: dict[str, Annotated[float, Field(gt=0, le=1e9)]] = Field(
        default_factory=dict, description="samples/s per GPU type, overrides")
    model_parameters: int | None = Field(
        default=None, gt=0, le=10**13,
        description="parameters averaged each step; None = counted from the task's model")
    compression: Compression = Compression()
    memory_per_worker_gb: float | None = Field(
        default=None, gt=0, le=1e6,
        description="memory one worker has for training; a task that needs more (weights, gradients, Adam) is "
                    "refused: the whole model in data-parallel mode, the largest stage in swarm mode")
    matchmaking_time: float = Field(default=3.0, gt=0, le=3600)
    delayed_updates: bool = Field(
        default=True, description="average gradients and step the optimizer in the background, one epoch stale")
    averaging_timeout: float = Field(default=30.0, gt=0, le=86_400)

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
        # imports user code: only after the shape checks
        from spotrain.contracts.task import TaskImportError, load_pipeline_task, load_task

        code_dir = info.data.get("code_dir")
        if code_dir and code_dir not in sys.path:
            sys.path.insert(0, code_dir)  # like a script's own folder: the user's modules come first
        try:
            if info.data.get("mode") != "swarm":
                load_task(value)
                return value
            stages, pipeline = load_pipeline_task(value).num_stages, info.data.get("pipeline")
        except TaskImportError:
            raise
        except Exception as error:  # noqa: BLE001 - the named callable failed when called: a bad spec, one line
            raise ValueError(f"building the task {value!r} failed: {type(error).__name__}: {error}") from None
        if pipeline is not None and stages != (wanted := pipeline.stages):
            raise ValueError(f"{value} has {stages} stages, training.pipeline.stages says {wanted}")
        return value


class Placement(_Frozen):
    policy: str = "spotrain"
    workers: int = Field(default=2, gt=0, le=MAX_INSTANCES)
    backups: int = Field(default=0, ge=0, le=MAX_INSTANCES)
    gpu: tuple[str, ...] = ()
    locations: tuple[str, ...] | None = None

    @field_validator("policy")
    @classmethod
    def _registered_policy(cls, value: str) -> str:
        return check_policy_name(value)  # the registry names every policy; none is imported by name


class CheckpointStoreSpec(_Frozen):
    """A store in one failure domain (spotrain/store_domains.py): a region ("aws:us-east-1"), a
    local zone ("local:zone-a") or a whole cloud ("aws")."""

    url: str
    domain: str


class Checkpoint(_Frozen):
    every_epochs: int = Field(default=5, gt=0, le=10**6)
    replicas: int = Field(default=2, gt=0, le=MAX_INSTANCES)
    stores: tuple[str | CheckpointStoreSpec, ...] = Field(
        default=(), max_length=MAX_INSTANCES,
        description="a path, file://, s3:// or gs:// URL (a store of every failure domain), or {url, domain}")

    @field_validator("stores")
    @classmethod
    def _store_urls(cls, value: tuple[str | CheckpointStoreSpec, ...]) -> tuple[str | CheckpointStoreSpec, ...]:
        from spotrain.stores import StoreURLError, check_store_url

        urls = [store if isinstance(store, str) else store.url for store in value]
        places = [url.removeprefix("file://") for url in urls]  # a path and its file:// URL are one store
        for index, url in enumerate(urls):
            try:
                scheme = check_store_url(url)
            except StoreURLError as error:
                raise ValueError(f"{index}: {error}") from None
            if scheme in ("", "file") and not url.removeprefix("file://").startswith("/"):
                raise ValueError(f"{index}: store {url!r} must be an absolute path")
            if places[index] in places[:index]:
                raise ValueError(f"{index}: store {url!r} is listed twice")
        return value

    def placement(self, default_url: str, local_regions: tuple[tuple[str, str], ...] = ()) -> StorePlacement:
        """Where each agent writes and restores from; `default_url` when the spec names no store;
        `local_regions`: (zone, region) of local zones whose region is their failure domain."""
        return StorePlacement.of([DomainStore(s) if isinstance(s, str) else DomainStore(s.url, s.domain)
                                  for s in self.stores], default_url, local_regions)


class LocalLocation(_Frozen):
    price_usd_per_hour: float = Field(gt=0)
    trace: Literal["bamboo-p3", "bamboo-g4dn"] = "bamboo-p3"
    trace_offset_hours: float = Field(default=0.0, ge=0, le=MAX_HOURS)
    region: str | None = Field(default=None, description="a key of providers.local.regions: the location's "
                                                         "region, its failure domain (None: the zone is its own)")


class LocalRegion(_Frozen):
    """A region of the emulated cloud (`network: namespaces`): a bridge, a gateway, an S3 server."""

    subnet: str | None = Field(default=None, description="its VMs' subnet inside 198.18.0.0/16 (namespaces: "
                                                         "required): .1 gateway, .2 its S3 endpoint, VMs from .10")
    egress_priced_as: str | None = Field(
        default=None, pattern=r"^(aws|gcp|azure):[a-z0-9-]+$",
        description="a catalog region (e.g. aws:us-east-1) whose egress prices this region's traffic; "
                    "None: traffic is free, as between processes on one host")


class LinkRates(_Frozen):
    """`tc tbf` rates of the emulated cloud's links, each way (no latency: netem is not available)."""

    within_region_mbit: float = Field(default=1000.0, gt=0, le=100_000, description="each VM's link")
    between_regions_mbit: float = Field(default=50.0, gt=0, le=100_000, description="each region's uplink")


_REGION_NAME = re.compile(r"^[a-z][a-z0-9-]{1,61}[a-z0-9]$")  # also its bucket's name


def _default_local_locations() -> dict[str, LocalLocation]:
    # Spot list prices of the instance types the traces were recorded on (us-east-1).
    return {
        "zone-a": LocalLocation(price_usd_per_hour=0.92, trace="bamboo-p3"),
        "zone-b": LocalLocation(price_usd_per_hour=0.19, trace="bamboo-g4dn"),
    }


class LocalProvider(_Frozen):
    locations: dict[str, LocalLocation] = Field(default_factory=_default_local_locations)
    time_compression: float = Field(default=60.0, gt=0, le=1e6, description="trace seconds per wall second")
    notice_seconds: float = Field(default=10.0, gt=0, le=3600, description="wall seconds from notice to hard kill")
    unannounced_every: int = Field(default=0, ge=0, le=10**6,
                                   description="every Nth preemption has no notice; 0 = never")
    network: Literal["host", "namespaces"] = Field(
        default="host", description="host: VMs are processes on this machine's network; namespaces: the emulated "
                                    "multi-region cloud (root only): a network namespace and a CPU quota per VM, "
                                    "shaped links, the controller behind NAT, an S3 server per region")
    regions: dict[str, LocalRegion] = Field(default_factory=dict, max_length=64)
    links: LinkRates = LinkRates()
    vm_cpus: float = Field(default=1.0, gt=0, le=1024, description="namespaces: each VM's CPU quota")

    @field_validator("locations")
    @classmethod
    def _zone_names(cls, value: dict[str, LocalLocation]) -> dict[str, LocalLocation]:
        if not value:
            raise ValueError("at least one location is needed")
        for zone in value:
            if not zone or ":" in zone:
                raise ValueError(f"bad zone name {zone!r}")
        return value

    @field_validator("regions")
    @classmethod
    def _region_names(cls, value: dict[str, LocalRegion]) -> dict[str, LocalRegion]:
        for region in value:
            if not _REGION_NAME.match(region):
                raise ValueError(f"bad region name {region!r} (3 to 63 of a-z, 0-9 and '-'; it names its bucket)")
        return value

    @model_validator(mode="after")
    def _regions_known(self) -> LocalProvider:
        for zone, location in self.locations.items():
            if location.region is not None and location.region not in self.regions:
                raise ValueError(f"locations.{zone}.region: unknown region {location.region!r} "
                                 f"(regions: {', '.join(self.regions) or 'none'})")
            if self.network == "namespaces" and location.region is None:
                raise ValueError(f"locations.{zone}.region: network: namespaces puts every location in a region")
        if self.network == "namespaces":
            from spotrain.providers.geo_plan import PlanError, check_subnets

            missing = [name for name, region in self.regions.items() if region.subnet is None]
            if missing:
                raise ValueError(f"regions.{missing[0]}.subnet: network: namespaces needs each region's subnet")
            try:
                check_subnets({name: region.subnet or "" for name, region in self.regions.items()})
            except PlanError as error:
                raise ValueError(f"regions.{error}") from None
        return self

    def zone_regions(self) -> tuple[tuple[str, str], ...]:
        """(zone, region) of every location that names its region."""
        return tuple((zone, location.region) for zone, location in self.locations.items() if location.region)


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

    def would_list(self, offer: Offer) -> bool:
        """Whether the live provider would list this (catalog) offer: a spot price in a configured
        zone, of a configured instance type, under the bid cap. Plan prices with the catalog
        when there are no credentials and must not plan what launch would never see."""
        zone = offer.location.partition(":")[2]
        return (offer.provider == "aws" and offer.market == "spot" and offer.instance_type in self.instance_types
                and region_of_zone("aws", zone) in self.regions and (self.zones is None or zone in self.zones)
                and (self.max_price_usd_per_hour is None or offer.spot_usd_per_hour <= self.max_price_usd_per_hour))

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
    spot_prices_usd_per_hour: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="machine type -> USD/h")
    swarm_port: int = Field(default=31337, ge=1024, le=65535)
    controller_cidr: str | None = None

    def would_list(self, offer: Offer) -> bool:
        """Whether the live provider would list this (catalog) offer: spot, in a configured zone,
        of a configured machine type."""
        return (offer.provider == "gcp" and offer.market == "spot" and offer.instance_type in self.machine_types
                and offer.location.partition(":")[2] in self.zones)

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

    def on_this_host(self) -> bool:
        """True when every VM shares this machine's network: the local provider alone, without
        its emulated cloud."""
        return self.enabled() == ["local"] and self.local.network == "host"

    def egress_priced_as(self) -> dict[str, str]:
        """Local location -> the catalog region whose egress prices its traffic (the emulated cloud's
        regions that name one)."""
        if "local" not in self.enabled():
            return {}
        regions = self.local.regions
        return {f"local:{name}": priced for name, location in self.local.locations.items()
                if location.region in regions and (priced := regions[location.region].egress_priced_as)}

    def emulated_cloud(self) -> bool:
        """True when the local provider builds its emulated multi-region cloud."""
        return "local" in self.enabled() and self.local.network == "namespaces"

    @model_serializer(mode="wrap")
    def _dump_enabled_only(self, handler):  # a dumped spec (the ledger keeps one) loads back the same
        data = handler(self)
        enabled = self.enabled()
        return {key: value for key, value in data.items() if key in enabled}


class Controller(_Frozen):
    reachable: Literal["auto", "yes", "no"] = Field(
        default="auto", description="can agents dial the controller? no: it joins the swarm as a DHT client "
                                    "(a laptop behind NAT); auto: yes for the local cloud, else probed")
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="serve Prometheus metrics (spend, burn rate, workers, epoch, "
                                                 "samples/s) on this port while the controller runs")
    metrics_host: IPvAnyAddress = Field(default=IPv4Address("127.0.0.1"),
                                        description="the address the metrics endpoint listens on")


class ClusterSpec(_Frozen):
    name: str = Field(pattern=CLUSTER_NAME_PATTERN)
    budget: Budget
    training: Training = Training()
    placement: Placement = Placement()
    checkpoint: Checkpoint = Checkpoint()
    providers: Providers = Providers()
    controller: Controller = Controller()

    @model_validator(mode="after")
    def _two_peers_per_stage(self) -> ClusterSpec:
        pipeline, workers = self.training.pipeline, self.placement.workers
        needed = 2 * pipeline.stages + pipeline.trainers
        if self.training.mode == "swarm" and workers < needed:
            raise ValueError(f"placement.workers: swarm mode needs 2 peers per stage plus the trainers, "
                             f"at least {needed} (2*{pipeline.stages}+{pipeline.trainers}), got {workers}")
        return self

    @model_validator(mode="after")
    def _fits_worker_memory(self, info: ValidationInfo) -> ClusterSpec:
        from spotrain.worker_memory import memory_refusal

        training = self.training
        if training.memory_per_worker_gb is None or not (info.context or {}).get("import_task", True):
            return self
        refusal = memory_refusal(training.task, training.mode == "swarm", training.memory_per_worker_gb)
        if refusal is not None:
            raise ValueError(refusal)
        return self

    @model_validator(mode="after")
    def _locations_known(self) -> ClusterSpec:
        known = self.known_locations()
        for index, location in enumerate(self.placement.locations or ()):
            if location not in known:
                raise ValueError(f"placement.locations.{index}: unknown location {location!r} "
                                 f"(known: local zones and the catalog's, see `spotrain prices`)")
        return self

    @model_validator(mode="after")
    def _store_domains_known(self) -> ClusterSpec:
        placement = self.store_placement("unused")
        domains = {placement.domain_of(location) for location in self.known_locations()}
        for index, store in enumerate(self.checkpoint.stores):
            domain = getattr(store, "domain", None)
            if domain is not None and domain not in PROVIDERS and domain not in domains:
                raise ValueError(f"checkpoint.stores.{index}.domain: unknown failure domain {domain!r} "
                                 f"(a cloud, a region such as aws:us-east-1, or a local zone)")
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

    def task_profile(self) -> TaskProfile:
        """The task as planning sees it, for plan, launch and simulate alike: its parameters (the
        spec's count, else counted from the task's model) and its gradient codec's wire share
        from the codec table."""
        training = self.training
        parameters = training.model_parameters or counted_parameters(training.task, training.mode == "swarm")
        return TaskProfile(t4_samples_per_second=training.t4_samples_per_second, model_bytes=4.0 * parameters,
                           target_batch_size=training.target_batch_size,
                           compression_ratio=wire_ratio(training.compression.gradients),
                           per_gpu=dict(training.throughput))

    def store_placement(self, default_url: str) -> StorePlacement:
        """Which store each agent writes and restores from (a local zone's region is its domain)."""
        local = self.providers.local.zone_regions() if "local" in self.providers.enabled() else ()
        return self.checkpoint.placement(default_url, local)

    def default_checkpoint_store(self) -> str:
        """The store of every failure domain when the spec names none: the cluster's folder here."""
        from spotrain.home import cluster_dir

        return str(cluster_dir(self.name) / "checkpoints")

    def checkpoint_stores(self) -> tuple[str, ...]:
        """Every store of the cluster's checkpoints, in the spec's order."""
        return self.checkpoint.placement(self.default_checkpoint_store()).urls()

    def with_budget(self, total_usd: float) -> ClusterSpec:
        """This spec with `--budget`'s total, held to the same rules as budget.total_usd."""
        try:
            budget = Budget.model_validate(self.budget.model_dump() | {"total_usd": total_usd})
        except ValidationError as error:
            raise SpecError(f"--budget: {error.errors()[0]['msg']} (got {total_usd})") from None
        return self.model_copy(update={"budget": budget})
