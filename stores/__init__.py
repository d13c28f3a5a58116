"""Durable checkpoint stores (installed as `spotrain.stores`): a local directory, S3 and GCS,
several of them replicated, and a writer that uploads in the background.

Agents write the stores and the controller lists and audits them, so this wing imports nothing
of the control plane but `spotrain.contracts`.
"""

from spotrain.stores.base import (
    CheckpointStore,
    CorruptCheckpoint,
    Manifest,
    MissingObject,
    NonFiniteState,
    StoreError,
    StoreUnavailable,
    StoreURLError,
    UnsafePayload,
)
from spotrain.stores.open import check_store_url, open_store
from spotrain.stores.payload import Constants, decode_state, encode_state, named_constants, no_constants
from spotrain.stores.replicated import LoadedCheckpoint, ReplicaAudit, ReplicatedStore
from spotrain.stores.writer import CheckpointWriter

__all__ = [
    "CheckpointStore", "CheckpointWriter", "Constants", "CorruptCheckpoint", "LoadedCheckpoint", "Manifest",
    "MissingObject", "NonFiniteState", "ReplicaAudit", "ReplicatedStore", "StoreError", "StoreURLError",
    "StoreUnavailable", "UnsafePayload", "check_store_url", "decode_state", "encode_state", "named_constants",
    "no_constants", "open_store",
]
