"""Watch the instance metadata service for a spot interruption: AWS IMDSv2 and GCE.

AWS: a session token (`PUT /latest/api/token`), then polls of `spot/instance-action` (the
two-minute notice) and `events/recommendations/rebalance` (an early warning, advisory only).
GCE: a hanging `GET instance/preempted?wait_for_change=true` with `Metadata-Flavor: Google`
(about 30 s of notice), and `instance/maintenance-event` (a spot VM cannot live-migrate, so
TERMINATE_ON_HOST_MAINTENANCE is a notice too). Both retry what a metadata server may answer
while it is busy (503, timeouts) and report the VM gone after repeated failures.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import get_args

from spotrain.contracts.agent_config import AgentConfig, MetadataKind
from spotrain.contracts.live_peers import PEERS_ATTRIBUTE, PEERS_TAG

TOKEN_TTL_SECONDS = 21600
GCE_NOTICE_SECONDS = 30.0  # a GCE spot VM gets ~30 s between the preemption notice and the stop
KINDS: tuple[str, ...] = get_args(MetadataKind)


@dataclass(frozen=True)
class Notice:
    action: str  # terminate | stop | hibernate (AWS), preempted | maintenance (GCE), rebalance (advisory)
    time: str  # ISO 8601 UTC: when the VM goes away (rebalance: when it was recommended)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ImdsV2Client:
    def __init__(self, base_url: str, timeout: float = 2.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _refresh_token(self) -> str:
        request = urllib.request.Request(
            f"{self.base_url}/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            self._token = response.read().decode()
        return self._token

    def get(self, path: str) -> str | None:
        """The document at meta-data `path`, or None when it does not exist (404)."""
        for attempt in range(2):
            token = self._token or self._refresh_token()
            request = urllib.request.Request(
                f"{self.base_url}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read().decode()
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code == 401 and attempt == 0:
                    self._token = None  # expired or revoked: get a new one, once
                    continue
                raise
        return None

    def spot_notice(self) -> Notice | None:
        body = self.get("spot/instance-action")
        if body is None:
            return None
        data = json.loads(body)
        return Notice(action=data["action"], time=data["time"])

    def rebalance_notice(self) -> Notice | None:
        body = self.get("events/recommendations/rebalance")
        if body is None:
            return None
        return Notice(action="rebalance", time=json.loads(body)["noticeTime"])

    def reachable_hosts(self) -> list[str]:
        """The VM's private and public IPv4 addresses, the ones it has."""
        return [host.strip() for host in (self.get("local-ipv4"), self.get("public-ipv4")) if host and host.strip()]

    def live_peers(self) -> list[str] | None:
        """The swarm's peers as the controller last published them on this instance; None: never published."""
        value = self.get(f"tags/instance/{PEERS_TAG}")
        return None if value is None else value.split()

    def instance_id(self) -> str:
        value = self.get("instance-id")
        if not value:
            raise ValueError("the metadata service has no instance-id")
        return value


