from spotrain.market import Location, catalog_offers, egress_usd_per_gb, known_locations
from spotrain.throughput import TaskProfile, Worker, estimate


def test_location_parsing():
    assert Location.parse("aws:us-east-1a") == Location("aws", "us-east-1", "us-east-1a")
    assert Location.parse("gcp:us-central1-a") == Location("gcp", "us-central1", "us-central1-a")
    assert Location.parse("aws:eu-west-1").zone is None
    assert Location.parse("azure:westeurope-1").continent == "eu"


def test_catalog_covers_three_clouds_spot_and_on_demand():
    offers = catalog_offers("spot")
    assert {o.provider for o in offers} == {"aws", "gcp", "azure"}
    assert all(o.spot_usd_per_hour < o.on_demand_usd_per_hour for o in offers)
    assert "aws:us-west-2c" in known_locations()
    on_demand = catalog_offers("on-demand")
    assert all(o.market == "on-demand" and o.spot_usd_per_hour == o.on_demand_usd_per_hour for o in on_demand)


def test_egress_rules():
    east = Location.parse("aws:us-east-1a")
    assert egress_usd_per_gb(east, Location.parse("aws:us-east-1a")) == 0.0
    assert egress_usd_per_gb(east, Location.parse("aws:us-east-1b")) == 0.01  # cross-zone
    assert egress_usd_per_gb(east, Location.parse("aws:us-west-2a")) == 0.02  # skyplane table
    assert egress_usd_per_gb(east, "internet") == 0.09
    assert egress_usd_per_gb(east, Location.parse("gcp:us-central1-a")) == 0.09  # leaves AWS: internet
    gcp = Location.parse("gcp:us-central1-a")
    assert egress_usd_per_gb(gcp, Location.parse("gcp:us-east1-b")) == 0.01
    assert egress_usd_per_gb(gcp, Location.parse("gcp:europe-west4-a")) == 0.08
    azure = Location.parse("azure:eastus-1")
    assert egress_usd_per_gb(azure, Location.parse("azure:westeurope-1")) == 0.05


def test_communication_costs_throughput_across_continents():
    profile = TaskProfile(t4_samples_per_second=100, model_bytes=4e8, target_batch_size=4096, compression_ratio=0.5)
    a, b = Location.parse("aws:us-east-1a"), Location.parse("aws:us-east-1b")
    far = Location.parse("aws:eu-west-1a")
    one = estimate([Worker(a, "V100")], profile)
    near = estimate([Worker(a, "V100"), Worker(b, "V100")], profile)
    across = estimate([Worker(a, "V100"), Worker(far, "V100")], profile)
    assert one.samples_per_second == 260.0 and one.granularity == float("inf")
    assert one.samples_per_second < near.samples_per_second < 2 * one.samples_per_second
    assert across.samples_per_second < near.samples_per_second
    assert across.granularity < near.granularity
    # fewer epochs per hour across the ocean, but each sample costs more egress
    per_sample = lambda e: e.egress_usd_per_hour / e.samples_per_second  # noqa: E731
    assert per_sample(across) > per_sample(near) > 0
