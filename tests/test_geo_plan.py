"""The emulated multi-region cloud's pure parts: names, the address plan, rates, quotas, the spec."""

import os
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, run_cli

from spotrain.errors import SpecError
from spotrain.providers.cgroups import CgroupError, CpuHierarchy
from spotrain.providers.geo_plan import (
    PlanError,
    bridge_port,
    check_subnets,
    cloud_id,
    cpu_quota_us,
    plan_cloud,
    tbf_arguments,
)
from spotrain.spec_file import load_spec, parse_spec

SUBNETS = {"us-east": "198.18.1.0/24", "eu-west": "198.18.2.0/24"}


def geo_spec(**local) -> dict:
    provider = {"network": "namespaces", "regions": {"us-east": {"subnet": "198.18.1.0/24"},
                                                     "eu-west": {"subnet": "198.18.2.0/24"}},
                "locations": {"us-a": {"price_usd_per_hour": 0.2, "region": "us-east"},
                              "eu-a": {"price_usd_per_hour": 0.2, "region": "eu-west"}}}
    provider.update(local)
    return {"name": "g", "budget": {"total_usd": 1}, "providers": {"local": provider}}


def test_names_carry_a_prefix_of_the_home_and_the_cluster():
    a, b = cloud_id(Path("/h1"), "c"), cloud_id(Path("/h2"), "c")
    assert a.startswith("spg-") and len(a) == 14 and a != b and a == cloud_id(Path("/h1"), "c")
    plan = plan_cloud(a, SUBNETS, 1000, 50, 0.5)
    assert all(name.startswith(a + "-") for name in plan.namespaces())
    assert plan.vm_namespace("i-0123456789abcdef") == f"{a}-i-0123456789abcdef"
    assert len(bridge_port("i-0123456789abcdef")) <= 15  # an interface name's limit


def test_the_address_plan():
    plan = plan_cloud("spg-x", SUBNETS, 1000, 50, 0.5)
    us, eu = plan.regions
    assert (us.name, us.index, eu.index) == ("us-east", 0, 1)
    assert (us.gateway, us.store_address, us.store_endpoint) == ("198.18.1.1", "198.18.1.2", "http://198.18.1.2:9000")
    assert us.uplink == ("198.19.0.1", "198.19.0.2") and eu.uplink == ("198.19.1.1", "198.19.1.2")
    assert plan.free_address("us-east", set()) == "198.18.1.10"
    assert plan.free_address("us-east", {"198.18.1.10", "198.18.1.12"}) == "198.18.1.11"
    assert plan.controller_address == "192.168.255.2" and plan.nat_address == "192.168.255.1"
    small = plan_cloud("spg-x", {"r1": "198.18.3.0/27"}, 1000, 50, 1)
    addresses = list(small.regions[0].vm_addresses())
    assert addresses[0] == "198.18.3.10" and addresses[-1] == "198.18.3.30"  # .31 is the broadcast
    with pytest.raises(PlanError, match="no free address"):
        small.free_address("r1", set(addresses))


@pytest.mark.parametrize("subnets, expected", [
    ({"a": "10.0.0.0/24"}, "must lie inside 198.18.0.0/16"),
    ({"a": "198.19.0.0/24"}, "must lie inside"),
    ({"a": "198.18.1.0/28"}, "too small"),
    ({"a": "198.18.1.0/24", "b": "198.18.0.0/23"}, "b: subnet 198.18.0.0/23 overlaps a's"),
    ({"a": "198.18.1.1/24"}, "has host bits set"),
    ({"a": "banana"}, "does not appear to be"),
])
def test_bad_subnets_are_refused_in_one_line(subnets, expected):
    with pytest.raises(PlanError, match=expected):
        check_subnets(subnets)


def test_rates_and_quotas():
    assert tbf_arguments(50)[:3] == ["tbf", "rate", "50mbit"]
    assert int(tbf_arguments(1000)[4]) == 500_000  # 4 ms of traffic at 1 Gbit/s
    assert int(tbf_arguments(1)[4]) == 64 * 1024  # never below a GSO super-packet
    assert cpu_quota_us(0.5) == 50_000 and cpu_quota_us(2) == 200_000 and cpu_quota_us(0.001) == 1000


