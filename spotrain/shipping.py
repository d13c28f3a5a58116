"""The controller's half of "the code reaches the VMs": ship the running build and the task's code
through the cluster's stores, and tell each VM where to fetch them (AgentConfig.code).

    ship(wheel, archive, store) -> ShippedBuild      upload (once per content) and describe
    Shipment.code_for(location) -> ShippedCode       fresh fetch URLs for one VM's user-data

Objects live under `code/<sha256>/<name>` in a store, so unchanged content is never uploaded
twice and checkpoint pruning leaves them alone. A VM fetches from the nearest store it can read
(`fetch_store`): an s3:// store through a URL the controller presigns for each launch (valid
`URL_EXPIRY_SECONDS`: no SDK and no read permission needed on the VM), a gs:// store with its own
service account's token (GCE VMs only), a directory only on this machine (the local clouds). The
VM's half is spotrain/infra/install_shipped.py: fetch, verify the SHA-256, install, unpack.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from spotrain.code_archive import CodeArchive, archive_code
from spotrain.config import ClusterSpec
from spotrain.contracts.agent_config import ShippedCode, ShippedFile
from spotrain.errors import SpotrainError
from spotrain.store_domains import StorePlacement
from spotrain.stores import StoreError, open_store
from spotrain.stores.blob_store import BlobStore

URL_EXPIRY_SECONDS = 6 * 3600  # a VM fetches at boot; a later launch gets fresh URLs
ARCHIVE_NAME = "code.tar.gz"
# which store schemes a VM of each provider can fetch from (see the module's docstring)
READABLE_FROM = {"local": ("",), "aws": ("s3",), "gcp": ("s3", "gs")}


class ShippingError(SpotrainError):
    """The build or the code cannot reach the VMs: one line."""


@dataclass(frozen=True)
class ShippedObject:
    key: str  # under the store's root: code/<sha256>/<name>
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ShippedBuild:
    store: BlobStore
    wheel: ShippedObject
    archive: ShippedObject | None

    def code(self, expires_seconds: int = URL_EXPIRY_SECONDS) -> ShippedCode:
        """The user-data's `code`: fresh fetch URLs, the digests."""
        return ShippedCode(wheel=self._file(self.wheel, expires_seconds),
                           archive=self._file(self.archive, expires_seconds) if self.archive else None)

    def _file(self, shipped: ShippedObject, expires_seconds: int) -> ShippedFile:
        where = self.store.fetch_url(shipped.key, expires_seconds)
        return ShippedFile(url=where.url, auth=where.auth, name=shipped.name, sha256=shipped.sha256,
                           size=shipped.size)


def upload(store: BlobStore, name: str, data: bytes) -> ShippedObject:
    """Put `data` under code/<sha256>/<name> unless an object of its size is already there."""
    digest = hashlib.sha256(data).hexdigest()
    shipped = ShippedObject(f"code/{digest}/{name}", name, digest, len(data))
    if store.object_size(shipped.key) != len(data):
        store.put_object(shipped.key, data)
    return shipped


def ship(wheel: Path, archive: CodeArchive | None, store: BlobStore) -> ShippedBuild:
    """Upload the wheel and the code archive to `store` (each once per content)."""
    try:
        return ShippedBuild(store, upload(store, wheel.name, wheel.read_bytes()),
                            upload(store, ARCHIVE_NAME, archive.data) if archive else None)
    except StoreError as error:
        raise ShippingError(f"cannot ship the build to {store.url}: {error}") from None


def scheme(url: str) -> str:
    return url.partition("://")[0] if "://" in url else ""


def fetch_store(placement: StorePlacement, location: str) -> str | None:
    """The nearest store a VM at `location` can fetch from, or None."""
    readable = READABLE_FROM.get(location.partition(":")[0], ())
    return next((url for url in placement.restore_order(location) if scheme(url) in readable), None)


class Shipment:
    """What the controller shipped, by store; `code_for` gives each VM's user-data its part."""

    def __init__(self, placement: StorePlacement, builds: dict[str, ShippedBuild]):
        self.placement, self.builds = placement, builds

    def code_for(self, location: str | None) -> ShippedCode | None:
        url = fetch_store(self.placement, location) if location else None
        return self.builds[url].code() if url in self.builds else None


def cloud_locations(spec: ClusterSpec) -> list[str]:
    """The locations of every enabled cloud whose VMs install the shipped build (no worker_image)."""
    aws, gcp = spec.providers.aws, spec.providers.gcp
    found = []
    if aws is not None and aws.worker_image is None:
        found += [f"aws:{name}" for name in aws.zones or aws.regions]
    if gcp is not None and gcp.worker_image is None:
        found += [f"gcp:{name}" for name in gcp.zones]
    return found


def ship_spec(spec: ClusterSpec, say: Callable[[str], None]) -> Shipment | None:
    """What `spotrain launch` ships: None when no enabled cloud needs it (the local provider's VMs
    use this machine's environment)."""
    from spotrain.wheel_build import running_wheel

    locations = cloud_locations(spec)
    if not locations:
        return None
    placement = spec.checkpoint.placement(spec.default_checkpoint_store())
    return ship_for(placement, locations, running_wheel, spec.training.code_dir, say)


def ship_for(placement: StorePlacement, locations: Sequence[str], wheel: Callable[[], Path],
             code_dir: str | None, say: Callable[[str], None]) -> Shipment:
    """Build (or reuse) the wheel, archive `code_dir`, and upload both to the store each of
    `locations` fetches from; ShippingError naming a location no store serves."""
    targets: dict[str, None] = {}
    for location in locations:
        url = fetch_store(placement, location)
        if url is None:
            provider = location.partition(":")[0]
            raise ShippingError(f"{location}: its VMs fetch spotrain's build and the task's code from the cluster's "
                                f"bucket, and no checkpoint.stores entry is one they can read "
                                f"({' or '.join(f'{s}://' for s in READABLE_FROM.get(provider, ()))}); "
                                f"add one, or set providers.{provider}.worker_image")
        targets[url] = None
    if not targets:
        return Shipment(placement, {})
    built = wheel()
    archive = archive_code(Path(code_dir)) if code_dir else None
    for skipped in archive.skipped if archive else ():
        say(f"code_dir: {skipped} leads outside the folder and is not shipped")
    builds = {}
    for url in targets:
        try:
            store = open_store(url)
        except StoreError as error:
            raise ShippingError(f"cannot ship the build to {url}: {error}") from None
        if not isinstance(store, BlobStore):
            raise ShippingError(f"{url}: this store cannot hold the shipped build")
        builds[url] = ship(built, archive, store)
        say(f"shipped {built.name} and {archive.files if archive else 0} code file(s) to {url}/code/")
    return Shipment(placement, builds)
