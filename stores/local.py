"""A checkpoint store in a local directory (a disk that outlives the VM, or a shared mount).

Every object is written to a temporary name, fsynced and renamed, and the directory is fsynced
after the rename, so a crash leaves the old object or the new one, and the manifest, written
last, never reaches the disk before the files it lists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from spotrain.stores.base import MissingObject, StoreUnavailable, StoreURLError
from spotrain.stores.blob_store import BlobStore, FetchURL


class LocalDirStore(BlobStore):
    scheme: ClassVar[str] = "file"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = f"file://{self.root}"

    @classmethod
    def from_url(cls, url: str) -> LocalDirStore:
        path = url.removeprefix("file://")
        if not path or "?" in path or "#" in path:
            raise StoreURLError(f"checkpoint store {url!r}: a file:// URL is a path, with no options")
        return cls(Path(path))

    def _put(self, key: str, data: bytes) -> None:
        path = self.root / key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_directory(path.parent)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreUnavailable(f"{self.url}: cannot write {key}: {error}") from None

    def _get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{self.url}/{key}: no such file") from None
        except OSError as error:
            raise StoreUnavailable(f"{self.url}: cannot read {key}: {error}") from None

    def _list(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        try:
            for entry in self._entries(self.root):
                if entry.is_dir():  # a checkpoint's files sit one level down
                    sizes.update((f"{entry.name}/{inner.name}", inner.stat().st_size)
                                 for inner in self._entries(entry) if inner.is_file())
                elif entry.is_file():
                    sizes[entry.name] = entry.stat().st_size
        except FileNotFoundError:  # deleted between the listing and the stat: gone
            pass
        except OSError as error:
            raise StoreUnavailable(f"{self.url}: cannot list: {error}") from None
        return sizes

    def _size(self, key: str) -> int | None:
        try:
            return (self.root / key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreUnavailable(f"{self.url}: cannot stat {key}: {error}") from None

    def _fetch_url(self, key: str, expires_seconds: int) -> FetchURL:
        # a directory serves VMs that share this machine's disk (the local clouds): no expiry to keep
        return FetchURL((self.root / key).resolve().as_uri())

    @staticmethod
    def _entries(directory: Path) -> list[Path]:
        return list(directory.iterdir()) if directory.is_dir() else []

    def _delete(self, keys: Iterable[str]) -> None:
        parents = set()
        try:
            for key in keys:
                (self.root / key).unlink(missing_ok=True)
                if "/" in key:
                    parents.add(self.root / key.split("/", 1)[0])
        except OSError as error:
            raise StoreUnavailable(f"{self.url}: cannot delete: {error}") from None
        for parent in parents:
            with contextlib.suppress(OSError):  # not empty: a file we were not asked to delete
                parent.rmdir()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
