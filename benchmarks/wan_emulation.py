"""Emulated WAN links: hosts in network namespaces, joined through a bridge, shaped with tc tbf.

    host 0 (netns, 198.18.0.1) --veth--+
    host 1 (netns, 198.18.0.2) --veth--+-- bridge (hub netns)
    ...                                |
Each host's veth is shaped on both ends (its upload on the host side, its download on the hub
side) to the same rate, like an access link of that speed. Addresses come from 198.18.0.0/15,
the range reserved for benchmarks, and nothing is routed outside the namespaces.

    with WanEmulation(hosts=2, rate_mbit=50) as wan:
        wan.popen(0, ["python", "worker.py"])      # runs inside host 0's namespace
        wan.set_rate(10)                           # reshape without rebuilding

Everything it creates is removed on exit, on an exception, and on SIGTERM/SIGINT when the
caller uses `exit_on_signals()`; namespaces left by a harness whose process died are swept at
the next start. It refuses to run without root (network namespaces and qdiscs need it).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from types import TracebackType

PREFIX = "spotrain-wan"
SUBNET_PREFIX = "198.18.0."  # RFC 2544 benchmarking range
_NAMESPACE = re.compile(rf"^{PREFIX}-(\d+)-")


class WanEmulationError(RuntimeError):
    pass


@dataclass(frozen=True)
class WanHost:
    namespace: str
    address: str
    interface: str  # the host's veth inside its namespace (GLOO_SOCKET_IFNAME)


def require_root() -> None:
    if os.geteuid() != 0:
        raise WanEmulationError("WAN emulation needs root: it creates network namespaces, veth links and tc "
                                "qdiscs; run it as root (or skip it)")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise WanEmulationError(f"WAN emulation needs iproute2: {', '.join(missing)} not found")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise WanEmulationError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _tc(*args: str) -> None:
    result = subprocess.run(["tc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise WanEmulationError(f"tc {' '.join(args)}: {result.stderr.strip()}")


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete namespaces of harnesses whose process is gone; returns their names."""
    swept = []
    for name in list_namespaces():
        match = _NAMESPACE.match(name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _ip("netns", "del", name, check=False)
            swept.append(name)
    return swept


def tbf_arguments(rate_mbit: float) -> list[str]:
    """tbf needs a bucket of at least one timer tick of traffic and a GSO super-packet."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(int(rate_bytes / 250), 64 * 1024)
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]


class WanEmulation:
    _count = 0

    def __init__(self, hosts: int, rate_mbit: float | None = None):
        if not 1 <= hosts <= 200:
            raise ValueError(f"hosts must be 1..200, got {hosts}")
        WanEmulation._count += 1
        self.prefix = f"{PREFIX}-{os.getpid()}-{WanEmulation._count}"
        self.hub = f"{self.prefix}-hub"
        self.hosts = [WanHost(f"{self.prefix}-h{i}", f"{SUBNET_PREFIX}{i + 1}", "wan0") for i in range(hosts)]
        self.rate_mbit = rate_mbit
        self._processes: list[subprocess.Popen] = []
        self._created: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> WanEmulation:  # noqa: PYI034 (typing.Self needs Python 3.11)
        require_root()
        sweep_stale()
        try:
            self._build()
            self.set_rate(self.rate_mbit)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            self._add_namespace(host.namespace)
            left, right = f"spw{secrets.token_hex(4)}", f"spw{secrets.token_hex(4)}"
            _ip("link", "add", left, "type", "veth", "peer", "name", right)
            _ip("link", "set", left, "netns", host.namespace)
            _ip("link", "set", right, "netns", self.hub)
            _ip("-n", host.namespace, "link", "set", left, "name", host.interface)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
            _ip("-n", host.namespace, "link", "set", host.interface, "up")
            _ip("-n", self.hub, "link", "set", right, "name", f"port{index}")
            _ip("-n", self.hub, "link", "set", f"port{index}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"port{index}", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def set_rate(self, rate_mbit: float | None) -> None:
        """Shape every host's link to `rate_mbit` each way (None: unshaped)."""
        for index, host in enumerate(self.hosts):
            for namespace, device in ((host.namespace, host.interface), (self.hub, f"port{index}")):
                if rate_mbit is None:
                    subprocess.run(["tc", "-n", namespace, "qdisc", "del", "dev", device, "root"],
                                   capture_output=True, check=False)
                else:
                    _tc("-n", namespace, "qdisc", "replace", "dev", device, "root", *tbf_arguments(rate_mbit))
        self.rate_mbit = rate_mbit

    def close(self) -> None:
        """Stop every process started here, then delete every namespace created here."""
        self.close_processes()
        errors = []
        for name in reversed(self._created):
            result = _ip("netns", "del", name, check=False)
            if result.returncode != 0 and name in list_namespaces():
                errors.append(f"{name}: {result.stderr.strip()}")
        self._created.clear()
        if errors:
            raise WanEmulationError("could not delete namespaces: " + "; ".join(errors))

    def close_processes(self) -> None:
        """Kill the process group of every process started here (helpers such as p2pd included)."""
        for process in self._processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the whole group is gone already
            process.wait()
        self._processes.clear()

    # -- running things inside ----------------------------------------------------------
    def command(self, index: int, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[index].namespace, *argv]

    def popen(self, index: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` in host `index`'s namespace, in its own process group (closed on exit)."""
        process = subprocess.Popen(self.command(index, argv), start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def run(self, index: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(index, argv), capture_output=True, text=True, timeout=timeout,
                              check=False)


def exit_on_signals() -> None:
    """Turn SIGTERM/SIGINT into SystemExit so `with WanEmulation(...)` cleans up."""
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
