"""The agent's checkpoint calls (agents/checkpoints.py), served by spotrain.stores."""

import math

import pytest
import torch

from spotrain.agents.checkpoints import AgentCheckpoints, LocalDirStore
from spotrain.stores import NonFiniteState
from spotrain.stores.local import LocalDirStore as DirectoryStore


def test_newest_valid_checkpoint_wins(tmp_path):
    store = AgentCheckpoints(tmp_path / "ckpt", writer="vm-1")
    for epoch in (5, 10, 15):
        store.save(epoch, {"model": {"w": torch.full((3,), float(epoch))}})
    assert store.epochs() == [15, 10, 5]
    assert store.load_newest()["epoch"] == 15
    # a torn newest file fails its size and hash: the next older one is used
    newest = tmp_path / "ckpt" / "ckpt-00000015-vm-1" / "model.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    loaded = store.load_newest()
    assert loaded["epoch"] == 10 and torch.equal(loaded["model"]["w"], torch.full((3,), 10.0))


def test_checkpoint_without_manifest_is_ignored(tmp_path):
    store = AgentCheckpoints(tmp_path, writer="vm-1")
    store.save(1, {"x": 1})
    (tmp_path / "ckpt-00000002-vm-1").mkdir()
    (tmp_path / "ckpt-00000002-vm-1" / "x.pt").write_bytes(b"partial")  # a crash before the manifest
    assert store.epochs() == [1]
    assert store.load_newest() == {"x": 1, "epoch": 1}


def test_prune_keeps_newest(tmp_path):
    store = AgentCheckpoints(tmp_path)
    for epoch in range(1, 6):
        store.save(epoch, {})
    store.prune(keep=2)
    assert store.epochs() == [5, 4]
    assert not list(tmp_path.rglob(".*tmp"))


def test_holders_sharing_a_store_keep_their_own_copies(tmp_path):
    first, second = AgentCheckpoints(tmp_path, writer="vm-1"), AgentCheckpoints(tmp_path, writer="vm-2")
    first.save(3, {"model": {"w": torch.ones(1)}})
    second.save(3, {"model": {"w": torch.zeros(1)}})
    assert first.epochs() == [3] and len(first.store.manifests()) == 2
    assert first.load_newest()["epoch"] == 3


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("mask", torch.triu(torch.full((4, 4), -math.inf), diagonal=1))


def test_an_attention_mask_may_hold_infinities_a_parameter_may_not(tmp_path):
    store = AgentCheckpoints(tmp_path, writer="vm-1")
    model = _Masked()
    store.save(1, {"model": model.state_dict()})
    assert torch.equal(store.load_newest()["model"]["mask"], model.mask)
    with torch.no_grad():
        model.linear.bias[0] = math.inf
    with pytest.raises(NonFiniteState, match="model.linear.bias"):
        store.save(2, {"model": model.state_dict()})
    with torch.no_grad():
        model.linear.bias[0] = 0.0
        model.mask[3, 3] = math.nan
    with pytest.raises(NonFiniteState, match="model.mask: non-finite values .NaN."):
        store.save(2, {"model": model.state_dict()})
    assert store.epochs() == [1]


def test_store_urls(tmp_path):
    for url in (f"file://{tmp_path}", str(tmp_path)):
        store = LocalDirStore.from_url(url)  # the name agents/daemon.py imports
        assert isinstance(store.store, DirectoryStore) and store.store.root == tmp_path
