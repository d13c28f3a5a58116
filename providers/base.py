"""The provider contract: offers, idempotent launch, list by cluster, idempotent terminate.

Cloud failures become the typed errors below inside each adapter; nothing above a provider
matches error strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from spotrain.contracts.agent_config import AgentConfig
from spotrain.contracts.states import EndReason, InstanceState

# The end detail of a cloud VM that powered itself off (EndReason.AGENT_FAILED): its unit gave up on
# the agent and infra/spotrain-agent-failed.sh printed why on the console before the power-off.
SELF_SHUTDOWN_DETAIL = "the VM powered itself off"


class ProviderError(Exception):
    """Base of the typed cloud errors."""


class CapacityError(ProviderError):
    """No spot capacity for this offer right now."""


class QuotaError(ProviderError):
    """The account's quota forbids another instance."""


class PriceError(ProviderError):
    """The spot price is above the maximum price asked."""


class AuthError(ProviderError):
    """Credentials are missing or refused, or lack a permission the call needs."""


class SettingError(ProviderError):
    """The request names something the cloud does not have (an image, an instance profile, a service
    account, a key pair): no retry fixes it. `setting` is the spec key to change."""

    def __init__(self, message: str, setting: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting


@dataclass(frozen=True)
class Offer:
    provider: str
    location: str  # "provider:region[-zone]", e.g. "local:zone-a", "aws:us-east-1a"
    instance_type: str
    gpu: str | None
    spot_usd_per_hour: float  # the price this offer is bought at (the on-demand price when market="on-demand")
    gpu_count: int = 1
    on_demand_usd_per_hour: float | None = None
    market: str = "spot"  # spot | on-demand


@dataclass(frozen=True)
class LaunchRequest:
    request_id: str  # the idempotency token: the same id never makes two instances
    cluster: str
    offer: Offer
    user_data: AgentConfig  # the agent's config as the controller built it; the provider completes it


@dataclass(frozen=True)
class Instance:
    instance_id: str
    request_id: str
    cluster: str
    location: str
    price_usd_per_hour: float
    state: InstanceState  # running | preempted | terminated
    launched_at: float
    ended_at: float | None = None
    end_reason: EndReason | None = None  # set once it has ended
    end_detail: str = ""  # the provider's own words: an exit code, a status
    # where the instance's agent can be reached: full multiaddrs (local: what the agent announced), or
    # `/ip4/<ip>/tcp/<swarm port>` from a cloud's API (private, then public IP), which lack the peer id
    addresses: tuple[str, ...] = field(default=())


@runtime_checkable
class Provider(Protocol):
    name: str
    termination_lag_seconds: float  # from terminate() until the instance stops costing money

    def offers(self) -> list[Offer]: ...

    def launch(self, request: LaunchRequest) -> Instance: ...

    def list_instances(self, cluster: str) -> list[Instance]: ...

    def terminate(self, instance_id: str) -> None: ...

    def check_credentials(self) -> None:
        """Raise AuthError, naming the provider, when its credentials are missing or refused."""
        ...


@runtime_checkable
class ConsoleProvider(Protocol):
    """A provider that shows an instance's console, where its agent's output goes (local, AWS, GCP)."""

    def console_output(self, instance_id: str, location: str) -> str: ...


@runtime_checkable
class PeerPublisher(Protocol):
    """A provider that can tell its running VMs where the live swarm is (spotrain.contracts.live_peers):
    an agent whose launch-time peers are gone reads them through its metadata service."""

    def publish_peers(self, cluster: str, peers: list[str]) -> None: ...


@runtime_checkable
class ClusterResources(Protocol):
    """A provider that holds something for a cluster besides its instances (the emulated cloud's
    namespaces, links, cgroups and buckets), released at `spotrain down`."""

    def release_cluster(self, cluster: str) -> None: ...
