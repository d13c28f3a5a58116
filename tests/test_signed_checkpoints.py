"""A checkpoint counts only when an admitted peer sealed its manifest (spotrain/stores/seal.py).

Whoever can write a store can plant a manifest whose sizes and SHA-256 sums are right. Against a
real directory store and S3 (moto's server), planted manifests ahead of the honest ones (unsigned,
signed by a key the admission does not list, signed under another cluster key, an honest seal
copied onto another epoch, signed by an instance revoked since) are never loaded, take no slot
when the duty holder prunes, and are shown nowhere as the newest checkpoint: not by an agent's
restore, nor by `status`, `report` or `export`.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from pathlib import Path

import boto3
import pytest
import torch

from spotrain.access import ClusterAccess, checkpoint_trust, new_identity
from spotrain.agents.admission import Gate, checkpoint_keys, write_private
from spotrain.agents.roles.data_parallel import _restore
from spotrain.agents.swarm_join import IDENTITY_FILE
from spotrain.config import ClusterSpec
from spotrain.contracts.admission import peer_id_of_identity
from spotrain.ledger import Ledger
from spotrain.stores import ANY_WRITER, CheckpointWriter, ManifestSigner, ReplicatedStore, encode_state, open_store

CLUSTER = "sealed"
BUCKET = "sealed-checkpoints"


@pytest.fixture(params=["directory", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "directory":
        return str(tmp_path / "ckpt")
    request.getfixturevalue("aws")  # moto's server, through AWS_ENDPOINT_URL
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/run"


class _CreatesMarker:
    """Unpickling this would run code: create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def model_files(value: float, marker: Path | None = None) -> dict[str, bytes]:
    """A checkpoint's files (valid for any manifest describing them); with `marker`, a pickle that runs code."""
    files = encode_state({"model": {"w": torch.full((3,), value)}, "optimizer": {}})
    if marker is not None:
        buffer = io.BytesIO()
        torch.save({"w": torch.full((3,), value), "hook": _CreatesMarker(marker)}, buffer)
        files["model.pt"] = buffer.getvalue()
    return files


def signer_of(admitted: dict, record: dict) -> ManifestSigner:
    return ManifestSigner.from_identity(base64.b64decode(admitted["identity"]), lambda: record)


def plant(url: str, folder: Path, record: dict, marker: Path, first: int) -> list[int]:
    """Epochs `first`... planted as a stranger with write access to the store would (every manifest's
    hashes right, every model.pt a pickle that would create `marker` if loaded). Returns them."""
    store = open_store(url)
    store.write(first, model_files(first, marker), "planted-unsigned")
    stranger = ManifestSigner.from_identity(new_identity(), lambda: record)  # the real record does not list it
    store.write(first + 1, model_files(first + 1, marker), "planted-stranger", stranger)
    foreign = ClusterAccess(folder.parent / "foreign-key", CLUSTER)  # same cluster name, another key
    _, _, each = foreign.admit_only(["i-forger"], time.time(), 10.0)
    forged = signer_of(each["i-forger"], each["i-forger"]["record"])
    store.write(first + 2, model_files(first + 2, marker), "planted-foreign", forged)
    honest = next(m for m in store.manifests() if m.seal is not None and m.writer.startswith("i-honest"))
    copied = store.write(first + 3, model_files(first + 3, marker), "planted-copied-seal")
    store._put(copied.key, copied.model_copy(update={"seal": honest.seal}).to_json())  # type: ignore[attr-defined]
    return [first, first + 1, first + 2, first + 3]


REFUSALS = {"planted-unsigned": "unsigned (planted, or written before spotrain signed checkpoints)",
            "planted-stranger": "signed by a key its admission record does not list",
            "planted-foreign": f"its admission record is not signed by the cluster key of {CLUSTER}",
            "planted-copied-seal": "does not match the manifest"}


def agent_keys(folder: Path, work: Path, access: ClusterAccess, admitted: dict):
    """The trust and signer an admitted agent builds from its user-data (agents/admission.py)."""
    work.mkdir()
    identity = base64.b64decode(admitted["identity"])
    write_private(work / IDENTITY_FILE, identity)
    gate = Gate(work / "admitted.json", CLUSTER, access.public_key, peer_id_of_identity(identity), log=lambda _: None)
    assert gate.accept(admitted["record"], from_user_data=True) is not None
    return checkpoint_keys(gate, work)


