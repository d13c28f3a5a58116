"""A checkpoint store in an S3 bucket (or anything that speaks S3: moto, MinIO, R2).

`s3://bucket/prefix?endpoint=URL&region=NAME`. Without `endpoint`, boto3 reads
`AWS_ENDPOINT_URL` and its usual configuration; credentials come from its usual chain (on a VM,
the instance role). boto3 is imported when a store is opened: `pip install 'spotrain[aws]'`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from spotrain.stores.base import MissingObject, StoreUnavailable
from spotrain.stores.blob_store import BlobStore, FetchURL
from spotrain.stores.urls import join_key, parse_bucket_url

_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 120}
_DELETE_BATCH = 1000  # DeleteObjects' limit


class S3Store(BlobStore):
    scheme: ClassVar[str] = "s3"
    options: ClassVar[frozenset[str]] = frozenset({"endpoint", "region"})

    def __init__(self, bucket: str, prefix: str = "", *,
                 endpoint: str | None = None, region: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreUnavailable("s3:// checkpoint stores need boto3: "
                                   "pip install 'spotrain[aws]'") from None
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # SigV4 for presigned URLs too (boto3 would presign SigV2, which newer regions refuse)
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, signature_version="s3v4", **_TIMEOUTS)
        self.client: Any = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        parsed = parse_bucket_url(url, cls.scheme, cls.options)
        return cls(parsed.bucket, parsed.prefix, endpoint=parsed.options.get("endpoint"),
                   region=parsed.options.get("region"))

    def _put(self, key: str, data: bytes) -> None:
        with _S3Errors(self.url, key):
            self.client.put_object(Bucket=self.bucket, Key=join_key(self.prefix, key), Body=data)

    def _get(self, key: str) -> bytes:
        with _S3Errors(self.url, key):
            reply = self.client.get_object(Bucket=self.bucket, Key=join_key(self.prefix, key))
            return bytes(reply["Body"].read())

    def _list(self) -> dict[str, int]:
        root = join_key(self.prefix, "")
        sizes: dict[str, int] = {}
        with _S3Errors(self.url, "(list)"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root)
            for item in (item for page in pages for item in page.get("Contents", ())):
                sizes[item["Key"][len(root):]] = int(item["Size"])
        return sizes

    def _size(self, key: str) -> int | None:
        try:
            with _S3Errors(self.url, key):
                reply = self.client.head_object(Bucket=self.bucket, Key=join_key(self.prefix, key))
        except MissingObject:
            return None
        return int(reply["ContentLength"])

    def _fetch_url(self, key: str, expires_seconds: int) -> FetchURL:
        # signed here with the controller's credentials, so a VM needs no SDK and no read permission:
        # the URL lets its holder GET this one object until it expires (sooner if the signing
        # credentials are temporary and expire first)
        with _S3Errors(self.url, key):
            return FetchURL(self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": join_key(self.prefix, key)},
                ExpiresIn=expires_seconds))

    def _delete(self, keys: Iterable[str]) -> None:
        objects = [{"Key": join_key(self.prefix, key)} for key in keys]
        for start in range(0, len(objects), _DELETE_BATCH):
            with _S3Errors(self.url, "(delete)"):
                reply = self.client.delete_objects(Bucket=self.bucket,
                                                   Delete={"Objects": objects[start:start + _DELETE_BATCH],
                                                           "Quiet": True})
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise StoreUnavailable(f"{self.url}: cannot delete {first.get('Key')}: {first.get('Code')}")


class _S3Errors:
    """Turns botocore's errors into the store's: a missing key is MissingObject, the rest
    (network, credentials, a missing bucket, throttling past the retries) StoreUnavailable."""

    def __init__(self, url: str, key: str):
        self.url, self.key = url, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        # never swallows: it raises the store's error in place of the SDK's, or lets others through
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MissingObject(f"{self.url}/{self.key}: no such object") from None
            raise StoreUnavailable(f"{self.url}: {self.key}: {code or error}") from None
        if isinstance(error, BotoCoreError):
            raise StoreUnavailable(f"{self.url}: {self.key}: {error}") from None
