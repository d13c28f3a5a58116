"""The cluster's signed records: who is admitted, who holds checkpoint duty.

The controller holds the cluster's RSA key (spotrain/access.py). It signs two kinds of record:
- admission (`<cluster>.admitted`): the controller's peer id and, for every live instance, the
  libp2p peer id the controller generated for it -> its instance id ("" until the provider has
  named it); issued and expiry times. Every agent process and the controller's DHT peer refuse
  any request from a peer not on the newest one (agents/admission.py).
- duty (`<cluster>.duty`): the instance ids that write checkpoints.

A signed record is `{"kind", "body", "signature"}`: RSA-PSS/SHA-256 (as hivemind signs its DHT
records) over the canonical JSON of kind and body, so a record of one kind or cluster can never
pass for another. The signature travels inside the value, so it is verified on every read, on
top of hivemind's own check on store (the key's subkey carries the cluster key's owner marker).

Time: a record issued more than MAX_CLOCK_SKEW_SECONDS in the future is refused, and so is one read
after it expired; the newest admission (by `issued`) wins. Pure functions only: the caller gives
the clock.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

MAX_CLOCK_SKEW_SECONDS = 5.0  # how far a record's time may lie ahead of the reader's clock
MAX_PEERS = 10_000  # an admission listing more is refused unread (it did not come from our controller)
_OWNER = re.compile(rb"\[owner:(.+?)\]")  # hivemind's RSASignatureValidator marker in a key or subkey


def admission_key(cluster: str) -> str:
    return f"{cluster}.admitted"


@dataclass(frozen=True)
class Admission:
    """Who may talk to the cluster's peers, as the controller signed it."""

    cluster: str
    controller: str  # the controller's own DHT peer id
    peers: Mapping[str, str] = field(default_factory=dict)  # peer id -> instance id ("" before the provider named it)
    issued: float = 0.0
    expires: float = 0.0

    def admits(self, peer_id: str) -> bool:
        return peer_id == self.controller or peer_id in self.peers

    def body(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "controller": self.controller, "peers": dict(sorted(self.peers.items())),
                "issued": self.issued, "expires": self.expires}

    def replaces(self, current: Admission | None, now: float) -> bool:
        """Whether this record is news over `current`: newer, and not a stale one replayed."""
        return (current is None or self.issued > current.issued) and now <= self.expires + MAX_CLOCK_SKEW_SECONDS


@dataclass(frozen=True)
class Duty:
    cluster: str
    holders: tuple[str, ...]
    issued: float
    expires: float


# -- signing (the controller) -----------------------------------------------------------------
def _signed_bytes(kind: str, body: Mapping[str, Any]) -> bytes:
    return json.dumps({"kind": kind, "body": body}, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def sign_record(kind: str, body: Mapping[str, Any], private_key: Any) -> dict[str, Any]:
    """`private_key`: a `cryptography` RSA private key (the cluster key)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = private_key.sign(_signed_bytes(kind, body), _pss(padding, hashes), hashes.SHA256())
    return {"kind": kind, "body": dict(body), "signature": base64.b64encode(signature).decode()}


def admission_record(admission: Admission, private_key: Any) -> dict[str, Any]:
    return sign_record("admission", admission.body(), private_key)


def duty_record(duty: Duty, private_key: Any) -> dict[str, Any]:
    body = {"cluster": duty.cluster, "holders": list(duty.holders), "issued": duty.issued, "expires": duty.expires}
    return sign_record("duty", body, private_key)


# -- verifying (everyone) -----------------------------------------------------------------------
def verified_body(data: object, kind: str, public_key: str) -> dict[str, Any] | None:
    """The record's body when `data` is a record of `kind` signed by `public_key` (OpenSSH text); else None."""
    if not isinstance(data, dict) or data.get("kind") != kind or set(data) != {"kind", "body", "signature"}:
        return None
    body, signature = data["body"], data["signature"]
    if not isinstance(body, dict) or not isinstance(signature, str):
        return None
    try:
        _verify(_public_key(public_key), _signed_bytes(kind, body), base64.b64decode(signature, validate=True))
    except Exception:  # a bad key, encoding or signature: not ours
        return None
    return body


def parse_admission(data: object, public_key: str, cluster: str, now: float) -> Admission | None:
    """The admission `data` holds when the cluster key signed it for `cluster` and it is not from the future."""
    body = verified_body(data, "admission", public_key)
    if body is None or body.get("cluster") != cluster:
        return None
    peers, controller = body.get("peers"), body.get("controller")
    issued, expires = _time(body.get("issued")), _time(body.get("expires"))
    if (not isinstance(peers, dict) or len(peers) > MAX_PEERS or not isinstance(controller, str)
            or issued is None or expires is None or issued > now + MAX_CLOCK_SKEW_SECONDS):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in peers.items()):
        return None
    return Admission(cluster, controller, dict(peers), issued, expires)


