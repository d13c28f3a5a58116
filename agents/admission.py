"""The admission gate: every request a peer of ours receives from a peer not admitted is refused,
and so is every call it would make to one.

libp2p authenticates the remote peer id of every connection (its key signs the handshake), and
hivemind hands each request handler that id (`P2PContext.remote_id`, a stream's
`StreamInfo.peer_id`). `install` wraps hivemind's two registration points,
`P2P._add_protobuf_unary_handler` and `P2P.add_binary_stream_handler` (protobuf stream handlers
go through the latter), so that every handler registered afterwards in this process, and in the
processes it forks (the DHT's, the averagers'), first asks the gate. That covers DHT requests
(ping, store, find), averaging (join group, aggregate part), state downloads, the progress
tracker, and swarm mode's stage requests alike.

Outgoing calls are gated too, at the two points every one of them passes
(`P2P._call_unary_protobuf_handler`, `P2P.call_binary_stream_handler`: protobuf streams open a
binary stream): a call to a peer the admission does not list fails before a connection is used,
so nothing such a peer would answer is ever read. A stranger's (or a revoked peer's) id can reach
an agent through the DHT (a routing table filled before a revocation, a find response listing
neighbours, an averager or stage record naming it); the DHT lookup, the averaging group join, the
all-reduce part, the state download and the stage call that would follow all fail as if the peer
were unreachable, and hivemind drops it (the DHT from its routing table, matchmaking from its group).

Every process has its own gate reading one file: the newest signed admission record
(spotrain.contracts.admission), 0600 in the agent's working folder (the controller's: its
cluster folder). The agent's main process (and the controller) writes it; each gate rereads it
when it changes and verifies the cluster key's signature itself, so a file that was tampered with
admits nobody new. A gate keeps admitting the peers of the newest valid record after it expires
(a controller away for a while must not stop the swarm); a revocation is a newer record.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrain.agents.swarm_join import IDENTITY_FILE
from spotrain.contracts.admission import Admission, admission_key, parse_admission
from spotrain.contracts.agent_config import AgentConfig

if TYPE_CHECKING:
    from hivemind import DHT

    from spotrain.stores import ManifestSigner, Trust

ADMISSION_FILE = "admitted.json"
REFUSAL_LOG_SECONDS = 60.0  # one line per refused peer per minute


class Gate:
    def __init__(self, record_path: Path, cluster: str, cluster_key: str, own_peer_id: str,
                 log: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.record_path = record_path
        self.cluster = cluster
        self.cluster_key = cluster_key
        self.own_peer_id = own_peer_id
        self.log = log
        self.admission: Admission | None = None
        self.record: dict[str, Any] | None = None  # the signed record `admission` was read from
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read
        self._refused: dict[str, float] = {}

    def admits(self, peer_id: str) -> bool:
        self._reload()
        return peer_id == self.own_peer_id or (self.admission is not None and self.admission.admits(peer_id))

    def accept(self, record: object, from_user_data: bool = False) -> Admission | None:
        """Keep `record` when it is a valid admission newer than ours (written for every process's gate).
        The user-data's record counts even when expired: a VM may boot for minutes, and its user-data
        came from the controller itself; expiry only keeps a replayed DHT record out."""
        now = time.time()
        self._reload()
        admission = parse_admission(record, self.cluster_key, self.cluster, now)
        newer = admission is not None and (self.admission is None or admission.issued > self.admission.issued)
        if (admission is None or not isinstance(record, dict)
                or not (newer if from_user_data else admission.replaces(self.admission, now))):
            return None
        write_private(self.record_path, json.dumps(record).encode())
        self.admission, self.record = admission, record
        return admission

    def refresh(self, dht: DHT) -> None:
        """Take the newest admission the controller stored in the DHT (anything else there is ignored)."""
        found = dht.get(admission_key(self.cluster), latest=True)
        entries = getattr(found, "value", None)
        for entry in (entries.values() if isinstance(entries, dict) else ()):
            self.accept(getattr(entry, "value", None))

    def peers(self) -> Mapping[str, str]:
        """peer id -> instance id of the newest admission (the controller's peer maps to "")."""
        self._reload()
        if self.admission is None:
            return {}
        return {**self.admission.peers, self.admission.controller: ""}

    def refuse(self, peer_id: str, what: str, outgoing: bool = False) -> None:
        now = time.monotonic()
        if now - self._refused.get(peer_id, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            self._refused[peer_id] = now
            if outgoing:
                self.log(f"not calling {what} at {peer_id}: not admitted to {self.cluster}")
            else:
                self.log(f"refused {what} from {peer_id}: not admitted to {self.cluster}")

    def _reload(self) -> None:
        try:
            stat = self.record_path.stat()
        except OSError:
            return
        if self._seen == (stat.st_mtime_ns, stat.st_size):
            return
        self._seen = (stat.st_mtime_ns, stat.st_size)
        try:
            record = json.loads(self.record_path.read_bytes())
        except (OSError, ValueError):
            return
        admission = parse_admission(record, self.cluster_key, self.cluster, time.time())
        if admission is not None and (self.admission is None or admission.issued >= self.admission.issued):
            self.admission, self.record = admission, record


def checkpoint_keys(gate: Gate | None, work: Path) -> tuple[Trust, ManifestSigner | None]:
    """Which checkpoint manifests this agent believes, and how it seals its own (spotrain.stores.seal):
    those signed by a peer the cluster admitted, sealed with this VM's identity and its newest
    admission record. Without admission (a hand-made config) it has no cluster key to check a seal
    with: it believes every manifest and writes unsigned ones, as it admits every peer."""
    from spotrain.stores.seal import ANY_WRITER, AdmittedWriters, ManifestSigner

    if gate is None:
        return ANY_WRITER, None
    signer = ManifestSigner.from_identity((work / IDENTITY_FILE).read_bytes(), lambda: gate.record)
    return AdmittedWriters(gate.cluster, gate.cluster_key), signer


class AdmissionError(ValueError):
    """The user-data's admission cannot be used: one line, no secret in it."""


def admit_self(config: AgentConfig, work: Path, log: Callable[[str], None]) -> Gate | None:
    """Before anything of hivemind starts: take this VM's identity, and gate every request from now on
    by the admission the user-data carries (then the DHT's). None when the user-data has no admission
    (a hand-made config): this agent then admits every peer and trusts no duty record."""
    settings = config.admission
    if settings is None:
        log("no admission in the user-data: this agent admits every peer and holds no checkpoint duty")
        return None
    try:
        identity = base64.b64decode(settings.identity.get_secret_value(), validate=True)
        peer_id = use_identity(identity, work / IDENTITY_FILE)
    except Exception:  # never say more: the message could carry the identity's bytes
        raise AdmissionError("user-data: admission.identity: not a libp2p identity") from None
    gate = Gate(work / ADMISSION_FILE, config.cluster, settings.cluster_key, peer_id, log)
    gate.accept(settings.record, from_user_data=True)
    if gate.admission is None:
        raise AdmissionError("user-data: admission.record: not signed by admission.cluster_key for this cluster")
    if not gate.admission.admits(peer_id):
        log(f"warning: the admission record does not list this agent's peer {peer_id}")
    install(gate)
    return gate


_gate: Gate | None = None  # this process's gate (inherited by the processes it forks)
_installed = False


def install(gate: Gate | None) -> None:
    """Gate every handler hivemind registers from now on in this process and its children
    (None: admit everyone again, for a process that hosts several clusters' peers in turn: tests)."""
    global _gate, _installed
    _gate = gate
    if not _installed:
        _wrap_hivemind()
        _installed = True


def current() -> Gate | None:
    return _gate


def _admitted(remote_id: Any, what: str, outgoing: bool = False) -> bool:
    gate = _gate
    if gate is None:
        return True
    peer_id = remote_id.to_base58()
    if gate.admits(peer_id):
        return True
    gate.refuse(peer_id, what, outgoing)
    return False


class NotAdmitted(PermissionError):
    """A call to a peer the admission does not list: never made (hivemind counts it as a failed peer)."""


def _wrap_hivemind() -> None:
    from hivemind.p2p import P2P

    register_unary = P2P._add_protobuf_unary_handler
    register_stream = P2P.add_binary_stream_handler

    async def gated_unary(self: Any, handle_name: str, handler: Any, input_protobuf_type: Any,
                          balanced: bool = False) -> None:
        async def checked(request: Any, context: Any) -> Any:
            if not _admitted(context.remote_id, handle_name):
                raise PermissionError(f"peer {context.remote_id} is not admitted")  # the caller gets the error
            return await handler(request, context)

        await register_unary(self, handle_name, checked, input_protobuf_type, balanced=balanced)

    async def gated_stream(self: Any, name: str, handler: Any, balanced: bool = False) -> None:
        async def checked(stream_info: Any, reader: Any, writer: Any) -> None:
            if not _admitted(stream_info.peer_id, name):
                writer.close()  # nothing read, nothing answered
                return
            await handler(stream_info, reader, writer)

        await register_stream(self, name, checked, balanced=balanced)

    P2P._add_protobuf_unary_handler = gated_unary
    P2P.add_binary_stream_handler = gated_stream
    _gate_outgoing(P2P)


def _gate_outgoing(p2p_class: Any) -> None:
    """Every call this process makes goes to an admitted peer, or nowhere: nothing is read from others."""
    call_unary = p2p_class._call_unary_protobuf_handler
    open_stream = p2p_class.call_binary_stream_handler

    async def gated_call_unary(self: Any, peer_id: Any, handle_name: str, input: Any, output_protobuf_type: Any) -> Any:
        if not _admitted(peer_id, handle_name, outgoing=True):
            raise NotAdmitted(f"peer {peer_id} is not admitted: {handle_name} not called")
        return await call_unary(self, peer_id, handle_name, input, output_protobuf_type)

    async def gated_open_stream(self: Any, peer_id: Any, handler_name: str) -> Any:
        if not _admitted(peer_id, handler_name, outgoing=True):
            raise NotAdmitted(f"peer {peer_id} is not admitted: {handler_name} not called")
        return await open_stream(self, peer_id, handler_name)

    p2p_class._call_unary_protobuf_handler = gated_call_unary
    p2p_class.call_binary_stream_handler = gated_open_stream


def use_identity(identity: bytes, identity_path: Path) -> str:
    """Make `identity` this agent's libp2p identity (the file p2pd reads, 0600) and hivemind's
    process-wide RSA key, so the records hivemind and this agent sign (status, progress) are signed by
    the key whose peer id the admission lists. Returns the peer id."""
    from hivemind.utils.crypto import RSAPrivateKey

    from spotrain.contracts.admission import hivemind_private_key, identity_private_der, peer_id_of_identity

    write_private(identity_path, identity)
    with RSAPrivateKey._process_wide_key_lock:
        RSAPrivateKey._process_wide_key = hivemind_private_key(identity_private_der(identity))
    return peer_id_of_identity(identity)


def write_private(path: Path, data: bytes) -> None:
    """Atomically, readable by the owner alone from its first byte."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
