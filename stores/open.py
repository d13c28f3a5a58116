"""`open_store(url)`: the store a URL names, one class per scheme."""

from __future__ import annotations

from pathlib import Path

from spotrain.stores.base import CheckpointStore, StoreURLError
from spotrain.stores.gcs import GcsStore
from spotrain.stores.local import LocalDirStore
from spotrain.stores.s3 import S3Store

SCHEMES = {store.scheme: store for store in (LocalDirStore, S3Store, GcsStore)}


def open_store(url: str) -> CheckpointStore:
    """A directory (a path or file://PATH), s3://BUCKET/PREFIX or gs://BUCKET/PREFIX."""
    scheme, separator, _ = url.partition("://")
    if not separator:
        return LocalDirStore(Path(url))
    store = SCHEMES.get(scheme)
    if store is None:
        raise StoreURLError(f"checkpoint store {url!r}: unknown scheme {scheme!r} "
                            f"(known: a path, {', '.join(f'{name}://' for name in SCHEMES)})")
    return store.from_url(url)