class GceMetadataClient:
    """`GET /computeMetadata/v1/...` with the flavor header; 503 and timeouts are retried."""

    def __init__(self, base_url: str, timeout: float = 2.0, retries: int = 3, backoff: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def get(self, path: str, wait: bool = False, last_etag: str | None = None,
            timeout_sec: float = 60.0) -> tuple[str, str] | None:
        """(value, etag), or None for a path that does not exist (404)."""
        query = {}
        if wait:
            query = {"wait_for_change": "true", "timeout_sec": str(int(timeout_sec))}
            if last_etag:
                query["last_etag"] = last_etag
        url = f"{self.base_url}/computeMetadata/v1/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        # a hanging GET may take timeout_sec before it answers
        socket_timeout = self.timeout + (timeout_sec if wait else 0.0)
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
            try:
                with urllib.request.urlopen(request, timeout=socket_timeout) as response:
                    if response.headers.get("Metadata-Flavor") != "Google":
                        raise ValueError("answer without Metadata-Flavor: Google: not a GCE metadata server")
                    return response.read().decode(), response.headers.get("ETag", "")
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code != 503 or attempt == self.retries:
                    raise
            except (TimeoutError, urllib.error.URLError):
                if attempt == self.retries:
                    raise
            time.sleep(self.backoff * (2 ** attempt))
        return None

    def preempted(self, last_etag: str | None = None, wait: bool = False,
                  timeout_sec: float = 60.0) -> tuple[bool, str]:
        answer = self.get("instance/preempted", wait=wait, last_etag=last_etag, timeout_sec=timeout_sec)
        return (answer is not None and answer[0].strip().upper() == "TRUE"), (answer[1] if answer else "")

    def maintenance_event(self) -> str:
        answer = self.get("instance/maintenance-event")
        return answer[0].strip() if answer else "NONE"

    def reachable_hosts(self) -> list[str]:
        """The VM's internal IP and its external (NAT) IP, the ones it has."""
        hosts = []
        for path in ("instance/network-interfaces/0/ip", "instance/network-interfaces/0/access-configs/0/external-ip"):
            answer = self.get(path)
            if answer and answer[0].strip():
                hosts.append(answer[0].strip())
        return hosts

    def live_peers(self) -> list[str] | None:
        """The swarm's peers as the controller last published them in this instance's metadata; None: never."""
        answer = self.get(f"instance/attributes/{PEERS_ATTRIBUTE}")
        return answer[0].split() if answer else None

    def instance_id(self) -> str:
        answer = self.get("instance/name")  # spotrain knows GCE instances by name
        if not answer:
            raise ValueError("the metadata service has no instance/name")
        return answer[0]


class _Watcher(ABC):
    """Calls `on_notice` once, with the notice or None when the metadata service is gone;
    `on_advisory` (optional) once per advisory kind, e.g. an AWS rebalance recommendation."""

    def __init__(self, on_notice: Callable[[Notice | None], None],
                 on_advisory: Callable[[Notice], None] | None = None, lost_after_failures: int = 5):
        self.on_notice, self.on_advisory = on_notice, on_advisory
        self.lost_after_failures = lost_after_failures
        self._advised: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notice-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _advise(self, notice: Notice) -> None:
        if notice.action not in self._advised and self.on_advisory is not None:
            self._advised.add(notice.action)
            self.on_advisory(notice)

    @abstractmethod
    def _check(self) -> Notice | None:
        """One look at the metadata service: a notice, or None."""

    @abstractmethod
    def _pause(self) -> bool:
        """Wait before the next check; True when asked to stop."""

    def _run(self) -> None:
        failures = 0
        while not self._pause():
            try:
                notice = self._check()
                failures = 0
            except (OSError, ValueError, KeyError):
                failures += 1
                if failures >= self.lost_after_failures:
                    self.on_notice(None)  # the metadata service is gone: so is our VM
                    return
                continue
            if notice is not None:
                self.on_notice(notice)
                return


class NoticeWatcher(_Watcher):
    """AWS: polls `spot/instance-action` and `events/recommendations/rebalance`."""

    def __init__(self, client: ImdsV2Client, on_notice: Callable[[Notice | None], None],
                 poll_seconds: float = 1.0, lost_after_failures: int = 5,
                 on_advisory: Callable[[Notice], None] | None = None):
        super().__init__(on_notice, on_advisory, lost_after_failures)
        self.client, self.poll_seconds = client, poll_seconds

    def _pause(self) -> bool:
        return self._stop.wait(self.poll_seconds)

    def _check(self) -> Notice | None:
        notice = self.client.spot_notice()
        if notice is None and "rebalance" not in self._advised:
            rebalance = self.client.rebalance_notice()
            if rebalance is not None:
                self._advise(rebalance)
        return notice


class GceNoticeWatcher(_Watcher):
    """GCE: a hanging GET on `instance/preempted` (woken by any change), then `maintenance-event`."""

    def __init__(self, client: GceMetadataClient, on_notice: Callable[[Notice | None], None],
                 wait_seconds: float = 10.0, lost_after_failures: int = 5,
                 on_advisory: Callable[[Notice], None] | None = None):
        super().__init__(on_notice, on_advisory, lost_after_failures)
        self.client, self.wait_seconds = client, wait_seconds
        self._etag: str | None = None

    def _pause(self) -> bool:
        return self._stop.is_set()  # the hanging GET is the pause

    def _check(self) -> Notice | None:
        preempted, self._etag = self.client.preempted(self._etag, wait=self._etag is not None,
                                                      timeout_sec=self.wait_seconds)
        if preempted:
            return Notice("preempted", _iso(time.time() + GCE_NOTICE_SECONDS))
        event = self.client.maintenance_event()
        if event.startswith("TERMINATE"):
            return Notice("maintenance", _iso(time.time() + GCE_NOTICE_SECONDS))
        if event != "NONE":
            self._advise(Notice(event.lower(), _iso(time.time())))
        return None


def watcher_settings(config: AgentConfig, environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(kind, url) of the VM's metadata service: the environment first (systemd, the local
    provider), then the user-data's `metadata`; None when there is none to watch."""
    if environ is None:
        environ = os.environ
    metadata = config.metadata
    url = environ.get("SPOTRAIN_METADATA_URL") or (metadata.url if metadata else None)
    kind = environ.get("SPOTRAIN_METADATA_KIND") or (metadata.kind if metadata else "aws-imdsv2")
    if kind not in KINDS:
        raise ValueError(f"unknown metadata kind {kind!r}; valid: {', '.join(KINDS)}")
    return (kind, url) if url else None


def make_client(kind: str, url: str) -> ImdsV2Client | GceMetadataClient:
    return GceMetadataClient(url) if kind == "gce" else ImdsV2Client(url)


def make_watcher(kind: str, url: str, on_notice: Callable[[Notice | None], None],
                 on_advisory: Callable[[Notice], None] | None = None) -> _Watcher:
    client = make_client(kind, url)
    if isinstance(client, GceMetadataClient):
        return GceNoticeWatcher(client, on_notice, on_advisory=on_advisory)
    return NoticeWatcher(client, on_notice, on_advisory=on_advisory)
