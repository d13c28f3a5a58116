"""The WAN emulation harness: namespaces, veth links shaped by tc tbf, always removed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import wan_emulation
from benchmarks.wan_emulation import WanEmulation, WanEmulationError, list_namespaces

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root; not root here")

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9009)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); total = 0
while (data := c.recv(65536)):
    total += len(data)
c.sendall(str(total).encode()); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 9009), timeout=30)
c.sendall(b"x" * 300_000); c.shutdown(socket.SHUT_WR); print(c.recv(100).decode())
"""


def qdiscs(namespace: str) -> list[dict]:
    out = subprocess.run(["tc", "-j", "-n", namespace, "qdisc", "show"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def ours() -> list[str]:
    return [name for name in list_namespaces() if name.startswith(wan_emulation.PREFIX + f"-{os.getpid()}-")]


def test_refuses_without_root_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(WanEmulationError, match="needs root"), WanEmulation(hosts=2, rate_mbit=10):
        pass


@needs_root
def test_hosts_talk_over_shaped_links_and_everything_is_removed():
    with WanEmulation(hosts=2, rate_mbit=20) as wan:
        assert sorted(ours()) == sorted([wan.hub] + [h.namespace for h in wan.hosts])
        for index, host in enumerate(wan.hosts):
            for namespace, device in ((host.namespace, host.interface), (wan.hub, f"port{index}")):
                tbf = [q for q in qdiscs(namespace) if q["kind"] == "tbf" and q["dev"] == device]
                assert tbf and tbf[0]["options"]["rate"] == 20_000_000 / 8  # bytes/s
        server = wan.popen(1, [sys.executable, "-c", SERVER, wan.hosts[1].address], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        client = wan.run(0, [sys.executable, "-c", CLIENT, wan.hosts[1].address])
        assert client.returncode == 0 and client.stdout.strip() == "300000", client.stderr
        wan.set_rate(5)
        assert [q["options"]["rate"] for q in qdiscs(wan.hub) if q["kind"] == "tbf"] == [5_000_000 / 8] * 2
        wan.set_rate(None)
        assert not [q for q in qdiscs(wan.hosts[0].namespace) if q["kind"] == "tbf"]
        # the host namespaces are isolated from this one: their address is not ours
        assert wan.hosts[0].address not in subprocess.run(["ip", "-brief", "addr"], capture_output=True,
                                                          text=True, check=True).stdout
    assert ours() == []
    assert server.poll() is not None  # processes started inside are gone too


@needs_root
def test_namespaces_are_removed_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"), WanEmulation(hosts=3, rate_mbit=50) as wan:
        assert len(ours()) == 4
        sleeper = wan.popen(2, [sys.executable, "-c", "import time; time.sleep(600)"])
        raise RuntimeError("boom")
    assert ours() == []
    assert sleeper.poll() is not None


@needs_root
def test_namespaces_of_a_dead_harness_are_swept():
    name = f"{wan_emulation.PREFIX}-999999999-1-hub"  # no such process
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in wan_emulation.sweep_stale()
        assert name not in list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
