"""The stores' own rules: strict manifests, replicated reads and audits, the background writer."""

from __future__ import annotations

import io
import json
import math
import threading

import pytest
import torch

from spotrain.stores import (
    ANY_WRITER,
    CheckpointWriter,
    CorruptCheckpoint,
    Manifest,
    NonFiniteState,
    ReplicatedStore,
    StoreUnavailable,
    UnsafePayload,
    decode_state,
    encode_state,
    named_constants,
)
from spotrain.stores.local import LocalDirStore


def test_manifests_parse_strictly():
    manifest = Manifest.describe(5, "vm-1", {"model.pt": b"abc"})
    assert Manifest.parse(manifest.to_json(), manifest.key) == manifest
    good = json.loads(manifest.to_json())
    for change in ({"epoch": "5"}, {"epoch": True}, {"epoch": -1}, {"created_at": float("nan")},
                   {"created_at": float("inf")}, {"format_version": 2}, {"extra": 1}, {"writer": "../x"},
                   {"files": [{"name": "../model.pt", "size": 3, "sha256": "0" * 64}]},
                   {"files": [{"name": "model.pt", "size": -3, "sha256": "0" * 64}]},
                   {"files": [{"name": "model.pt", "size": 3, "sha256": "XYZ"}]},
                   {"files": good["files"] * 2}):
        with pytest.raises(CorruptCheckpoint):
            Manifest.parse(json.dumps(dict(good, **change)).encode(), manifest.key)
    with pytest.raises(CorruptCheckpoint, match="is for ckpt-00000005"):  # copied under another epoch's name
        Manifest.parse(manifest.to_json(), "ckpt-00000009-vm-1.json")
    with pytest.raises(CorruptCheckpoint):
        Manifest.parse(b"{not json", manifest.key)


def test_a_hivemind_optimizer_state_loads_weights_only():
    import hivemind

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = torch.nn.Linear(4, 2)
    optimizer = hivemind.Optimizer(dht=dht, run_id="weights-only", params=model.parameters(),
                                   optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
                                   batch_size_per_step=4, target_batch_size=4, matchmaking_time=0.5,
                                   averaging_timeout=2, verbose=False)
    try:
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        state = decode_state(encode_state({"model": model.state_dict(), "optimizer": optimizer.state_dict()}))
        assert state["optimizer"]["state"]["local_epoch"] == optimizer.local_epoch == 1
        optimizer.load_state_dict(state["optimizer"])
        model.load_state_dict(state["model"])
    finally:
        optimizer.shutdown()
        dht.shutdown()


