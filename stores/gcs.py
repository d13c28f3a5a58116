"""A checkpoint store in a Google Cloud Storage bucket.

`gs://bucket/prefix?endpoint=URL&project=NAME`. Without `endpoint`, the client honours
`STORAGE_EMULATOR_HOST` (an emulator, reached without credentials); otherwise it authenticates
with Application Default Credentials (on a VM, its service account), at `endpoint` too.
google-cloud-storage is imported when a store is opened: `pip install 'spotrain[gcp]'`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar
from urllib.parse import quote

from spotrain.stores.base import MissingObject, StoreUnavailable
from spotrain.stores.blob_store import BlobStore, FetchURL
from spotrain.stores.urls import join_key, parse_bucket_url

_TIMEOUT = (10, 120)  # connect, read (seconds)
_RETRY_SECONDS = 120.0
_API_ROOT = "https://storage.googleapis.com"


class GcsStore(BlobStore):
    scheme: ClassVar[str] = "gs"
    options: ClassVar[frozenset[str]] = frozenset({"endpoint", "project"})

    def __init__(self, bucket: str, prefix: str = "", *,
                 endpoint: str | None = None, project: str | None = None):
        try:
            from google.api_core.retry import Retry
            from google.cloud import storage  # type: ignore[attr-defined]  # untyped; namespace package
            from google.cloud.storage.retry import DEFAULT_RETRY
        except ImportError:
            raise StoreUnavailable("gs:// checkpoint stores need google-cloud-storage: "
                                   "pip install 'spotrain[gcp]'") from None
        self.prefix = prefix.strip("/")
        self.bucket_name = bucket
        self.endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or _API_ROOT
        self.url = f"gs://{bucket}/{self.prefix}".rstrip("/")
        with _GcsErrors(self.url, "(client)"):
            options = {"api_endpoint": endpoint} if endpoint else None
            client = storage.Client(project=project, client_options=options)
        self.bucket: Any = client.bucket(bucket)
        # a checkpoint's objects are rewritten whole with the same bytes, so uploads are safe to retry
        self.retry: Retry = DEFAULT_RETRY.with_timeout(_RETRY_SECONDS)

    @classmethod
    def from_url(cls, url: str) -> GcsStore:
        parsed = parse_bucket_url(url, cls.scheme, cls.options)
        return cls(parsed.bucket, parsed.prefix, endpoint=parsed.options.get("endpoint"),
                   project=parsed.options.get("project"))

    def _put(self, key: str, data: bytes) -> None:
        with _GcsErrors(self.url, key):
            self.bucket.blob(join_key(self.prefix, key)).upload_from_string(
                data, content_type="application/octet-stream", timeout=_TIMEOUT, retry=self.retry)

    def _get(self, key: str) -> bytes:
        with _GcsErrors(self.url, key, missing_object=True):
            return bytes(self.bucket.blob(join_key(self.prefix, key)).download_as_bytes(timeout=_TIMEOUT,
                                                                                       retry=self.retry))

    def _list(self) -> dict[str, int]:
        root = join_key(self.prefix, "")
        with _GcsErrors(self.url, "(list)"):
            return {blob.name[len(root):]: int(blob.size)
                    for blob in self.bucket.list_blobs(prefix=root, timeout=_TIMEOUT, retry=self.retry)}

    def _size(self, key: str) -> int | None:
        with _GcsErrors(self.url, key):
            blob = self.bucket.get_blob(join_key(self.prefix, key), timeout=_TIMEOUT, retry=self.retry)
        return None if blob is None else int(blob.size)

    def _fetch_url(self, key: str, expires_seconds: int) -> FetchURL:
        # the JSON API's media download, read with the VM's own service account (a token from the
        # GCE metadata server): signing a URL here would need a service-account key or signBlob
        name = quote(join_key(self.prefix, key), safe="")
        return FetchURL(f"{self.endpoint.rstrip('/')}/storage/v1/b/{self.bucket_name}/o/{name}?alt=media",
                        auth="gce-metadata")

    def _delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                with _GcsErrors(self.url, key, missing_object=True):
                    self.bucket.blob(join_key(self.prefix, key)).delete(timeout=_TIMEOUT, retry=self.retry)
            except MissingObject:
                pass


class _GcsErrors:
    """Turns the client's errors into the store's: NotFound for an object is MissingObject, the
    rest (network, credentials, a missing bucket, errors past the retries) StoreUnavailable."""

    def __init__(self, url: str, key: str, missing_object: bool = False):
        self.url, self.key, self.missing_object = url, key, missing_object

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        # never swallows: it raises the store's error in place of the SDK's, or lets others through
        from google.api_core.exceptions import GoogleAPIError, NotFound
        from google.auth.exceptions import GoogleAuthError
        from requests.exceptions import RequestException

        if isinstance(error, NotFound) and self.missing_object:
            raise MissingObject(f"{self.url}/{self.key}: no such object") from None
        if isinstance(error, (GoogleAPIError, GoogleAuthError, RequestException)):
            raise StoreUnavailable(f"{self.url}: {self.key}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
