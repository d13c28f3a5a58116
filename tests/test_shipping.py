"""Shipping the build and the task's code (spotrain/shipping.py, spotrain/code_archive.py) and the
VM's half that fetches, verifies and unpacks them (spotrain/infra/install_shipped.py), on a
directory store: deterministic archives, what is left out, digests checked, unsafe archives refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spotrain.code_archive import CodeArchiveError, archive_code
from spotrain.contracts.agent_config import AgentConfig
from spotrain.infra import install_shipped
from spotrain.shipping import ShippingError, ship, ship_for
from spotrain.store_domains import DomainStore, StorePlacement
from spotrain.stores import open_store

INSTALLER = Path(install_shipped.__file__)


def task_folder(root: Path) -> Path:
    code = root / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "my_task.py").write_text("VALUE = 42\n")
    (code / "pkg" / "__init__.py").write_text("")
    for secret in (".env", ".env.local", "deploy.pem"):
        (code / secret).write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (code / ".git").mkdir()
    (code / ".git" / "config").write_text("[core]\n")
    (code / "__pycache__").mkdir()
    (code / "__pycache__" / "my_task.cpython-311.pyc").write_bytes(b"\0")
    (root / "outside.txt").write_text("not the task's\n")
    (code / "escape.txt").symlink_to(root / "outside.txt")
    (code / "alias.py").symlink_to(code / "my_task.py")
    return code


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def test_the_code_archive_is_deterministic_and_leaves_secrets_and_escaping_links_out(tmp_path):
    code = task_folder(tmp_path)
    first = archive_code(code)
    assert names(first.data) == ["alias.py", "my_task.py", "pkg", "pkg/__init__.py"]
    assert first.skipped == ("escape.txt",)
    os.utime(code / "my_task.py", (1, 1))  # times play no part: the same folder, the same bytes
    assert archive_code(code).data == first.data
    (code / "my_task.py").write_text("VALUE = 43\n")
    assert archive_code(code).data != first.data
    (code / "data.bin").write_bytes(b"\0" * 5000)
    with pytest.raises(CodeArchiveError, match=r"5,\d+ bytes to ship, over the limit of 4,096; largest: data.bin "):
        archive_code(code, max_bytes=4096)


def test_shipping_uploads_by_content_once_and_hands_out_digests(tmp_path):
    store = open_store(str(tmp_path / "bucket"))
    wheel = tmp_path / "spotrain-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel bytes")
    build = ship(wheel, archive_code(task_folder(tmp_path)), store)
    digest = hashlib.sha256(b"wheel bytes").hexdigest()
    assert build.wheel.key == f"code/{digest}/{wheel.name}"
    assert (tmp_path / "bucket" / build.wheel.key).read_bytes() == b"wheel bytes"
    before = (tmp_path / "bucket" / build.wheel.key).stat().st_mtime_ns
    ship(wheel, None, store)  # the same content: nothing is written again
    assert (tmp_path / "bucket" / build.wheel.key).stat().st_mtime_ns == before
    code = build.code()
    assert code.wheel.url == (tmp_path / "bucket" / build.wheel.key).as_uri() and code.wheel.sha256 == digest
    assert code.archive is not None and code.archive.name == "code.tar.gz"
    assert store.manifests() == [] and store.prune(1) == []  # checkpoints do not see, nor prune, the build


def test_a_cloud_location_without_a_bucket_it_can_read_is_refused_with_one_line(tmp_path):
    placement = StorePlacement((DomainStore(str(tmp_path / "dir")), DomainStore("gs://b/run", "gcp:us-central1")))
    with pytest.raises(ShippingError) as caught:
        ship_for(placement, ["gcp:us-central1-a", "aws:us-east-1a"], lambda: pytest.fail("built"), None, print)
    assert str(caught.value).startswith("aws:us-east-1a: its VMs fetch spotrain's build")
    assert "s3://" in str(caught.value) and "\n" not in str(caught.value)


def installed(tmp_path: Path, tamper: str | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """Ship to a directory store, tamper with the stored archive ("truncate" or "flip" a byte),
    run the VM's installer."""
    store = open_store(str(tmp_path / "bucket"))
    wheel = tmp_path / "spotrain-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not installed: the archive is checked first")
    build = ship(wheel, archive_code(task_folder(tmp_path)), store)
    assert build.archive is not None
    stored = tmp_path / "bucket" / build.archive.key
    if tamper == "truncate":
        stored.write_bytes(stored.read_bytes()[:10])
    elif tamper == "flip":
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0xFF
        stored.write_bytes(bytes(data))
    from conftest import agent_config

    user_data = tmp_path / "user-data.json"
    user_data.write_text(agent_config(code=build.code()).to_json())
    assert AgentConfig.from_json(user_data.read_text()).code == build.code()
    root = tmp_path / "venv"
    result = subprocess.run([sys.executable, str(INSTALLER), str(user_data), str(root)], capture_output=True,
                            text=True, timeout=60)
    return result, root


@pytest.mark.parametrize("tamper", ["truncate", "flip"])
def test_a_tampered_archive_stops_the_bootstrap_with_one_line(tmp_path, tamper):
    result, root = installed(tmp_path, tamper)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("spotrain bootstrap: code.tar.gz from file://")
    assert ("differs from the shipped" if tamper == "flip" else "only 10 of") in line
    assert "refusing to install" in line
    assert not (root / "bin").exists() and not (root / "code").exists()  # nothing installed, nothing unpacked


def evil_archive(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("fine.py")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"x\n"))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize("make", [
    lambda: tarfile.TarInfo("../outside.py"),
    lambda: tarfile.TarInfo("/etc/cron.d/evil"),
    lambda: (lambda m: (setattr(m, "type", tarfile.SYMTYPE), setattr(m, "linkname", "/etc/passwd"), m)[-1])(
        tarfile.TarInfo("link")),
    lambda: (lambda m: (setattr(m, "type", tarfile.LNKTYPE), setattr(m, "linkname", "../../x"), m)[-1])(
        tarfile.TarInfo("hard")),
], ids=["dotdot", "absolute", "symlink", "hardlink"])
def test_an_archive_that_would_write_outside_its_folder_is_refused_whole(tmp_path, make):
    member = make()
    archive = evil_archive(tmp_path, member, b"evil\n" if member.isfile() else b"")
    destination = tmp_path / "root" / "code"
    destination.parent.mkdir()
    with pytest.raises(install_shipped.BootstrapError, match="not a plain file or folder inside it"):
        install_shipped.unpack(archive, destination)
    assert not destination.exists() and sorted(p.name for p in (tmp_path / "root").iterdir()) == []
    assert not (tmp_path / "outside.py").exists()


def test_the_installer_reads_no_more_than_the_shipped_size(tmp_path):
    (tmp_path / "w.whl").write_bytes(b"a" * 100)
    shipped = {"url": (tmp_path / "w.whl").as_uri(), "name": "w.whl", "size": 10,
               "sha256": hashlib.sha256(b"a" * 10).hexdigest()}
    (tmp_path / "out").mkdir()
    with pytest.raises(install_shipped.BootstrapError, match="more than the 10 bytes shipped"):
        install_shipped.fetch(shipped, tmp_path / "out")
    user_data = tmp_path / "u.json"
    user_data.write_text(json.dumps({"cluster": "c"}))
    result = subprocess.run([sys.executable, str(INSTALLER), str(user_data), str(tmp_path / "v")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("spotrain bootstrap: ") and "code.wheel" in result.stderr
