"""Every checkpoint store, against the real thing or its local stand-in: a directory, S3 through
moto's server, GCS through gcp-storage-emulator. The same contract holds for each."""

from __future__ import annotations

import logging
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from spotrain.stores import (
    ANY_WRITER,
    CorruptCheckpoint,
    NonFiniteState,
    ReplicatedStore,
    StoreUnavailable,
    StoreURLError,
    open_store,
)
from spotrain.stores.gcs import GcsStore
from spotrain.stores.local import LocalDirStore
from spotrain.stores.payload import encode_state
from spotrain.stores.s3 import S3Store

BUCKET = "spotrain-checkpoints"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_url():
    """gcp-storage-emulator in this process, in memory, with the test bucket."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server = create_server("127.0.0.1", _free_port(), in_memory=True, default_bucket=BUCKET)
    server.start()
    yield f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    server.stop()


@pytest.fixture
def gcs(gcs_url, monkeypatch):
    """An empty bucket, reached through STORAGE_EMULATOR_HOST as the client documents."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "spotrain-test")
    store = GcsStore(BUCKET, "run")
    for blob in store.bucket.list_blobs():
        blob.delete()
    return gcs_url


@pytest.fixture
def s3(aws):
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return aws


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "ckpt"))
    request.getfixturevalue(request.param)
    scheme = {"s3": "s3", "gcs": "gs"}[request.param]
    return open_store(f"{scheme}://{BUCKET}/runs/demo")


def state_at(epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), float(epoch)), "b": torch.arange(4)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(epoch))}, "local_epoch": epoch},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "foreach": None,
                                            "params": [0]}]}}


def save(store, epoch: int, writer: str = "vm-1") -> None:
    ReplicatedStore([store], trust=ANY_WRITER).save_state(epoch, state_at(epoch), writer)


def newest(store):
    return ReplicatedStore([store], trust=ANY_WRITER).load_newest()


def test_a_checkpoint_round_trips_and_the_newest_wins(store):
    for epoch in (5, 15, 10):
        save(store, epoch)
    assert [m.epoch for m in store.manifests()] == [15, 10, 5]
    loaded = newest(store)
    assert loaded.epoch == 15 and loaded.store_url == store.url
    assert torch.equal(loaded.state["model"]["w"], torch.full((3,), 15.0))
    assert loaded.state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded.state["optimizer"]["state"]["local_epoch"] == 15
    manifest = store.manifests()[0]
    assert {f.name for f in manifest.files} == {"model.pt", "optimizer.pt"} and manifest.writer == "vm-1"
    assert store.is_complete(manifest)


def test_a_write_that_dies_before_its_manifest_leaves_no_checkpoint(store, monkeypatch):
    save(store, 1)
    put = store._put

    def crash_at_the_manifest(key: str, data: bytes) -> None:
        if key.endswith(".json"):
            raise StoreUnavailable("the VM died")
        put(key, data)

    monkeypatch.setattr(store, "_put", crash_at_the_manifest)
    with pytest.raises(StoreUnavailable):
        save(store, 2)
    monkeypatch.undo()
    assert any(key.startswith("ckpt-00000002-") for key in store._list())  # its files did land
    assert [m.epoch for m in store.manifests()] == [1]
    assert newest(store).epoch == 1
    # once older than every kept checkpoint, the orphaned files are pruned too
    for epoch in (3, 4):
        save(store, epoch)
    store.prune(keep=2)
    assert sorted(store._list()) == sorted(key for m in store.manifests()
                                           for key in [m.key, *(m.file_key(f.name) for f in m.files)])
    assert [m.epoch for m in store.manifests()] == [4, 3]


def test_a_corrupt_or_torn_payload_is_skipped(store):
    for epoch in (1, 2, 3):
        save(store, epoch)
    three, two, _ = store.manifests()
    store._put(three.file_key("model.pt"), b"torn")  # a short file
    flipped = bytearray(store._get(two.file_key("optimizer.pt")))
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other bytes
    store._put(two.file_key("optimizer.pt"), bytes(flipped))
    assert not store.is_complete(three) and store.is_complete(two)
    with pytest.raises(CorruptCheckpoint, match="bytes, the manifest says"):
        store.read(three)
    with pytest.raises(CorruptCheckpoint, match="SHA-256"):
        store.read(two)
    assert newest(store).epoch == 1