def test_an_agent_restores_and_prunes_only_what_an_admitted_peer_sealed(store_url, tmp_path, caplog):
    folder, marker = tmp_path / "cluster", tmp_path / "code-ran"
    access = ClusterAccess(folder, CLUSTER)
    _, _, each = access.admit_only(["i-honest"], time.time(), 10.0)
    trust, signer = agent_keys(folder, tmp_path / "work", access, each["i-honest"])
    writer = CheckpointWriter(ReplicatedStore.from_urls([store_url], trust=trust, signer=signer), "i-honest-1", keep=2)
    for epoch in (2, 4, 6):
        writer.submit(epoch, {"model": {"w": torch.full((3,), float(epoch))}, "optimizer": {}})
        assert writer.flush(timeout=60)
        if epoch == 2:
            planted = plant(store_url, folder, each["i-honest"]["record"], marker, 3)  # 3, 4, 5, 6 between ours
    assert writer.close(timeout=60) and writer.written == 3
    planted += plant(store_url, folder, each["i-honest"]["record"], marker, 131)  # far ahead, as in the attack

    listed = {(m.epoch, m.writer) for m in open_store(store_url).manifests()}
    # the planted epochs took no slot: the writer kept its own 4 and 6 (keep=2) and removed its 2
    assert {(4, "i-honest-1"), (6, "i-honest-1")} <= listed and (2, "i-honest-1") not in listed
    assert {epoch for epoch, _ in listed} >= set(planted) - {3}  # what is older than its kept 4 went

    caplog.set_level(logging.WARNING)
    loaded = _restore((store_url,), lambda path, tensor: False, trust)
    assert loaded is not None and loaded.epoch == 6 and loaded.manifest.writer == "i-honest-1"
    assert torch.equal(loaded.state["model"]["w"], torch.full((3,), 6.0))
    assert not marker.exists()  # no planted file was ever unpickled
    for writer_name, why in REFUSALS.items():
        assert any(f"-{writer_name}:" in r.message and why in r.message for r in caplog.records), writer_name
    assert not any("weights-only" in r.message for r in caplog.records)  # refused before any file was read
    # the same store, read without checking seals, would have offered the planted epoch first
    assert ReplicatedStore.from_urls([store_url], trust=ANY_WRITER).candidates()[0][1].epoch == 134


def test_status_report_and_export_show_only_an_admitted_peers_checkpoint(store_url, home, tmp_path, caplog):
    from spotrain import cluster_ops, report_data
    from spotrain.export import export_model
    from spotrain.home import cluster_dir

    marker = tmp_path / "code-ran"
    folder = cluster_dir(CLUSTER)
    access = ClusterAccess(folder, CLUSTER)  # the controller's cluster key, as `launch` creates it
    record, _, each = access.admit_only(["i-honest", "i-later-revoked"], time.time(), 10.0)
    ReplicatedStore.from_urls([store_url], trust=ANY_WRITER, signer=signer_of(each["i-honest"], record)).write(
        6, model_files(6.0), "i-honest-1")
    ReplicatedStore.from_urls([store_url], trust=ANY_WRITER, signer=signer_of(each["i-later-revoked"], record)).write(
        90, model_files(90.0), "i-later-revoked-1")
    access.revoke("i-later-revoked")  # e.g. the poison guard's repeat offender
    plant(store_url, folder, record, marker, 131)
    spec = ClusterSpec.model_validate({"name": CLUSTER, "budget": {"total_usd": 1.0},
                                       "checkpoint": {"stores": [store_url]}}).model_dump(mode="json")
    ledger = Ledger.create(folder / "ledger.db")
    run = ledger.open_run(1.0, spec, time.time())
    ledger.close()

    caplog.set_level(logging.WARNING)
    shown = open_store(store_url).url
    status = cluster_ops.status(CLUSTER)  # `spotrain status`: its figures come from the report's headline
    assert status["checkpoint_path"] == f"{shown} (epoch 6; `spotrain export` writes its model)"
    assert report_data.newest_checkpoint(run, CLUSTER) == (shown, 6)  # `spotrain report`'s checkpoint_epoch
    exported = export_model(CLUSTER, tmp_path / "model.pt")
    assert exported.epoch == 6
    assert torch.equal(torch.load(exported.path, weights_only=True)["w"], torch.full((3,), 6.0))
    assert not marker.exists()
    assert any("ckpt-00000090-i-later-revoked-1: signed by revoked instance i-later-revoked" in r.message
               for r in caplog.records)
    for writer_name, why in REFUSALS.items():
        assert any(f"-{writer_name}:" in r.message and why in r.message for r in caplog.records), writer_name


def test_a_manifest_from_before_seals_is_refused_in_one_line(tmp_path, caplog):
    """Checkpoints written before spotrain signed manifests are refused like planted ones: restore
    from a live peer, or start over; nothing reads an unsigned manifest but a reader without a key."""
    url = str(tmp_path / "old")
    ReplicatedStore.from_urls([url], trust=ANY_WRITER).write(5, model_files(5.0), "i-old-1")
    ClusterAccess(tmp_path / "cluster", CLUSTER)
    trust = checkpoint_trust(tmp_path / "cluster", CLUSTER)
    caplog.set_level(logging.WARNING)
    assert ReplicatedStore.from_urls([url], trust=trust).load_newest() is None
    (line,) = [r.message for r in caplog.records if "skipping checkpoint" in r.message]
    assert line == (f"file://{url}: skipping checkpoint ckpt-00000005-i-old-1: unsigned (planted, or written before "
                    f"spotrain signed checkpoints): not trusted")
    assert ReplicatedStore.from_urls([url], trust=trust).audit().stores[0].newest_epoch is None
