"""Durable checkpoint stores (installed as `spotrain.stores`): a local directory, S3 and GCS,
several of them replicated, and a writer that uploads in the background.

Agents write the stores (sealing each manifest with their admitted identity) and the controller
lists and audits them (believing only sealed manifests), so this wing imports nothing
of the control plane but `spotrain.contracts`.
"""

from spotrain.stores.base import (
    CheckpointStore,
    CorruptCheckpoint,
    Manifest,
    MissingObject,
    NonFiniteState,
    Sealer,
    StoreError,
    StoreUnavailable,
    StoreURLError,
    Trust,
    UnsafePayload,
)
from spotrain.stores.open import check_store_url, open_store
from spotrain.stores.payload import Constants, decode_state, encode_state, named_constants, no_constants
from spotrain.stores.replicated import LoadedCheckpoint, ReplicaAudit, ReplicatedStore
from spotrain.stores.seal import ANY_WRITER, AdmittedWriters, AnyWriter, ManifestSigner
from spotrain.stores.writer import CheckpointWriter

__all__ = [
    "ANY_WRITER", "AdmittedWriters", "AnyWriter", "ManifestSigner", "Sealer", "Trust",
    "CheckpointStore", "CheckpointWriter", "Constants", "CorruptCheckpoint", "LoadedCheckpoint", "Manifest",
    "MissingObject", "NonFiniteState", "ReplicaAudit", "ReplicatedStore", "StoreError", "StoreURLError",
    "StoreUnavailable", "UnsafePayload", "check_store_url", "decode_state", "encode_state", "named_constants",
    "no_constants", "open_store",
]
