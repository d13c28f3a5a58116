"""Failure domains: which store each agent writes and restores from, and duty spread over stores."""

import math
import shutil

import pytest
import torch

from spotrain.agents.roles.data_parallel import _buffer_paths, _restore
from spotrain.config import ClusterSpec
from spotrain.controller import ObservedInstance, choose_duty_holders
from spotrain.store_domains import DomainStore, StorePlacement, failure_domain
from spotrain.stores import ANY_WRITER, CheckpointWriter, ReplicatedStore, named_constants, open_store


@pytest.mark.parametrize("location, domain", [
    ("aws:us-east-1a", "aws:us-east-1"), ("aws:us-east-1", "aws:us-east-1"),
    ("aws:ap-southeast-2c", "aws:ap-southeast-2"),
    ("gcp:us-central1-a", "gcp:us-central1"), ("gcp:us-central1", "gcp:us-central1"), ("local:zone-a", "local:zone-a"),
])
def test_a_zone_belongs_to_its_region(location, domain):
    assert failure_domain(location) == domain


def test_an_agent_writes_its_domain_store_and_restores_nearest_first():
    placement = StorePlacement((DomainStore("/shared"), DomainStore("gs://g/run", "gcp:us-central1"),
                                DomainStore("s3://east/run", "aws:us-east-1"), DomainStore("s3://any/run", "aws")))
    assert placement.write_store("aws:us-east-1b") == "s3://east/run"
    assert placement.restore_order("aws:us-east-1b") == ("s3://east/run", "s3://any/run", "/shared", "gs://g/run")
    assert placement.restore_order("gcp:us-central1-a") == ("gs://g/run", "/shared", "s3://east/run", "s3://any/run")
    assert placement.write_store("local:zone-a") == "/shared"  # no store of its own: the one of every domain
    assert StorePlacement.of([], "/home/c/checkpoints").write_store("aws:us-east-1a") == "/home/c/checkpoints"


def test_the_spec_takes_plain_stores_and_stores_in_a_domain():
    spec = ClusterSpec.model_validate({
        "name": "c", "budget": {"total_usd": 1.0}, "training": {"task": "spotrain.examples.tiny_gpt:task"},
        "checkpoint": {"stores": ["/ckpt", {"url": "/ckpt-b", "domain": "local:zone-b"}]}})
    placement = spec.checkpoint.placement("/unused")
    assert placement.write_store("local:zone-b") == "/ckpt-b"
    assert placement.write_store("local:zone-a") == "/ckpt"
    assert ClusterSpec.model_validate(spec.model_dump(mode="json")) == spec  # the ledger's copy loads back


def _training(n: int, location: str) -> ObservedInstance:
    return ObservedInstance(f"c-r{n:05d}", f"i-{n}", location, 0.5, "running", "training")


def test_replicas_land_in_distinct_domains_not_just_distinct_zones():
    placement = StorePlacement((DomainStore("s3://east/run", "aws:us-east-1"),
                                DomainStore("s3://west/run", "aws:us-west-2")))
    fleet = [_training(0, "aws:us-east-1a"), _training(1, "aws:us-east-1b"), _training(2, "aws:us-west-2a")]
    assert choose_duty_holders(fleet, (), 2, placement.write_store) == ("i-0", "i-2")
    # two holders in one region give way as soon as another region has a training agent
    assert choose_duty_holders(fleet, ("i-0", "i-1"), 2, placement.write_store) == ("i-0", "i-2")
    # one store for all: still K holders, spread over locations
    shared = StorePlacement((DomainStore("/shared"),))
    assert choose_duty_holders(fleet[:2], (), 2, shared.write_store) == ("i-0", "i-1")


class _Masked(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(self.linear.weight, value)
        self.register_buffer("mask", torch.triu(torch.full((2, 2), -math.inf), diagonal=1))


def _write(store: str, writer: str, epoch: int, model: torch.nn.Module) -> None:
    constants = named_constants(_buffer_paths(model))
    checkpoints = CheckpointWriter(ReplicatedStore.from_urls([store], trust=ANY_WRITER), writer, constants=constants)
    checkpoints.submit(epoch, {"model": model.state_dict(), "constants": _buffer_paths(model)})
    assert checkpoints.close(60) and checkpoints.last_written_epoch == epoch


def test_two_holders_two_domains_and_a_restore_that_falls_back(tmp_path):
    east, west = str(tmp_path / "east"), str(tmp_path / "west")
    _write(east, "i-east", 4, _Masked(1.0))
    _write(west, "i-west", 4, _Masked(2.0))
    for store, writer in ((east, "i-east"), (west, "i-west")):  # each copy complete, in its own store only
        audit = ReplicatedStore.from_urls([store], trust=ANY_WRITER).audit()
        assert audit.stores[0].complete_epochs == (4,)
        assert [m.writer for m in open_store(store).manifests()] == [writer]
    constants = named_constants(_buffer_paths(_Masked(0.0)))
    nearest = _restore((east, west), constants, ANY_WRITER)
    assert nearest.store_url == f"file://{east}" and float(nearest.state["model"]["linear.weight"][0, 0]) == 1.0
    (next((tmp_path / "east").glob("ckpt-*-i-east")) / "model.pt").write_bytes(b"torn")  # corrupted
    assert _restore((east, west), constants, ANY_WRITER).store_url == f"file://{west}"
    shutil.rmtree(tmp_path / "west")  # emptied
    assert _restore((east, west), constants, ANY_WRITER) is None
