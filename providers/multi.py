"""One provider over several: the control loop drives local, AWS and GCP through one object.

Launches go to the offer's provider; lists are the union; a terminate goes to the provider
that reported the instance (or, for an id never seen here, to each in turn: terminate is
idempotent everywhere). The termination lag is the slowest provider's.
"""

from __future__ import annotations

from collections.abc import Sequence

from spotrain.providers.base import (
    ClusterResources,
    ConsoleProvider,
    Instance,
    LaunchRequest,
    Offer,
    PeerPublisher,
    Provider,
    ProviderError,
)


class MultiProvider:
    name = "multi"

    def __init__(self, providers: Sequence[Provider]):
        if not providers:
            raise ValueError("at least one provider is needed")
        self.providers = {provider.name: provider for provider in providers}
        self.termination_lag_seconds = max(p.termination_lag_seconds for p in providers)
        self._owner: dict[str, str] = {}  # instance id -> provider name

    def provider_for(self, location: str) -> Provider:
        name = location.split(":", 1)[0]
        if name not in self.providers:
            raise ProviderError(f"no provider {name!r} is enabled for location {location!r}")
        return self.providers[name]

    def check_credentials(self) -> None:
        for provider in self.providers.values():
            provider.check_credentials()

    def offers(self) -> list[Offer]:
        return [offer for provider in self.providers.values() for offer in provider.offers()]

    def launch(self, request: LaunchRequest) -> Instance:
        provider = self.providers.get(request.offer.provider) or self.provider_for(request.offer.location)
        instance = provider.launch(request)
        self._owner[instance.instance_id] = provider.name
        return instance

    def list_instances(self, cluster: str) -> list[Instance]:
        found = []
        for provider in self.providers.values():
            for instance in provider.list_instances(cluster):
                self._owner[instance.instance_id] = provider.name
                found.append(instance)
        return found

    def console_output(self, instance_id: str, location: str) -> str:
        """The agent's console of an instance in `location`, from the provider that serves it."""
        provider = self.provider_for(location)
        if not isinstance(provider, ConsoleProvider):
            raise ProviderError(f"{provider.name} shows no instance console")
        return provider.console_output(instance_id, location)

    def publish_peers(self, cluster: str, peers: list[str]) -> None:
        for provider in self.providers.values():
            if isinstance(provider, PeerPublisher):
                provider.publish_peers(cluster, peers)

    def release_cluster(self, cluster: str) -> None:
        for provider in self.providers.values():
            if isinstance(provider, ClusterResources):
                provider.release_cluster(cluster)

    def terminate(self, instance_id: str) -> None:
        owner = self._owner.get(instance_id)
        for provider in [self.providers[owner]] if owner else list(self.providers.values()):
            provider.terminate(instance_id)
