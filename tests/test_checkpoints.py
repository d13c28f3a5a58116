import torch

from spotrain.agents.checkpoints import LocalDirStore


def test_newest_valid_checkpoint_wins(tmp_path):
    store = LocalDirStore(tmp_path / "ckpt")
    for epoch in (5, 10, 15):
        store.save(epoch, {"model": {"w": torch.full((3,), float(epoch))}})
    assert store.epochs() == [15, 10, 5]
    assert store.load_newest()["epoch"] == 15
    # a torn newest file fails its hash: the next older one is used
    newest = tmp_path / "ckpt" / "ckpt-00000015.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    loaded = store.load_newest()
    assert loaded["epoch"] == 10 and torch.equal(loaded["model"]["w"], torch.full((3,), 10.0))


def test_checkpoint_without_manifest_is_ignored(tmp_path):
    store = LocalDirStore(tmp_path)
    store.save(1, {"x": 1})
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"partial")  # a crash before the manifest
    assert store.load_newest()["epoch"] == 1


def test_prune_keeps_newest(tmp_path):
    store = LocalDirStore(tmp_path)
    for epoch in range(1, 6):
        store.save(epoch, {})
    store.prune(keep=2)
    assert store.epochs() == [5, 4]
    assert not list(tmp_path.glob(".*tmp"))


def test_store_urls(tmp_path):
    assert LocalDirStore.from_url(f"file://{tmp_path}").root == tmp_path
    assert LocalDirStore.from_url(str(tmp_path)).root == tmp_path