def parse_duty(data: object, public_key: str, cluster: str, now: float) -> Duty | None:
    """The duty `data` holds when the cluster key signed it for `cluster`, it is not from the future and
    has not expired."""
    body = verified_body(data, "duty", public_key)
    if body is None or body.get("cluster") != cluster:
        return None
    holders = body.get("holders")
    issued, expires = _time(body.get("issued")), _time(body.get("expires"))
    if (not isinstance(holders, list) or not all(isinstance(h, str) for h in holders) or issued is None
            or expires is None or issued > now + MAX_CLOCK_SKEW_SECONDS or now > expires):
        return None
    return Duty(cluster, tuple(holders), issued, expires)


def newest_duty(found: Any, public_key: str, cluster: str, now: float) -> Duty | None:
    """The newest valid duty among what `DHT.get(duty_key(cluster), latest=True)` returned (a
    dictionary of subkeys: whatever else anyone stored beside the controller's is ignored)."""
    entries = getattr(found, "value", None)
    if not isinstance(entries, dict):
        return None
    duties = [parse_duty(getattr(entry, "value", None), public_key, cluster, now) for entry in entries.values()]
    return max((d for d in duties if d is not None), key=lambda d: d.issued, default=None)


# -- keys and peer ids ------------------------------------------------------------------------------
def owner_public_key(key_or_subkey: object) -> bytes | None:
    """The RSA public key (OpenSSH bytes) in a DHT key or subkey's `[owner:...]` marker, if exactly one."""
    if not isinstance(key_or_subkey, bytes):
        return None
    owners = set(_OWNER.findall(key_or_subkey))
    return owners.pop() if len(owners) == 1 else None


def owner_marker(public_key: str) -> bytes:
    """The subkey under which hivemind's validator accepts only writes signed by `public_key`."""
    return b"[owner:" + public_key.encode() + b"]"


@lru_cache(maxsize=4096)
def peer_id_of_public_key(public_key: bytes) -> str | None:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form; None when it is not one."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = serialization.load_ssh_public_key(public_key)
        if not isinstance(key, rsa.RSAPublicKey):
            return None
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError):
        return None
    return _peer_id_of_der(der)


def peer_id_of_identity(identity: bytes) -> str:
    """The peer id of a libp2p identity (hivemind's identity file: a protobuf PrivateKey with RSA DER)."""
    from hivemind.p2p import PeerID

    return str(PeerID.from_identity(identity).to_base58())


def identity_private_der(identity: bytes) -> bytes:
    """The RSA private key (DER) inside a libp2p identity."""
    from hivemind.proto import crypto_pb2

    return bytes(crypto_pb2.PrivateKey.FromString(identity).data)


def hivemind_private_key(der: bytes) -> Any:
    """hivemind's RSAPrivateKey holding the RSA key `der` (its constructor only generates new ones)."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


def _peer_id_of_der(der: bytes) -> str:
    import hashlib

    import base58
    import multihash  # type: ignore[import-untyped]
    from hivemind.proto import crypto_pb2

    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return str(base58.b58encode(digest).decode())


@lru_cache(maxsize=64)
def _public_key(text: str) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_ssh_public_key(text.encode())


def _verify(key: Any, data: bytes, signature: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key.verify(signature, data, _pss(padding, hashes), hashes.SHA256())


def _pss(padding: Any, hashes: Any) -> Any:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


def _time(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
