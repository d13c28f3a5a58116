"""What every placement policy sees and answers, and the registry that finds a policy by name.

A policy subclasses PlacementPolicy with `name=...` (as SkyPilot's recovery strategies do) and
is then selectable in a spec's `placement.policy`; a subclass without a name is a variant that
only code can pick (tests use such variants). POLICY_MODULES says which module registers each
name, so a spec's policy is checked without importing any policy, and `get_policy` imports
only the module it needs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from spotrain.providers.base import Offer
from spotrain.throughput import TaskProfile

CAPACITY_COOLDOWN_SECONDS = 600.0  # a location that just refused capacity is skipped this long,
MAX_COOLDOWN_SECONDS = 3600.0  # doubling with each refusal in a row, up to this
RESTART_HOURS = 0.1  # boot, install, load state: what each preemption costs a worker


@dataclass(frozen=True)
class FleetMember:
    request_id: str
    location: str
    price_usd_per_hour: float
    gpu: str | None = None
    gpu_count: int = 1
    market: str = "spot"
    training: bool = False  # its agent reports training (not starting, not yet launched)

    @classmethod
    def from_offer(cls, request_id: str, offer: Offer) -> FleetMember:
        """The member an offer becomes once launched (not yet training)."""
        return cls(request_id, offer.location, offer.spot_usd_per_hour, offer.gpu, offer.gpu_count, offer.market)


@dataclass(frozen=True)
class PlacementContext:
    now: float
    fleet: tuple[FleetMember, ...] = ()
    preemptions: Mapping[str, int] = field(default_factory=dict)
    hours_observed: Mapping[str, float] = field(default_factory=dict)  # instance-hours run per location
    failed_at: Mapping[str, tuple[float, int]] = field(default_factory=dict)  # last refusal, refusals in a row
    workers: int = 1
    backups: int = 0
    samples_done: float = 0.0
    target_samples: float | None = None
    deadline: float | None = None  # wall-clock time the work must be done by
    samples_per_second: float = 0.0  # what the fleet achieves now
    allowed: tuple[str, ...] = ()  # the spec's locations, in the user's order

    def cooling_down(self, location: str) -> bool:
        if location not in self.failed_at:
            return False
        last, in_a_row = self.failed_at[location]
        cooldown = min(MAX_COOLDOWN_SECONDS, CAPACITY_COOLDOWN_SECONDS * 2.0 ** (in_a_row - 1))
        return self.now - last < cooldown


# name -> the module whose PlacementPolicy subclass registers it (a class registering a name
# missing here is refused at import, so the table cannot drift from the classes)
POLICY_MODULES: dict[str, str] = {
    "spotrain": "spotrain.policies.cost_per_sample",
    "spread-cheapest": "spotrain.policies.spread",
    "on-demand": "spotrain.policies.baselines",
    "uniform-progress": "spotrain.policies.baselines",
    "eager-next-region": "spotrain.policies.baselines",
}
_REGISTRY: dict[str, type[PlacementPolicy]] = {}


class PlacementPolicy(ABC):
    """Which offer the next worker gets; by default a placement, once made, is never revised."""

    def __init_subclass__(cls, name: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if POLICY_MODULES.get(name) != cls.__module__:
            raise ValueError(f"placement policy {name!r} of {cls.__module__} is not in POLICY_MODULES")
        if name in _REGISTRY:
            raise ValueError(f"placement policy {name!r} is registered twice "
                             f"({_REGISTRY[name].__qualname__} and {cls.__qualname__})")
        _REGISTRY[name] = cls

    @classmethod
    def for_task(cls, profile: TaskProfile) -> PlacementPolicy:
        """The policy for a task of this profile; only policies that weigh throughput read it."""
        return cls()

    @abstractmethod
    def choose(self, offers: Sequence[Offer], ctx: PlacementContext) -> Offer | None:
        """The offer for one more worker, or None to launch nothing."""

    def retire(self, ctx: PlacementContext) -> list[str]:
        """Request ids of workers to terminate now (a policy changing its mind)."""
        return []

    def migrate(self, offers: Sequence[Offer], ctx: PlacementContext) -> list[Offer]:
        """Offers for extra workers beyond the wanted fleet, to replace part of it (make before break)."""
        return []


def policy_names() -> list[str]:
    return sorted(POLICY_MODULES)


def check_policy_name(name: str) -> str:
    if name not in POLICY_MODULES:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(policy_names())}")
    return name


def get_policy(name: str, profile: TaskProfile | None = None) -> PlacementPolicy:
    """The registered policy `name`, built for a task of `profile` (a default task's when None)."""
    importlib.import_module(POLICY_MODULES[check_policy_name(name)])  # registers the name
    return _REGISTRY[name].for_task(profile or TaskProfile())
