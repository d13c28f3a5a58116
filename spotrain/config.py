"""The cluster spec: frozen pydantic models, loaded from YAML with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spotrain.errors import SpecError

CLUSTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
# spotrain.kernels.codecs.SPEC_CODECS names the same codecs (kept apart: the spec imports no hivemind)
GRADIENT_CODECS = ("none", "float16", "uniform8", "blockwise8", "blockwise4", "powersgd:RANK")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Frozen):
    total_usd: float = Field(gt=0)
    max_hourly_usd: float | None = Field(default=None, gt=0)


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
    task: str = "spotrain.examples.tiny_gpt:task"
    target_batch_size: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0, description="samples per local step")
    target_epoch: int | None = Field(default=None, gt=0, description="end the run at this global epoch")
    compression: Compression = Compression()
    matchmaking_time: float = Field(default=3.0, gt=0)
    averaging_timeout: float = Field(default=30.0, gt=0)

    @field_validator("task")
    @classmethod
    def _task_imports(cls, value: str) -> str:
        from spotrain.task import load_task  # imports user code: only after the shape checks

        load_task(value)
        return value


class Placement(_Frozen):
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


class Providers(_Frozen):
    local: LocalProvider = LocalProvider()  # the embedded default, always enabled


class ClusterSpec(_Frozen):
    name: str = Field(pattern=CLUSTER_NAME_PATTERN)
    budget: Budget
    training: Training = Training()
    placement: Placement = Placement()
    checkpoint: Checkpoint = Checkpoint()
    providers: Providers = Providers()

    @model_validator(mode="after")
    def _locations_known(self) -> ClusterSpec:
        known = self.known_locations()
        for index, location in enumerate(self.placement.locations or ()):
            if location not in known:
                raise ValueError(
                    f"placement.locations.{index}: unknown location {location!r}; known: {', '.join(known)}"
                )
        return self

    def known_locations(self) -> list[str]:
        return [f"local:{zone}" for zone in self.providers.local.locations]

    def allowed_locations(self) -> list[str]:
        return list(self.placement.locations or self.known_locations())

    def with_budget(self, total_usd: float) -> ClusterSpec:
        if total_usd <= 0:
            raise SpecError(f"--budget: must be greater than 0 (got {total_usd})")
        budget = self.budget.model_copy(update={"total_usd": total_usd})
        return self.model_copy(update={"budget": budget})


def _error_line(path: Path, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        message = f"{message} (got {first['input']!r})"
    return f"{path}: {key}: {message}" if key else f"{path}: {message}"


def parse_spec(data: object, path: Path) -> ClusterSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_error_line(path, error)) from None


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