def test_states_refuse_unsafe_part_names_and_non_finite_values():
    with pytest.raises(ValueError, match="safe file name"):
        encode_state({"../model": {}})
    with pytest.raises(NonFiniteState, match=r"optimizer\.state\.0\.exp_avg: non-finite values \(NaN\)"):
        encode_state({"optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}})
    # a constant the caller names (a model's buffer) may hold infinities, never a NaN
    masked = {"model": {"mask": torch.tensor([0.0, -math.inf]), "weight": torch.tensor([math.inf])}}
    constants = named_constants(["model.mask"])
    with pytest.raises(NonFiniteState, match=r"model\.weight: non-finite values \(infinity\)"):
        encode_state(masked, constants)
    masked["model"]["weight"] = torch.ones(1)
    files = encode_state(masked, constants)
    assert torch.equal(decode_state(files, constants)["model"]["mask"], masked["model"]["mask"])
    with pytest.raises(NonFiniteState, match=r"model\.mask"):
        decode_state(files)
    masked["model"]["mask"][0] = math.nan
    with pytest.raises(NonFiniteState, match="NaN"):
        encode_state(masked, constants)
    plain = {"ints": torch.arange(3), "x": [1.5, "a", None]}
    assert decode_state(encode_state(plain))["x"] == [1.5, "a", None]


def test_prune_sweeps_what_crashed_local_writes_left(tmp_path):
    store = LocalDirStore(tmp_path)
    for epoch in (1, 2, 3):
        ReplicatedStore([store], trust=ANY_WRITER).save_state(epoch, {"model": {"w": torch.ones(1)}}, "vm-1")
    (tmp_path / ".ckpt-00000001-vm-1.json.99.tmp").write_bytes(b"half a manifest")
    (tmp_path / "ckpt-00000001-vm-1" / ".model.pt.99.tmp").write_bytes(b"half a file")
    (tmp_path / "ckpt-00000003-vm-2").mkdir()
    (tmp_path / "ckpt-00000003-vm-2" / ".model.pt.98.tmp").write_bytes(b"a write in flight")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    store.prune(keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000002-vm-1", "ckpt-00000002-vm-1.json", "ckpt-00000003-vm-1", "ckpt-00000003-vm-1.json",
        "ckpt-00000003-vm-2", "notes.txt"]


def _stores(tmp_path, count: int) -> list[LocalDirStore]:
    return [LocalDirStore(tmp_path / f"domain-{index}") for index in range(count)]


def test_a_replicated_read_falls_back_to_the_next_store(tmp_path):
    near, far = _stores(tmp_path, 2)
    replicas = ReplicatedStore([near, far], trust=ANY_WRITER)
    replicas.save_state(4, {"model": {"w": torch.ones(2)}}, "vm-1")
    ReplicatedStore([far], trust=ANY_WRITER).save_state(6, {"model": {"w": torch.full((2,), 6.0)}}, "vm-2")
    assert (replicas.load_newest().epoch, replicas.load_newest().store_url) == (6, far.url)  # newest wins
    (far_six,) = [m for m in far.manifests() if m.epoch == 6]
    far._put(far_six.file_key("model.pt"), b"torn")
    # a tie on the epoch is read from the nearest store
    assert (replicas.load_newest().epoch, replicas.load_newest().store_url) == (4, near.url)
    (near_four,) = near.manifests()
    near.delete(near_four)
    assert (replicas.load_newest().epoch, replicas.load_newest().store_url) == (4, far.url)


class _Unreachable:
    url = "s3://unreachable/x"

    def manifests(self):
        raise StoreUnavailable("connection refused")

    def write(self, epoch, files, writer, signer=None):
        raise StoreUnavailable("connection refused")

    def prune(self, keep, up_to=None, trust=None):
        raise StoreUnavailable("connection refused")


def test_an_unreachable_store_costs_its_copy_only(tmp_path):
    (reachable,) = _stores(tmp_path, 1)
    replicas = ReplicatedStore([_Unreachable(), reachable], trust=ANY_WRITER)
    with pytest.raises(StoreUnavailable, match="written to 1 of 2 stores"):
        replicas.save_state(3, {"model": {"w": torch.ones(1)}}, "vm-1")
    assert replicas.load_newest().epoch == 3
    replicas.prune(keep=1)
    audit = replicas.audit()
    assert audit.stores[0].error and audit.stores[0].newest_epoch is None
    assert audit.stores[1].newest_epoch == 3


def test_the_audit_counts_complete_copies_per_epoch(tmp_path):
    stores = _stores(tmp_path, 3)
    for index, store in enumerate(stores):
        for epoch in range(1, 3 + index):  # domain 0 holds epochs 1-2, domain 1 1-3, domain 2 1-4
            ReplicatedStore([store], trust=ANY_WRITER).save_state(epoch, {"model": {"w": torch.ones(1)}}, f"vm-{index}")
    # the same domain twice
    ReplicatedStore([stores[0]], trust=ANY_WRITER).save_state(2, {"model": {"w": torch.ones(1)}}, "vm-9")
    (four,) = [m for m in stores[2].manifests() if m.epoch == 4]
    stores[2]._delete([four.file_key("model.pt")])  # a manifest whose file is gone is no copy
    audit = ReplicatedStore(stores, trust=ANY_WRITER).audit()
    assert [store.newest_epoch for store in audit.stores] == [2, 3, 3]
    assert [audit.copies(epoch) for epoch in (1, 2, 3, 4)] == [3, 3, 2, 0]
    assert audit.newest_epoch_with(copies=2) == 3 and audit.newest_epoch_with(copies=4) is None


class _GatedReplicas(ReplicatedStore):
    """Holds every upload, before it encodes the state, until the test opens the gate."""

    def __init__(self, root):
        self.store = LocalDirStore(root)
        super().__init__([self.store], trust=ANY_WRITER)
        self.gate = threading.Event()
        self.started = threading.Event()

    def save_state(self, epoch, state, writer, constants):
        self.started.set()
        assert self.gate.wait(30)
        return super().save_state(epoch, state, writer, constants)


def test_the_writer_uploads_a_snapshot_isolated_from_later_updates(tmp_path):
    replicas = _GatedReplicas(tmp_path / "ckpt")
    writer = CheckpointWriter(replicas, "vm-1", keep=2)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    stall = writer.submit(1, {"model": model.state_dict()})
    assert stall < 1.0 and replicas.started.wait(10)
    with torch.no_grad():
        model.weight.fill_(2.0)  # the optimizer's next step, in place, while the upload runs
    assert not writer.flush(timeout=0.2)  # the upload is still held
    replicas.gate.set()
    assert writer.flush(timeout=30)
    loaded = replicas.load_newest()
    assert torch.equal(loaded.state["model"]["weight"], torch.ones(1, 3))
    assert (writer.written, writer.failed, writer.last_written_epoch) == (1, 0, 1)
    assert writer.close(timeout=10)


def test_the_newest_pending_snapshot_wins_and_failures_are_counted(tmp_path):
    replicas = _GatedReplicas(tmp_path / "ckpt")
    writer = CheckpointWriter(replicas, "vm-1", keep=2)
    writer.submit(1, {"model": {"w": torch.ones(1)}})
    assert replicas.started.wait(10)
    for epoch in (2, 3, 4):  # queued behind the held upload: each replaces the one before
        writer.submit(epoch, {"model": {"w": torch.full((1,), float(epoch))}})
    replicas.gate.set()
    assert writer.flush(timeout=30)
    assert [m.epoch for m in replicas.store.manifests()] == [4, 1] and writer.superseded == 2
    writer.submit(5, {"model": {"w": torch.tensor([float("nan")])}})
    assert writer.flush(timeout=30)
    assert writer.failed == 1 and "non-finite" in writer.last_error
    assert [m.epoch for m in replicas.store.manifests()] == [4, 1]  # never written
    writer.submit(6, {"model": {"w": torch.ones(1)}})
    assert writer.close(timeout=30)
    assert [m.epoch for m in replicas.store.manifests()] == [6, 4]  # pruned to keep=2 after each upload
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(7, {})


class _FlakyStore(LocalDirStore):
    """Refuses its first write, as a store does through a network blip."""

    refusals = 1

    def write(self, epoch, files, writer, signer=None):
        if self.refusals:
            self.refusals -= 1
            raise StoreUnavailable("connection reset")
        return super().write(epoch, files, writer, signer)


def test_a_failed_upload_does_not_stop_the_writer(tmp_path):
    store = _FlakyStore(tmp_path)
    writer = CheckpointWriter(ReplicatedStore([store], trust=ANY_WRITER), "vm-1")
    writer.submit(1, {"model": {"w": torch.ones(1)}})
    assert writer.flush(timeout=30) and writer.failed == 1 and "connection reset" in writer.last_error
    writer.submit(2, {"model": {"w": torch.ones(1)}})
    assert writer.close(timeout=30) and writer.written == 1
    assert [m.epoch for m in store.manifests()] == [2]


class _OpensAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))  # unpickling would create the file


def test_a_payload_that_needs_code_is_refused_in_one_line_naming_what_it_would_call(tmp_path):
    buffer = io.BytesIO()
    torch.save({"weights": _OpensAFile(tmp_path / "code-ran")}, buffer)
    with pytest.raises(UnsafePayload) as refused:
        decode_state({"model.pt": buffer.getvalue()})
    message = str(refused.value)
    assert message == "model.pt: refused by the weights-only loader: it names io.open, which is code, not data"
    assert not (tmp_path / "code-ran").exists()
