"""One path from the spec to the loop's inputs: the offers it may use and the task's profile,
the same for `plan`, `launch` and `simulate`."""

import json
import os

import pytest
from conftest import ROOT, run_cli

from spotrain.config import ClusterSpec
from spotrain.contracts.task import load_task
from spotrain.kernels.table import nominal_ratio
from spotrain.market import catalog_offers
from spotrain.plan import offers_for
from spotrain.providers.base import AuthError
from spotrain.providers.multi import MultiProvider
from spotrain.spec_file import load_spec

CLOUDS = ROOT / "examples" / "clouds.yaml"
NAMED_REGIONS = ("aws:us-east-1", "gcp:us-central1")


def in_named_regions(location: str) -> bool:
    return location.startswith(("aws:us-east-1", "gcp:us-central1-"))


class CatalogPriced:
    """A provider whose live offers are its catalog rows (or that has no credentials)."""

    termination_lag_seconds = 0.0

    def __init__(self, name: str, credentials: bool = True):
        self.name, self.credentials = name, credentials

    def offers(self):
        if not self.credentials:
            raise AuthError(f"{self.name}: no usable credentials")
        return [o for o in catalog_offers("spot") if o.provider == self.name]


def test_region_locations_keep_the_offers_of_their_zones():
    spec = load_spec(CLOUDS)
    assert spec.allowed_locations() == list(NAMED_REGIONS)
    catalog = catalog_offers("spot")
    kept = spec.usable_offers(catalog)
    assert kept and all(in_named_regions(o.location) for o in kept)
    assert {o.location for o in kept} == {o.location for o in catalog if in_named_regions(o.location)}


def test_plan_keeps_the_offers_the_loop_keeps_and_prices_without_credentials_from_the_catalog():
    spec = load_spec(CLOUDS)
    lines: list[str] = []
    live = offers_for(spec, MultiProvider([CatalogPriced("aws"), CatalogPriced("gcp")]), lines.append)
    loop = spec.usable_offers(catalog_offers("spot"))  # what ControlLoop keeps of the same offers
    assert sorted(map(repr, live)) == sorted(map(repr, loop)) and lines == []
    dry = offers_for(spec, MultiProvider([CatalogPriced("aws", credentials=False), CatalogPriced("gcp")]),
                     lines.append)
    # without credentials, the catalog's rows that aws as configured would list: its zones, its
    # instance type, spot, under its bid cap (launch never sees the others)
    aws_dry = [o for o in dry if o.provider == "aws"]
    aws = spec.providers.aws
    assert aws_dry and aws is not None and aws.zones is not None and aws.max_price_usd_per_hour is not None
    assert {o.location for o in aws_dry} <= {f"aws:{zone}" for zone in aws.zones}
    assert {(o.instance_type, o.market) for o in aws_dry} == {("g4dn.xlarge", "spot")}
    assert all(o.spot_usd_per_hour <= aws.max_price_usd_per_hour for o in aws_dry)
    unconfigured = [o for o in catalog_offers("spot") + catalog_offers("on-demand")
                    if o.provider == "aws" and in_named_regions(o.location) and not aws.would_list(o)]
    assert unconfigured  # the catalog has rows the filter drops, so this test can fail
    assert [o for o in dry if o.provider == "gcp"] == [o for o in live if o.provider == "gcp"]
    assert lines == ["aws: no usable credentials; planning with the catalog's prices"]


def test_cli_plan_of_the_clouds_example_places_workers_without_credentials(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"]:
        monkeypatch.delenv(key)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(key, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = run_cli("plan", str(CLOUDS), "--json", home=tmp_path / "home", timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["offers"] > 0 and len(data["placement"]) == 2  # one worker and one backup
    assert all(in_named_regions(row["location"]) for row in data["placement"])
    assert "aws: no" in result.stderr and "catalog" in result.stderr


def spec_with(**training) -> ClusterSpec:
    return ClusterSpec.model_validate({"name": "p", "budget": {"total_usd": 1.0}, "training": training})


def test_the_profile_counts_the_task_model_unless_the_spec_gives_a_count():
    task = "spotrain.examples.tiny_gpt:task"
    parameters = sum(p.numel() for p in load_task(task).build_model().parameters())
    assert spec_with(task=task).task_profile().model_bytes == 4.0 * parameters
    assert spec_with(task=task, model_parameters=7_000).task_profile().model_bytes == 4.0 * 7_000


@pytest.mark.parametrize("codec", ["none", "float16", "uniform8", "blockwise8", "blockwise4"])
def test_the_profile_prices_a_codec_as_the_codec_table_does(codec):
    profile = spec_with(compression={"gradients": codec}, model_parameters=1_000).task_profile()
    assert profile.compression_ratio == pytest.approx(1.0 / nominal_ratio(codec))


def test_blockwise4_sends_about_an_eighth_of_fp32():
    profile = spec_with(compression={"gradients": "blockwise4"}, model_parameters=1_000).task_profile()
    assert profile.compression_ratio == pytest.approx(0.129, abs=0.001)
