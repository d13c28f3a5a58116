"""`open_store(url)`: the store a URL names, one class per scheme; `check_store_url(url)` reads
the same URL without opening anything, for a spec checked where the store is not reachable."""

from __future__ import annotations

from pathlib import Path

from spotrain.stores.base import CheckpointStore, StoreURLError
from spotrain.stores.gcs import GcsStore
from spotrain.stores.local import LocalDirStore
from spotrain.stores.s3 import S3Store
from spotrain.stores.urls import parse_bucket_url

SCHEMES = {store.scheme: store for store in (LocalDirStore, S3Store, GcsStore)}
BUCKETS = {store.scheme: store.options for store in (S3Store, GcsStore)}


def open_store(url: str) -> CheckpointStore:
    """A directory (a path or file://PATH), s3://BUCKET/PREFIX or gs://BUCKET/PREFIX."""
    scheme = check_store_url(url)
    return LocalDirStore(Path(url)) if scheme == "" else SCHEMES[scheme].from_url(url)


def check_store_url(url: str) -> str:
    """The URL's scheme ("" for a plain path) once it reads as `open_store` reads it, with no SDK
    imported, no client built and no directory touched; StoreURLError (one line) otherwise."""
    scheme, separator, _ = url.partition("://")
    if not separator:
        return ""
    if scheme == LocalDirStore.scheme:
        LocalDirStore.from_url(url)  # builds a path, touches nothing
    elif scheme in BUCKETS:
        parse_bucket_url(url, scheme, BUCKETS[scheme])
    else:
        raise StoreURLError(f"checkpoint store {url!r}: unknown scheme {scheme!r} "
                            f"(known: a path, {', '.join(f'{name}://' for name in SCHEMES)})")
    return scheme
