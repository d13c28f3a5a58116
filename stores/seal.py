"""Which checkpoint manifests a reader believes: those an admitted peer of the cluster signed.

Whoever can write a store can write a manifest whose sizes and SHA-256 sums match the files beside
it, so a valid manifest proves nothing about who wrote it. A duty holder therefore seals every
manifest it writes (`ManifestSigner`): it signs the manifest's fields with its libp2p identity's
RSA key, the key the controller generated for that VM alone, and attaches that public key and the
cluster-signed admission record that lists its peer id. A reader (`AdmittedWriters`) believes a
manifest only when the admission record is the cluster key's for this cluster, it lists the
signer's peer id, and the signature over the manifest verifies under that key. The chain ends at
the cluster key, which every agent (user-data) and the controller (its cluster folder) hold, so a
checkpoint written by an instance that has since ended still verifies: no list of past
instances is needed. Instances the controller revoked are refused by the readers that know the
revocations (the controller's: status, report, export).

An unsigned manifest (planted, or written by a spotrain before manifests were signed) is refused
like a forged one, with a line that says which. `AnyWriter` believes every manifest: it is for a
reader with no cluster key (an agent whose user-data admits every peer, tests of the stores'
mechanics), never for the controller's readers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spotrain.contracts.admission import parse_admission, peer_id_of_public_key, sign_record, verified_body
from spotrain.stores.base import Manifest, Seal, StoreError

KIND = "checkpoint"  # the signed record's kind: a signature over another kind of record never passes
UNSIGNED = "unsigned (planted, or written before spotrain signed checkpoints): not trusted"


@dataclass(frozen=True)
class AdmittedWriters:
    """Believes manifests sealed by a peer that a cluster-signed admission lists, and not revoked."""

    cluster: str
    cluster_key: str  # the cluster's RSA public key, OpenSSH form ("" when unknown: nothing is believed)
    revoked: frozenset[str] = field(default_factory=frozenset)  # instance ids

    def refusal(self, manifest: Manifest) -> str | None:
        import time

        seal = manifest.seal
        if seal is None:
            return UNSIGNED
        admission = parse_admission(seal.admission, self.cluster_key, self.cluster, time.time())
        if admission is None:
            return f"its admission record is not signed by the cluster key of {self.cluster}: not trusted"
        peer_id = peer_id_of_public_key(seal.signer.encode())
        if peer_id is None or peer_id not in admission.peers:
            return "signed by a key its admission record does not list: not trusted"
        record = {"kind": KIND, "body": manifest.signed_fields(), "signature": seal.signature}
        if verified_body(record, KIND, seal.signer) is None:
            return f"signature of peer {peer_id} does not match the manifest: not trusted"
        if admission.peers[peer_id] in self.revoked:
            return f"signed by revoked instance {admission.peers[peer_id]}: not trusted"
        return None


class AnyWriter:
    """Believes every manifest that parses: for readers without a cluster key (see the module)."""

    def refusal(self, manifest: Manifest) -> str | None:
        return None


ANY_WRITER = AnyWriter()


@dataclass(frozen=True)
class ManifestSigner:
    """An admitted peer's key, and where its newest admission record is read at each write."""

    private_key: Any  # a `cryptography` RSA private key: the VM's libp2p identity
    admission: Callable[[], Mapping[str, Any] | None]  # the newest signed admission record held

    @classmethod
    def from_identity(cls, identity: bytes, admission: Callable[[], Mapping[str, Any] | None]) -> ManifestSigner:
        """`identity`: hivemind's identity file (the one the controller generated for this VM)."""
        from cryptography.hazmat.primitives import serialization

        from spotrain.contracts.admission import identity_private_der

        return cls(serialization.load_der_private_key(identity_private_der(identity), password=None), admission)

    def public_key(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return str(self.private_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH).decode())

    def seal(self, manifest: Manifest) -> Manifest:
        record = self.admission()
        if record is None:
            raise StoreError("no admission record to seal the checkpoint with")
        signed = sign_record(KIND, manifest.signed_fields(), self.private_key)
        seal = Seal(signer=self.public_key(), admission=dict(record), signature=signed["signature"])
        return manifest.model_copy(update={"seal": seal})
