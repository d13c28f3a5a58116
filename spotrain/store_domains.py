"""Failure domains, and which checkpoint store each agent writes and reads.

A failure domain is what one outage takes down at once: a cloud region (`aws:us-east-1`,
`gcp:us-central1`; its zones belong to it), a local region (`local:us-east`, when the spec puts
local zones in regions) or a local zone (`local:zone-a`). A store in the
spec names the domain it lives in (`{url: s3://b/run, domain: aws:us-east-1}`), a whole cloud
(`domain: aws`), or nothing (a plain string): a store of every domain. Nothing is derived from
a URL: a bucket's region is not in its name, and an endpoint says nothing about what fails with it.

An agent writes the one store nearest to it and restores from all of them, nearest first: its
domain's, its cloud's, the domain-less ones, then the others, each group in the spec's order.
Holders that write the same store make one copy, so the controller spreads checkpoint duty over
the stores holders would write (`controller.choose_duty_holders`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PROVIDERS = ("local", "aws", "gcp")
_AWS_ZONE = re.compile(r"^[a-z]+(-[a-z]+)+-[0-9]+[a-z]$")  # us-east-1a (a region ends in its digit)
_GCP_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")  # us-central1-a


def failure_domain(location: str) -> str:
    """aws:us-east-1a -> aws:us-east-1, gcp:us-central1-a -> gcp:us-central1; a region, a local
    zone or anything else is its own domain."""
    provider, _, name = location.partition(":")
    if provider == "aws" and _AWS_ZONE.match(name):
        return f"aws:{name.rstrip('abcdefghijklmnopqrstuvwxyz')}"
    if provider == "gcp" and _GCP_ZONE.match(name):
        return f"gcp:{name.rsplit('-', 1)[0]}"
    return location


@dataclass(frozen=True)
class DomainStore:
    url: str
    domain: str | None = None  # None: every domain

    def distance(self, location: str, domain: str | None = None) -> int:
        """0 in the location's domain (`domain`, else failure_domain's), 1 in its cloud, 2 a store of
        every domain, 3 elsewhere."""
        if self.domain is None:
            return 2
        if self.domain == (domain or failure_domain(location)):
            return 0
        return 1 if self.domain == location.partition(":")[0] else 3


@dataclass(frozen=True)
class StorePlacement:
    stores: tuple[DomainStore, ...]
    # (zone, region) of local zones in a region (`providers.local.regions`): the region fails as one
    local_regions: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.stores:
            raise ValueError("a store placement needs at least one store")

    @classmethod
    def of(cls, stores: Sequence[DomainStore], default_url: str,
           local_regions: tuple[tuple[str, str], ...] = ()) -> StorePlacement:
        """The spec's stores, or the one at `default_url` (of every domain) when it names none."""
        return cls(tuple(stores) or (DomainStore(default_url),), local_regions)

    def domain_of(self, location: str) -> str:
        """`location`'s failure domain: a local zone's region when it has one, else failure_domain's."""
        provider, _, zone = location.partition(":")
        region = dict(self.local_regions).get(zone) if provider == "local" else None
        return f"local:{region}" if region else failure_domain(location)

    def restore_order(self, location: str | None) -> tuple[str, ...]:
        """Every store's URL, nearest to `location` first (the spec's order when it is unknown)."""
        if location is None:
            return tuple(store.url for store in self.stores)
        domain = self.domain_of(location)
        return tuple(store.url for store in sorted(self.stores, key=lambda store: store.distance(location, domain)))

    def write_store(self, location: str | None) -> str:
        """The store an agent at `location` writes: the nearest one."""
        return self.restore_order(location)[0]

    def urls(self) -> tuple[str, ...]:
        return tuple(store.url for store in self.stores)