def test_cgroup_v1_and_v2_are_told_apart(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert CpuHierarchy.detect(v2) == CpuHierarchy(v2, 2)
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "unified").mkdir()  # a hybrid machine's empty v2 tree does not count
    assert CpuHierarchy.detect(v1) == CpuHierarchy(v1 / "cpu", 1)
    hybrid = tmp_path / "hybrid"
    hybrid.mkdir()
    (hybrid / "cgroup.controllers").write_text("memory pids\n")  # v2 without cpu
    with pytest.raises(CgroupError, match="no cgroup cpu controller"):
        CpuHierarchy.detect(hybrid)


def test_the_geo_example_loads_with_regions_as_failure_domains():
    spec = load_spec(ROOT / "examples" / "local-geo.yaml")
    local = spec.providers.local
    assert local.network == "namespaces" and spec.providers.emulated_cloud() and not spec.providers.on_this_host()
    assert local.zone_regions() == (("us-east-a", "us-east"), ("eu-west-a", "eu-west"))
    placement = spec.store_placement("unused")
    assert placement.domain_of("local:us-east-a") == "local:us-east"
    assert placement.write_store("local:us-east-a").startswith("s3://us-east/")
    assert placement.restore_order("local:eu-west-a")[0].startswith("s3://eu-west/")
    plain = load_spec(ROOT / "examples" / "local.yaml")
    assert plain.providers.on_this_host() and not plain.providers.emulated_cloud()


@pytest.mark.parametrize("change, expected", [
    ({"regions": {}}, "locations.us-a.region: unknown region 'us-east'"),
    ({"locations": {"us-a": {"price_usd_per_hour": 0.2}}}, "network: namespaces puts every location in a region"),
    ({"regions": {"us-east": {}, "eu-west": {"subnet": "198.18.2.0/24"}}}, "regions.us-east.subnet"),
    ({"regions": {"us-east": {"subnet": "198.18.2.0/24"}, "eu-west": {"subnet": "198.18.2.0/24"}}}, "overlaps"),
    ({"regions": {"US_East": {"subnet": "198.18.1.0/24"}}}, "bad region name 'US_East'"),
    ({"network": "vlan"}, "providers.local.network"),
    ({"vm_cpus": 0}, "providers.local.vm_cpus"),
    ({"links": {"between_regions_mbit": -1}}, "providers.local.links.between_regions_mbit"),
])
def test_bad_geo_specs_name_the_key(change, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(geo_spec(**change), Path("g.yaml"), import_task=False)


def test_a_store_may_name_a_local_region_as_its_domain():
    data = geo_spec()
    data["checkpoint"] = {"stores": [{"url": "s3://us-east/r", "domain": "local:us-east"}]}
    assert parse_spec(data, Path("g.yaml"), import_task=False).checkpoint.stores[0].domain == "local:us-east"
    data["checkpoint"] = {"stores": [{"url": "s3://x/r", "domain": "local:mars"}]}
    with pytest.raises(SpecError, match="unknown failure domain 'local:mars'"):
        parse_spec(data, Path("g.yaml"), import_task=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the refusal a user who is not root gets; running as root")
def test_launch_without_root_is_one_line_and_builds_nothing(tmp_path):  # pragma: no cover - CI is root
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(geo_spec()))
    result = run_cli("launch", str(path), home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "spotrain: error: providers.local.network: namespaces needs root (network namespaces, tc qdiscs, "
        "iptables NAT, cgroups); run as root, or use network: host"]


def test_without_root_the_provider_refuses_in_one_line(monkeypatch, tmp_path):
    from spotrain.config import LocalProvider as LocalConfig
    from spotrain.providers.base import AuthError
    from spotrain.providers.local import LocalProvider

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    config = parse_spec(geo_spec(), Path("g.yaml"), import_task=False).providers.local
    assert isinstance(config, LocalConfig)
    with pytest.raises(AuthError, match=r"^providers.local.network: namespaces needs root \("):
        LocalProvider(config, tmp_path).check_credentials()
