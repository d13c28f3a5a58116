"""The VM's first step: fetch the build and the code the controller shipped, verify, install.

Runs before spotrain exists on the VM, so it is one file of the standard library only: cloud-init
writes it to /etc/spotrain/install_shipped.py and runs

    python3 /etc/spotrain/install_shipped.py /etc/spotrain/user-data.json /opt/spotrain

which reads the user-data's `code` section (spotrain.contracts.agent_config.ShippedCode), downloads
each file (an https URL the controller presigned, a file:// URL, or a GCS media URL read with the
VM's service-account token), checks its size and SHA-256, makes the venv ROOT (with
--system-site-packages: the image's torch serves), pip-installs the wheel into it, and unpacks the
code archive into ROOT/code (the agent's PYTHONPATH). Any failure prints ONE line starting with
`spotrain bootstrap:` (on the console: cloud-init's output goes there) and exits 1, and the agent
is never started. The same function, `install_shipped`, is the seam the local clouds call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

GCE_TOKEN_URL = "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token"
CHUNK = 1 << 20
TIMEOUT_SECONDS = 60
MAX_UNPACKED_BYTES = 1 << 30  # a bound on what an archive may unpack to (the controller ships far less)


class BootstrapError(Exception):
    """Why the VM will not start its agent: one line."""


def _gce_token() -> str:
    url = os.environ.get("SPOTRAIN_GCE_TOKEN_URL", GCE_TOKEN_URL)  # tests: a local metadata server
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as reply:
        return str(json.load(reply)["access_token"])


def _describe(url: str) -> str:
    """The URL without its query: a presigned URL's signature stays out of logs."""
    return url.split("?", 1)[0]


def fetch(shipped: dict[str, Any], folder: Path) -> Path:
    """Download one shipped file into `folder` under its own name, reading no more than its size,
    and return it only if its SHA-256 is the shipped one."""
    url, name, size, want = shipped["url"], shipped["name"], int(shipped["size"]), shipped["sha256"]
    if "/" in name or name in (".", ".."):
        raise BootstrapError(f"shipped file name {name!r} is not a plain name")
    headers = {"Authorization": f"Bearer {_gce_token()}"} if shipped.get("auth") == "gce-metadata" else {}
    digest, got, target = hashlib.sha256(), 0, folder / name
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS) as reply, \
                open(target, "wb") as out:
            while got <= size:
                chunk = reply.read(min(CHUNK, size + 1 - got))
                if not chunk:
                    break
                got += len(chunk)
                digest.update(chunk)
                out.write(chunk)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise BootstrapError(f"cannot fetch {name} from {_describe(url)}: {error}") from None
    if got != size:
        amount = f"more than the {size} bytes" if got > size else f"only {got} of the {size} bytes"
        raise BootstrapError(f"{name} from {_describe(url)}: {amount} shipped; refusing to install")
    if digest.hexdigest() != want:
        raise BootstrapError(f"{name} from {_describe(url)}: sha256 {digest.hexdigest()} differs from the "
                             f"shipped {want}; refusing to install")
    return target


def _safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, once each is a plain file or folder with a relative path that stays inside."""
    members, total = archive.getmembers(), 0
    for member in members:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise BootstrapError(f"code archive member {member.name!r} is not a plain file or folder inside it; "
                                 "refusing to unpack")
        total += member.size
    if total > MAX_UNPACKED_BYTES:
        raise BootstrapError(f"code archive unpacks to {total} bytes, over {MAX_UNPACKED_BYTES}")
    return members


def unpack(archive_path: Path, destination: Path) -> None:
    """Unpack the code archive into a fresh `destination` (replacing an older one whole)."""
    staging = Path(tempfile.mkdtemp(prefix=".code-", dir=destination.parent))
    try:
        with tarfile.open(archive_path, "r:gz") as archive:
            members = _safe_members(archive)
            for member in members:
                member.mode = 0o755 if member.isdir() or member.mode & 0o100 else 0o644  # world-readable: the
                member.uid = member.gid = 0  # agent runs as a systemd DynamicUser
            if hasattr(tarfile, "data_filter"):
                archive.extractall(staging, members=members, filter="data")
            else:  # Python without extraction filters: _safe_members has checked every member
                archive.extractall(staging, members=members)  # noqa: S202
    except (tarfile.TarError, OSError, EOFError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise BootstrapError(f"code archive {archive_path.name}: cannot unpack: {error}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(staging, destination)
    os.chmod(destination, 0o755)


def install_shipped(code: dict[str, Any], root: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """Fetch, verify and install `code` (a ShippedCode as JSON) into the venv `root`; returns the
    folder the task's code was unpacked to (ROOT/code), to put on the agent's PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    downloads = root / "shipped"
    downloads.mkdir(exist_ok=True)
    wheel = fetch(code["wheel"], downloads)
    archive = fetch(code["archive"], downloads) if code.get("archive") else None  # every digest before any install
    python = root / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", "--system-site-packages", str(root)], "create the venv")
    _run([str(python), "-m", "pip", "install", "--quiet", *pip_args, str(wheel)], f"install {wheel.name}")
    code_dir = root / "code"
    if archive is not None:
        unpack(archive, code_dir)
    else:
        code_dir.mkdir(exist_ok=True)
    return code_dir


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise BootstrapError(f"cannot {what} (exit {result.returncode}): {last}")


def main(argv: list[str]) -> int:
    """USER_DATA ROOT [PIP_ARG...]: install what USER_DATA's `code` names into ROOT."""
    if len(argv) < 2:
        print("usage: install_shipped.py USER_DATA ROOT [PIP_ARG...]", file=sys.stderr)
        return 2
    try:
        config = json.loads(Path(argv[0]).read_text())
        code = config.get("code") if isinstance(config, dict) else None
        if not isinstance(code, dict) or not isinstance(code.get("wheel"), dict):
            raise BootstrapError(f"{argv[0]}: no shipped build (key `code.wheel`) to install")
        code_dir = install_shipped(code, Path(argv[1]), tuple(argv[2:]))
    except (BootstrapError, OSError, ValueError, KeyError, TypeError) as error:
        print(f"spotrain bootstrap: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"spotrain bootstrap: installed {code['wheel']['name']}, code in {code_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
