"""Checkpoint stores: atomic writes, and the newest checkpoint that verifies.

A checkpoint is `ckpt-<epoch>.pt` (model, optimizer, epoch) beside `ckpt-<epoch>.json` holding
its SHA-256. Both are written to temporary names and renamed, the manifest last, so a crash
mid-write leaves either a whole checkpoint or none; a file that fails its hash is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LocalDirStore:
    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def from_url(cls, url: str) -> LocalDirStore:
        if url.startswith("file://"):
            return cls(Path(url[len("file://"):]))
        if "://" in url:
            raise ValueError(f"unsupported checkpoint store {url!r}: only local directories so far")
        return cls(Path(url))

    def save(self, epoch: int, state: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(dict(state, epoch=epoch), buffer)
        data = buffer.getvalue()
        path = self.root / f"ckpt-{epoch:08d}.pt"
        _fsync_write(path, data)
        manifest = {"epoch": epoch, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        _fsync_write(path.with_suffix(".json"), json.dumps(manifest).encode())
        return path

    def epochs(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name))), reverse=True)

    def load_newest(self) -> dict | None:
        """The newest checkpoint whose bytes match its manifest, or None."""
        for epoch in self.epochs():
            path = self.root / f"ckpt-{epoch:08d}.pt"
            try:
                manifest = json.loads(path.with_suffix(".json").read_text())
                data = path.read_bytes()
            except (OSError, json.JSONDecodeError):
                continue
            if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
                continue
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        return None

    def prune(self, keep: int) -> None:
        for epoch in self.epochs()[keep:]:
            for suffix in (".json", ".pt"):
                (self.root / f"ckpt-{epoch:08d}{suffix}").unlink(missing_ok=True)