def test_a_payload_that_would_run_code_is_refused_without_running_it(store, tmp_path):
    save(store, 1)
    marker = tmp_path / "pwned"
    assert_armed(tmp_path)
    for epoch, payload in ((2, armed_pickle(marker)), (3, armed_torch_file(marker))):
        # with a valid manifest: only the loader stands guard
        store.write(epoch, {"model.pt": payload}, "intruder")
    assert newest(store).epoch == 1
    assert not marker.exists()


def test_a_non_finite_state_is_never_written_and_never_loaded(store):
    save(store, 1)
    poisoned = state_at(2)
    poisoned["model"]["w"][1] = float("nan")
    with pytest.raises(NonFiniteState, match="model.w: non-finite"):
        ReplicatedStore([store], trust=ANY_WRITER).save_state(2, poisoned, "vm-1")
    assert [m.epoch for m in store.manifests()] == [1]
    with pytest.raises(NonFiniteState, match="optimizer.lr: inf"):
        ReplicatedStore([store], trust=ANY_WRITER).save_state(2, {"optimizer": {"lr": float("inf")}}, "vm-1")
    # a writer that skipped the check: the reader refuses it all the same
    files = encode_state({"model": {"w": torch.zeros(2)}})
    files["model.pt"] = torch_bytes({"w": torch.tensor([0.0, float("-inf")])})
    store.write(3, files, "careless")
    assert newest(store).epoch == 1


def test_prune_keeps_the_newest_k_epochs_of_every_writer(store):
    for epoch in range(1, 6):
        save(store, epoch, "vm-1")
    save(store, 5, "vm-2")  # two holders in one store: both copies of epoch 5 stay
    save(store, 2, "vm-2")
    removed = store.prune(keep=2)
    assert sorted(m.epoch for m in removed) == [1, 2, 2, 3]
    assert [(m.epoch, m.writer) for m in store.manifests()] == [(5, "vm-2"), (5, "vm-1"), (4, "vm-1")]
    assert all(key.startswith(("ckpt-00000005-", "ckpt-00000004-")) for key in store._list())
    assert store.prune(keep=2) == []


def test_checkpoints_planted_ahead_of_the_writer_take_no_slot_when_it_prunes(store):
    """Someone who can write the store plants far newer epochs: the writer's prune counts only the
    epochs up to its own newest, so its honest history is kept (loads refuse what is planted)."""
    for epoch in range(1, 5):
        save(store, epoch, "vm-1")
    save(store, 100, "planted")
    save(store, 101, "planted")
    removed = store.prune(keep=2, up_to=4)
    assert sorted(m.epoch for m in removed) == [1, 2]
    assert sorted(m.epoch for m in store.manifests()) == [3, 4, 100, 101]


def test_a_missing_bucket_is_a_store_error(store, tmp_path):
    target = {LocalDirStore: lambda: LocalDirStore(tmp_path / "file" / "under"),
              S3Store: lambda: open_store("s3://no-such-bucket/x"),
              GcsStore: lambda: open_store("gs://no-such-bucket/x")}[type(store)]()
    (tmp_path / "file").write_text("a file where a directory should be")
    with pytest.raises(StoreUnavailable):
        save(target, 1)


def test_endpoints_come_from_the_url_too(s3, gcs_url, gce, monkeypatch, tmp_path):
    # no AWS_ENDPOINT_URL: the URL's option names the endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3_store = open_store(f"s3://{BUCKET}/p?endpoint={s3}&region=eu-west-1")
    save(s3_store, 7)
    assert newest(open_store(f"s3://{BUCKET}/p?endpoint={s3}")).epoch == 7
    # no STORAGE_EMULATOR_HOST: an explicit GCS endpoint authenticates (the GCE fake's service account)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    gcs_store = open_store(f"gs://{BUCKET}/p?endpoint={gcs_url}&project=spotrain-test")
    save(gcs_store, 8)
    assert newest(gcs_store).epoch == 8


