"""The cluster's signed records, pure: signing, verification, expiry, time bounds, and statuses bound
to the admitted peer that signed them (spotrain.contracts.admission, contracts.records)."""

import json
import stat
from types import SimpleNamespace

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from spotrain.access import ClusterAccess
from spotrain.contracts.admission import (
    MAX_CLOCK_SKEW_SECONDS,
    Admission,
    Duty,
    admission_record,
    duty_record,
    newest_duty,
    owner_marker,
    parse_admission,
    parse_duty,
    peer_id_of_identity,
    peer_id_of_public_key,
    sign_record,
)
from spotrain.contracts.records import AgentStatus, newest_statuses
from spotrain.contracts.states import AgentState


@pytest.fixture(scope="module")
def access(tmp_path_factory) -> ClusterAccess:
    return ClusterAccess(tmp_path_factory.mktemp("cluster") / "c", "c")


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> ClusterAccess:
    return ClusterAccess(tmp_path_factory.mktemp("other") / "c", "c")  # same cluster name, another key


def test_an_admission_verifies_with_the_cluster_key_only(access, stranger):
    admission = Admission("c", access.controller_peer_id, {"QmPeer": "i-a"}, issued=100.0, expires=130.0)
    record = admission_record(admission, access.private_key)
    assert parse_admission(record, access.public_key, "c", 100.0) == admission
    assert parse_admission(record, stranger.public_key, "c", 100.0) is None  # another key signed it
    assert parse_admission(record, access.public_key, "other-cluster", 100.0) is None
    forged = json.loads(json.dumps(record))
    forged["body"]["peers"]["QmStranger"] = "i-b"
    assert parse_admission(forged, access.public_key, "c", 100.0) is None  # a peer added after signing
    by_stranger = admission_record(Admission("c", "x", {"QmStranger": "i-a"}, 100.0, 130.0), stranger.private_key)
    assert parse_admission(by_stranger, access.public_key, "c", 100.0) is None
    for garbage in (None, [], "x", {"kind": "admission"}, {**record, "signature": "!!"}, {**record, "extra": 1}):
        assert parse_admission(garbage, access.public_key, "c", 100.0) is None


def test_a_record_of_one_kind_never_passes_for_another(access):
    duty = duty_record(Duty("c", ("i-a",), 100.0, 160.0), access.private_key)
    assert parse_duty(duty, access.public_key, "c", 100.0) == Duty("c", ("i-a",), 100.0, 160.0)
    assert parse_admission({**duty, "kind": "admission"}, access.public_key, "c", 100.0) is None


def test_times_are_bounded_by_the_readers_clock(access):
    ahead = admission_record(Admission("c", "x", {}, 100.0 + MAX_CLOCK_SKEW_SECONDS + 1, 200.0), access.private_key)
    assert parse_admission(ahead, access.public_key, "c", 100.0) is None  # from the future
    duty = duty_record(Duty("c", ("i-a",), 100.0, 160.0), access.private_key)
    assert parse_duty(duty, access.public_key, "c", 161.0) is None  # expired
    future = duty_record(Duty("c", (), 100.0 + MAX_CLOCK_SKEW_SECONDS + 1, 10**9), access.private_key)
    assert parse_duty(future, access.public_key, "c", 100.0) is None
    for bad in (True, "100", None):  # NaN cannot even be signed (canonical JSON refuses it)
        body = {"cluster": "c", "holders": [], "issued": bad, "expires": 160.0}
        assert parse_duty(sign_record("duty", body, access.private_key), access.public_key, "c", 100.0) is None
    nan = {**duty, "body": {**duty["body"], "issued": float("nan")}}
    assert parse_duty(nan, access.public_key, "c", 100.0) is None


def test_a_newer_admission_replaces_and_a_replayed_older_or_stale_one_does_not():
    current = Admission("c", "x", {"a": "i-a"}, issued=100.0, expires=130.0)
    assert Admission("c", "x", {}, 110.0, 140.0).replaces(current, 111.0)
    assert not Admission("c", "x", {"a": "i-a"}, 90.0, 120.0).replaces(current, 100.0)  # older
    assert not Admission("c", "x", {}, 110.0, 140.0).replaces(current, 140.0 + MAX_CLOCK_SKEW_SECONDS + 1)  # stale


