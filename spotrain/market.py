"""The spot market as spotrain sees it: locations, offers from the shipped catalog (and live
prices when a provider gives them), and the egress price between any two locations."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from spotrain.providers.base import Offer

_AWS_ZONE = re.compile(r"^([a-z]{2}(?:-gov)?-[a-z]+-\d)([a-z])$")
_GCP_ZONE = re.compile(r"^([a-z]+-[a-z]+\d+)-([a-z])$")
_AZURE_ZONE = re.compile(r"^([a-z0-9]+)-(\d)$")
_CONTINENT_PREFIXES = {"us": "na", "ca": "na", "northamerica": "na", "eu": "eu", "europe": "eu", "ap": "asia",
                       "asia": "asia", "sa": "sa", "southamerica": "sa", "me": "me", "af": "af",
                       "australia": "oceania"}
_AZURE_CONTINENTS = {
    "eu": ("westeurope", "northeurope", "france", "germany", "uk", "sweden", "switzerland", "norway", "italy",
           "poland"),
    "asia": ("eastasia", "southeastasia", "japan", "korea", "centralindia", "southindia", "westindia"),
    "oceania": ("australia",),
}


@dataclass(frozen=True, order=True)
class Location:
    provider: str
    region: str
    zone: str | None = None

    @classmethod
    @lru_cache(maxsize=65536)
    def parse(cls, text: str) -> Location:
        """"aws:us-east-1a" -> Location("aws", "us-east-1", "us-east-1a"); "aws:us-east-1" is a region."""
        provider, sep, place = text.partition(":")
        if not sep or not provider or not place:
            raise ValueError(f"location {text!r} is not 'provider:region' or 'provider:zone'")
        pattern = {"aws": _AWS_ZONE, "gcp": _GCP_ZONE, "azure": _AZURE_ZONE}.get(provider)
        match = pattern.match(place) if pattern else None
        if match:
            return cls(provider, match.group(1), place)
        return cls(provider, place, None)

    def __str__(self) -> str:
        return f"{self.provider}:{self.zone or self.region}"

    @property
    def continent(self) -> str:
        region = self.region
        if self.provider == "azure":
            for continent, prefixes in _AZURE_CONTINENTS.items():
                if region.startswith(prefixes):
                    return continent
            return "na"
        prefix = region.split("-")[0]
        return _CONTINENT_PREFIXES.get(prefix, prefix)


@dataclass(frozen=True)
class CatalogRow:
    provider: str
    region: str
    zones: tuple[str, ...]
    instance_type: str
    gpu: str | None
    gpu_count: int
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float


@lru_cache(maxsize=1)
def catalog() -> tuple[CatalogRow, ...]:
    rows = []
    text = (resources.files("spotrain") / "data" / "catalog.csv").read_text()
    for line in csv.reader(row for row in text.splitlines() if row and not row.startswith("#")):
        provider, region, zones, itype, gpu, count, on_demand, spot = line
        rows.append(CatalogRow(provider, region, tuple(zones.split()), itype, gpu or None, int(count),
                               float(on_demand), float(spot)))
    return tuple(rows)


def catalog_offers(market: str = "spot") -> list[Offer]:
    """One offer per zone (or region, when the catalog lists no zones) and instance type."""
    offers = []
    for row in catalog():
        for place in row.zones or (row.region,):
            price = row.spot_usd_per_hour if market == "spot" else row.on_demand_usd_per_hour
            offers.append(Offer(row.provider, f"{row.provider}:{place}", row.instance_type, row.gpu, price,
                                gpu_count=row.gpu_count, on_demand_usd_per_hour=row.on_demand_usd_per_hour,
                                market=market))
    return offers


def known_locations() -> set[str]:
    return {o.location for o in catalog_offers()}


# -- egress -----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _aws_table() -> dict[tuple[str, str], float]:
    text = (resources.files("spotrain") / "data" / "aws_transfer_costs.csv").read_text()
    reader = csv.DictReader(text.splitlines())
    return {(r["src"], r["dst"]): float(r["cost"]) for r in reader}


INTERNET = "internet"
# Published rules (USD/GB) for GCP and Azure; AWS comes from the Skyplane table.
_GCP = {"intercontinental": 0.08, "oceania": 0.15, "internet": 0.12}
_GCP_SAME_CONTINENT = {"na": 0.01, "eu": 0.02, "asia": 0.05}
_AZURE = {"same-continent": 0.02, "intercontinental": 0.05, "internet": 0.0875}
_AWS_CROSS_ZONE = 0.01  # each direction, within a region
_AWS_DEFAULT_INTER_REGION = 0.02


def egress_usd_per_gb(src: Location, dst: Location | str) -> float:
    """What the source's provider charges per GB sent from `src` to `dst` (or to the internet)."""
    if dst == INTERNET or (isinstance(dst, Location) and dst.provider != src.provider):
        if src.provider == "aws":
            return _aws_table().get((src.region, INTERNET), 0.09)
        if src.provider == "gcp":
            return _GCP["internet"]
        if src.provider == "azure":
            return _AZURE["internet"]
        return 0.0  # local: no money changes hands
    assert isinstance(dst, Location)
    if src.region == dst.region:
        if src.zone == dst.zone or src.provider in ("local", "azure"):
            return 0.0
        return _AWS_CROSS_ZONE if src.provider == "aws" else 0.01
    if src.provider == "aws":
        return _aws_table().get((src.region, dst.region), _AWS_DEFAULT_INTER_REGION)
    if src.provider == "gcp":
        if "oceania" in (src.continent, dst.continent):
            return _GCP["oceania"]
        if src.continent == dst.continent:
            return _GCP_SAME_CONTINENT.get(src.continent, 0.08)
        return _GCP["intercontinental"]
    if src.provider == "azure":
        return _AZURE["same-continent"] if src.continent == dst.continent else _AZURE["intercontinental"]
    return 0.0
