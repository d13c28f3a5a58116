"""A wheel of the spotrain that is running now, for the VMs (spotrain/shipping.py ships it).

Two cases, told apart by where `spotrain` was imported from:
- a source tree (a checkout, an editable install): its package folders, pyproject.toml and
  README.md are hashed, and the wheel is built once per hash (`pip wheel --no-deps
  --no-build-isolation` of a copy of exactly those files) into the build cache;
- an installed distribution: its files, as its RECORD lists them, are packed back into a wheel
  (the scripts pip generated and the installer's own records are left out; pip writes them again).
Either way the wheel is cached under `~/.cache/spotrain/builds/<hash>/` (`$XDG_CACHE_HOME` is
honoured), so a launch of unchanged code reuses it instead of building.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import spotrain
from spotrain.errors import SpotrainError

_TOP_FILES = ("pyproject.toml", "README.md")
_INSTALLER_RECORDS = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")


class WheelBuildError(SpotrainError):
    """The running build cannot be packed into a wheel: one line."""


def build_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spotrain" / "builds"


def source_root() -> Path | None:
    """The checkout `spotrain` runs from, or None when it runs from an installed distribution."""
    root = Path(spotrain.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "spotrain"' in pyproject.read_text() else None


def source_files(root: Path) -> list[Path]:
    """What the build reads: the top files and every file of the package folders (pyproject's
    package-dir, read with a pattern: tomllib is Python 3.11's), caches and editor litter left out."""
    line = next((text for text in (root / "pyproject.toml").read_text().splitlines()
                 if text.startswith("package-dir")), "")
    folders = sorted(set(re.findall(r'"spotrain[.a-z_]*"\s*=\s*"([A-Za-z0-9_]+)"', line)))
    if not folders:
        raise WheelBuildError(f"{root / 'pyproject.toml'}: no package-dir line to find spotrain's folders in")
    files = [root / name for name in _TOP_FILES if (root / name).is_file()]
    for folder in folders:
        files += sorted(path for path in (root / folder).rglob("*") if path.is_file()
                        and not any(part.startswith(".") or part == "__pycache__"
                                    for part in path.relative_to(root).parts)
                        and path.suffix not in (".pyc", ".so", ".o"))
    return files


def content_hash(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def running_wheel(cache: Path | None = None) -> Path:
    """The cached wheel of the running spotrain, built or packed first when there is none."""
    cache = cache or build_cache()
    root = source_root()
    if root is not None:
        files = source_files(root)
        return _cached(cache / content_hash(root, files), lambda out: _build(root, files, out))
    dist = running_distribution()
    entries = _installed_files(dist)
    digest = hashlib.sha256()
    for relative, path in entries:
        digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return _cached(cache / digest.hexdigest(), lambda out: _pack(dist, entries, out))


def running_distribution() -> metadata.Distribution:
    """The installed distribution `spotrain` was imported from (another one may come first on the
    path: an editable install's records, say)."""
    running = Path(spotrain.__file__).resolve()
    for dist in metadata.distributions(name="spotrain"):
        if Path(str(dist.locate_file("spotrain/__init__.py"))).resolve() == running:
            return dist
    raise WheelBuildError(f"no installed distribution holds the running {running}: cannot pack it into a wheel")


def _cached(folder: Path, make: Callable[[Path], None]) -> Path:
    found = sorted(folder.glob("spotrain-*.whl"))
    if found:
        return found[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    try:
        make(staging)
        try:
            os.replace(staging, folder)  # whole or not at all; another launch may have won the race
        except OSError:
            if not sorted(folder.glob("spotrain-*.whl")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(folder.glob("spotrain-*.whl"))[0]


def _build(root: Path, files: list[Path], out: Path) -> None:
    """`pip wheel` of a copy of exactly `files` (the tree's other files, build litter included, stay out)."""
    with tempfile.TemporaryDirectory(prefix="spotrain-src-") as source:
        for path in files:
            target = Path(source) / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                 "--quiet", "--wheel-dir", str(out), source], capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise WheelBuildError(f"cannot build a wheel of {root} (pip wheel exit {result.returncode}): {last}")


def _installed_files(dist: metadata.Distribution) -> list[tuple[str, Path]]:
    """(path in the wheel, file) of the distribution's installed files, by its RECORD."""
    entries = []
    for item in dist.files or ():
        relative = item.as_posix()
        if relative.startswith("../") or "__pycache__" in relative or relative.endswith(".pyc"):
            continue  # scripts in bin/ (pip writes them from entry_points.txt) and bytecode
        if ".dist-info/" in relative and relative.rsplit("/", 1)[1] in _INSTALLER_RECORDS:
            continue
        entries.append((relative, Path(str(item.locate()))))
    if not entries:
        raise WheelBuildError("the installed spotrain lists no files (no RECORD): cannot pack it into a wheel")
    return sorted(entries)


def _pack(dist: metadata.Distribution, entries: list[tuple[str, Path]], out: Path) -> None:
    name = f"spotrain-{dist.version}-py3-none-any.whl"
    info = next(relative.split("/", 1)[0] for relative, _ in entries if ".dist-info/" in relative)
    record = []
    with zipfile.ZipFile(out / name, "w", zipfile.ZIP_DEFLATED) as wheel:
        for relative, path in entries:
            data = path.read_bytes()
            wheel.writestr(zipfile.ZipInfo(relative, date_time=(1980, 1, 1, 0, 0, 0)), data,
                           compress_type=zipfile.ZIP_DEFLATED)
            hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{relative},sha256={hashed},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(zipfile.ZipInfo(f"{info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)),
                       "\n".join(record) + "\n", compress_type=zipfile.ZIP_DEFLATED)