def test_each_stage_of_a_url_with_options_checkpoints_under_its_own_prefix(s3, monkeypatch):
    from spotrain.agents.pipeline.stage_checkpoints import stage_store_url

    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from the URL, as on the emulated cloud
    url = f"s3://{BUCKET}/geo?endpoint={s3}"
    assert stage_store_url(url, 1) == f"s3://{BUCKET}/geo/stage1?endpoint={s3}"
    for stage in (0, 1):
        save(open_store(stage_store_url(url, stage)), 10 + stage)
    listed = boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket=BUCKET, Prefix="geo/")["Contents"]
    assert {item["Key"].split("/")[1] for item in listed} == {"stage0", "stage1"}
    assert newest(open_store(stage_store_url(url, 1))).epoch == 11


def test_urls_open_one_class_per_scheme(tmp_path):
    assert open_store(str(tmp_path)).root == tmp_path
    assert open_store(f"file://{tmp_path}").root == tmp_path
    for url, message in (("ftp://host/x", "unknown scheme 'ftp'"), ("s3:///x", "expected s3://BUCKET"),
                         ("s3://b/x?endpont=http://e", "unknown option 'endpont'"),
                         ("gs://b/x?project=a&project=b", "given twice"), ("file:///x?y=1", "no options")):
        with pytest.raises(StoreURLError, match=message) as raised:
            open_store(url)
        assert "\n" not in str(raised.value)


def test_the_cloud_sdks_are_imported_only_when_a_store_needs_them():
    code = ("import sys, spotrain.stores, spotrain.agents.roles.data_parallel; "
            "print([m for m in ('boto3', 'google.cloud.storage') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


class _Armed:
    """Unpickling this calls Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def armed_pickle(marker: Path) -> bytes:
    return pickle.dumps({"w": _Armed(marker)}, protocol=2)


def armed_torch_file(marker: Path) -> bytes:
    return torch_bytes({"w": torch.zeros(2), "hook": _Armed(marker)})


def assert_armed(tmp_path: Path) -> None:
    """The payloads do run code when unpickled the trusting way, so refusing them means something."""
    for index, payload in enumerate((armed_pickle, armed_torch_file)):
        control = tmp_path / f"control-{index}"
        data = payload(control)
        if index == 0:
            pickle.loads(data)
        else:
            import io

            torch.load(io.BytesIO(data), weights_only=False)
        assert control.exists()


def torch_bytes(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_a_shipped_object_round_trips_and_a_vm_fetches_it_by_its_url(store, tmp_path, monkeypatch):
    """spotrain/shipping.py's objects: stored under code/, sized without a download, and served at
    the URL a VM's installer reads (presigned S3, GCS media with the VM's token, file://)."""
    import hashlib

    from spotrain.infra import install_shipped
    from spotrain.stores.base import StoreError

    data = b"a wheel" * 100
    key = f"code/{hashlib.sha256(data).hexdigest()}/spotrain-0.1.0-py3-none-any.whl"
    assert store.object_size(key) is None
    store.put_object(key, data)
    assert store.object_size(key) == len(data) and store.get_object(key) == data
    with pytest.raises(StoreError, match="unsafe object key"):
        store.put_object("code/../../etc/passwd", data)
    where = store.fetch_url(key, 600)
    assert where.auth == ("gce-metadata" if store.url.startswith("gs://") else "none")
    monkeypatch.setattr(install_shipped, "_gce_token", lambda: "a-token")  # the GCE metadata server's part
    shipped = {"url": where.url, "auth": where.auth, "name": key.rsplit("/", 1)[1], "size": len(data),
               "sha256": hashlib.sha256(data).hexdigest()}
    assert install_shipped.fetch(shipped, tmp_path).read_bytes() == data
    assert store.manifests() == [] and store.prune(1) == []
