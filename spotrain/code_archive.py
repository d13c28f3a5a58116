"""The task's code as one deterministic archive, for the VMs (spotrain/shipping.py ships it).

The same folder gives the same bytes (sorted entries, no times, owners or permissions but the
executable bit, gzip without a timestamp), so its SHA-256 names it and an unchanged folder is
never uploaded twice. Left out by default, at any depth (`EXCLUDED`): version control, virtual
environments, caches, and files that commonly hold secrets (.env*, keys, cloud and SSH
credentials). A symlink that stays inside the folder is stored as the file or folder it points to;
one that leads out of it is left out (with a note), as are sockets and devices. The whole is
bounded (`MAX_BYTES` before compression): a code_dir that is really a home folder fails with one
line naming its largest files, instead of uploading gigabytes.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spotrain.errors import SpotrainError

EXCLUDED = (
    ".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache",
    ".ruff_cache", ".ipynb_checkpoints", "node_modules", ".DS_Store", ".spotrain",
    ".env", ".env.*", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "id_ecdsa*", ".ssh", ".aws", ".gnupg",
    ".netrc", ".pypirc", ".git-credentials", "credentials.json", "*.p12", "*.pfx",
)
MAX_BYTES = 100 * 1024 * 1024


class CodeArchiveError(SpotrainError):
    """A code_dir that cannot be shipped: one line."""


@dataclass(frozen=True)
class CodeArchive:
    data: bytes
    files: int
    skipped: tuple[str, ...]  # relative paths left out because they lead outside the folder


def excluded(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXCLUDED)


def _entries(root: Path, skip: Callable[[str], None]) -> list[tuple[str, Path]]:
    """(archive name, real path) of every file and folder to ship, sorted; links resolved inside."""
    found: list[tuple[str, Path]] = []
    real_root = root.resolve()

    def walk(folder: Path, prefix: str, seen: frozenset[Path]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = f"{prefix}{entry.name}"
            if excluded(entry.name):
                continue
            real = Path(entry.path).resolve()
            if real != real_root and real_root not in real.parents:
                skip(name)
                continue
            if real.is_dir():
                if real in seen:  # a link back up the tree
                    skip(name)
                    continue
                found.append((name, real))
                walk(real, f"{name}/", seen | {real})
            elif real.is_file():
                found.append((name, real))
            else:
                skip(name)

    walk(real_root, "", frozenset({real_root}))
    return found


def archive_code(code_dir: Path, max_bytes: int = MAX_BYTES) -> CodeArchive:
    """The deterministic tar.gz of `code_dir` (see the module's docstring); CodeArchiveError when it
    is not a folder or holds more than `max_bytes`."""
    if not code_dir.is_dir():
        raise CodeArchiveError(f"training.code_dir {code_dir}: not a folder")
    skipped: list[str] = []
    entries = _entries(code_dir, skipped.append)
    sizes = {name: path.stat().st_size for name, path in entries if path.is_file()}
    if sum(sizes.values()) > max_bytes:
        largest = ", ".join(f"{name} ({size:,} bytes)"
                            for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[:3])
        raise CodeArchiveError(f"training.code_dir {code_dir}: {sum(sizes.values()):,} bytes to ship, over the "
                               f"limit of {max_bytes:,}; largest: {largest}")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            data = path.read_bytes()
            info.size, info.mode = len(data), 0o755 if os.access(path, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return CodeArchive(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0), len(sizes), tuple(skipped))