def test_the_newest_duty_signed_by_the_cluster_key_wins_and_anything_else_is_ignored(access, stranger):
    mine = duty_record(Duty("c", ("i-a",), 100.0, 160.0), access.private_key)
    newer = duty_record(Duty("c", ("i-b",), 101.0, 160.0), access.private_key)
    forged = duty_record(Duty("c", (), 150.0, 10**9), stranger.private_key)
    found = SimpleNamespace(value={b"1": SimpleNamespace(value=mine), b"2": SimpleNamespace(value=newer),
                                   b"3": SimpleNamespace(value=forged), b"4": SimpleNamespace(value=[])})
    assert newest_duty(found, access.public_key, "c", 102.0).holders == ("i-b",)
    assert newest_duty(SimpleNamespace(value=[]), access.public_key, "c", 102.0) is None


def status(instance_id: str, at: float, state=AgentState.TRAINING) -> dict:
    return AgentStatus(instance_id, state, epoch=3, samples=10, samples_per_second=1.5, loss=None, bytes_sent=1,
                       bytes_received=2, checkpoint_epoch=None, addresses=(), time=at).to_record()


def test_a_status_counts_only_when_the_admitted_peer_of_its_instance_signed_it():
    a, b = RSAPrivateKey(), RSAPrivateKey()
    a_public, b_public = a.get_public_key().to_bytes().decode(), b.get_public_key().to_bytes().decode()
    a_peer = peer_id_of_public_key(a_public.encode())
    admitted = {a_peer: "i-a"}
    entries = {
        b"i-a" + owner_marker(a_public): SimpleNamespace(value=status("i-a", 100.0)),
        # b (not admitted) claims i-a draining, and a claims to be i-x: neither counts
        b"i-a" + owner_marker(b_public): SimpleNamespace(value=status("i-a", 101.0, AgentState.DRAINING)),
        b"i-x" + owner_marker(a_public): SimpleNamespace(value=status("i-x", 101.0)),
        b"i-a": SimpleNamespace(value=status("i-a", 102.0, AgentState.DRAINING)),  # no owner at all
    }
    got = newest_statuses(SimpleNamespace(value=entries), 101.0, admitted)
    assert list(got) == ["i-a"] and got["i-a"].state == AgentState.TRAINING
    # the admitted peer's own record from the future never counts (it would never go stale)
    future = {b"i-a" + owner_marker(a_public): SimpleNamespace(value=status("i-a", 101.0 + 3600))}
    assert newest_statuses(SimpleNamespace(value=future), 101.0, admitted) == {}


def test_state_files_are_private_and_identities_are_forgotten_once_launched(tmp_path):
    access = ClusterAccess(tmp_path / "c", "c")
    identity = access.identity_for("c-r1")
    assert access.identity_for("c-r1") == identity  # a re-issued request hands the same identity
    assert peer_id_of_identity(identity) in access.admission({"c-r1": None}, 1.0, 2.0).peers
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700
    for f in (tmp_path / "c").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    table = (tmp_path / "c" / "admission.json").read_text()
    assert json.loads(table)["requests"]["c-r1"]["identity"]
    access.launched("c-r1")
    assert "identity" not in (tmp_path / "c" / "admission.json").read_text()
    assert peer_id_of_identity(identity) in ClusterAccess(tmp_path / "c", "c").admission({"c-r1": "i-1"}, 1, 2).peers
    access.revoke("i-1")
    assert ClusterAccess(tmp_path / "c", "c").admission({"c-r1": "i-1"}, 1.0, 2.0).peers == {}
    assert ClusterAccess(tmp_path / "c", "c").controller_peer_id == access.controller_peer_id  # stable


def test_the_identity_never_shows_in_a_configs_repr_but_travels_on_the_wire(access):
    import base64

    from conftest import agent_config

    secret = base64.b64encode(access.identity_for("c-r9")).decode()
    record = access.sign_admission(access.admission({"c-r9": None}, 1.0, 2.0))
    config = agent_config(admission={"cluster_key": access.public_key, "identity": secret, "record": record})
    assert secret not in repr(config) and secret not in str(config)
    assert config.wire()["admission"]["identity"] == secret
