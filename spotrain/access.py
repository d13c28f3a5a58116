"""The cluster key: who the controller admits to the swarm, and the records it signs.

Under the cluster's state folder (0700), each file 0600:
- `cluster-key.pem`: the cluster's RSA key. It signs the admission and duty records
  (spotrain.contracts.admission) and the controller's DHT peer writes with it.
- `controller-identity.key`: the controller's libp2p identity, so its peer id (named in every
  admission record and agent config) stays the same across restarts.
- `admission.json`: per launch request, the peer id of the libp2p identity generated for that VM
  (and the identity itself only until the provider has the VM: a re-issued request must hand the
  same identity to a VM the provider may already have started), and the revoked instance ids.
- `admitted.json`: the newest signed admission record, which the gate of the controller's DHT
  process reads (agents/admission.py; swarm_view writes it).

Publish first, launch second: `identity_for(request)` enters the new peer id into the table
before the provider is called, and the controller signs and publishes the table at once, so
the VM is admitted everywhere before it can contact anyone. An instance is revoked when it ends
(the ledger no longer lists it live), or by `revoke(instance_id)` (a misbehaving peer).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrain.agents.admission import write_private
from spotrain.contracts.admission import (
    Admission,
    Duty,
    admission_record,
    duty_record,
    hivemind_private_key,
    identity_private_der,
    peer_id_of_identity,
)

if TYPE_CHECKING:
    from spotrain.stores.seal import AdmittedWriters

ADMISSION_TICKS = 5  # an admission record lives this many ticks: republished every tick
MIN_ADMISSION_SECONDS = 30.0
KEY_FILE = "cluster-key.pem"
CONTROLLER_IDENTITY_FILE = "controller-identity.key"
TABLE_FILE = "admission.json"
RECORD_FILE = "admitted.json"


class ClusterAccess:
    def __init__(self, folder: Path, cluster: str):
        self.folder = folder
        self.cluster = cluster
        private_dir(folder)
        self.private_key = _load_or_create_key(folder / KEY_FILE)
        self.public_key = _ssh_public(self.private_key)
        self.controller_identity = _load_or_create_identity(folder / CONTROLLER_IDENTITY_FILE)
        self.controller_peer_id = peer_id_of_identity(self.controller_identity)
        self._table = _read_table(folder / TABLE_FILE)

    @property
    def controller_identity_path(self) -> Path:
        return self.folder / CONTROLLER_IDENTITY_FILE

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD_FILE

    def identity_for(self, request_id: str) -> bytes:
        """The libp2p identity of the VM launched for `request_id`: new, or the one a re-issued
        request had. Its peer id is in the table (admitted) from now on."""
        entry = self._table["requests"].get(request_id)
        if entry is not None and "identity" in entry:
            return base64.b64decode(entry["identity"])
        if entry is not None:
            raise RuntimeError(f"request {request_id} was launched already: its identity is not kept")
        identity = new_identity()
        self._table["requests"][request_id] = {"peer_id": peer_id_of_identity(identity),
                                               "identity": base64.b64encode(identity).decode()}
        self._save()
        return identity

    def launched(self, request_id: str) -> None:
        """The provider has the VM: forget its identity (only the VM keeps it)."""
        entry = self._table["requests"].get(request_id)
        if entry is not None and entry.pop("identity", None) is not None:
            self._save()

    def revoke(self, instance_id: str) -> None:
        """Never admit this instance again (the next admission record leaves it out). Instances that
        ended are left out anyway; this is for one that still runs but must not take part."""
        if instance_id not in self._table["revoked"]:
            self._table["revoked"].append(instance_id)
            self._save()

    def revoked(self) -> frozenset[str]:
        return frozenset(self._table["revoked"])

    def admission(self, live: Mapping[str, str | None], now: float, tick_seconds: float) -> Admission:
        """The admission of the live requests (request id -> instance id, None before the provider
        named it), less the revoked instances."""
        peers = {}
        for request_id, instance_id in live.items():
            entry = self._table["requests"].get(request_id)
            if entry is not None and (instance_id or "") not in self._table["revoked"]:
                peers[entry["peer_id"]] = instance_id or ""
        expires = now + max(MIN_ADMISSION_SECONDS, ADMISSION_TICKS * tick_seconds)
        return Admission(self.cluster, self.controller_peer_id, peers, now, expires)

    def admit_only(self, instance_ids: Sequence[str], now: float, tick_seconds: float,
                   ) -> tuple[dict[str, Any], float, dict[str, dict[str, Any]]]:
        """Agents started by hand (tests, benchmarks), one request per instance id: sign an admission
        of exactly these. Returns the record, its expiry and each instance's user-data `admission`."""
        identities = {i: self.identity_for(f"r-{i}") for i in instance_ids}
        admission = self.admission({f"r-{i}": i for i in instance_ids}, now, tick_seconds)
        record = self.sign_admission(admission)
        return record, admission.expires, {i: {"cluster_key": self.public_key, "record": record,
                                               "identity": base64.b64encode(identity).decode()}
                                           for i, identity in identities.items()}

    def sign_admission(self, admission: Admission) -> dict[str, Any]:
        return admission_record(admission, self.private_key)

    def sign_duty(self, holders: tuple[str, ...], now: float, ttl: float) -> dict[str, Any]:
        return duty_record(Duty(self.cluster, holders, now, now + ttl), self.private_key)

    def hivemind_key(self) -> Any:
        """The cluster key as hivemind's RSAPrivateKey (its DHT signs the controller's records with it)."""
        return hivemind_private_key(self.private_key_der())

    def private_key_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(self.private_key.private_bytes(serialization.Encoding.DER,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption()))

    def _save(self) -> None:
        write_private(self.folder / TABLE_FILE, json.dumps(self._table, sort_keys=True).encode())


def checkpoint_trust(folder: Path, cluster: str) -> AdmittedWriters:
    """Which checkpoint manifests the controller's readers (status, report, export) believe: those
    sealed by a peer the cluster key admitted, and not by an instance revoked since. Reads the
    cluster folder and creates nothing: without a cluster key no manifest is believed."""
    from spotrain.stores.seal import AdmittedWriters

    key_path = folder / KEY_FILE
    if not key_path.exists():
        return AdmittedWriters(cluster, "")
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return AdmittedWriters(cluster, _ssh_public(key), frozenset(_read_table(folder / TABLE_FILE)["revoked"]))


def new_identity() -> bytes:
    """A fresh libp2p RSA identity, serialized as hivemind writes its identity files."""
    from hivemind.proto import crypto_pb2
    from hivemind.utils.crypto import RSAPrivateKey

    return bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA,
                                       data=RSAPrivateKey().to_bytes()).SerializeToString())


def private_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)  # one an older spotrain created is 0755


def _load_or_create_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if path.exists():
        os.chmod(path, 0o600)
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _load_or_create_identity(path: Path) -> bytes:
    if path.exists():
        os.chmod(path, 0o600)
        identity = path.read_bytes()
        identity_private_der(identity)  # a damaged file fails here, naming nothing secret
        return identity
    identity = new_identity()
    write_private(path, identity)
    return identity


def _ssh_public(private_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return str(private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH).decode())


def _read_table(path: Path) -> dict[str, Any]:
    table: dict[str, Any] = {"requests": {}, "revoked": []}
    if path.exists():
        os.chmod(path, 0o600)
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            table["requests"] = dict(data.get("requests", {}))
            table["revoked"] = list(data.get("revoked", []))
    return table
