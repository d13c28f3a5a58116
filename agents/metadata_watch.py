"""Watch the instance metadata service for a spot interruption notice (AWS IMDSv2)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_TTL_SECONDS = 21600


@dataclass(frozen=True)
class Notice:
    action: str
    time: str


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


class NoticeWatcher:
    """Polls in a thread; calls `on_notice` once, with the notice or None when the VM is gone."""

    def __init__(self, client: ImdsV2Client, on_notice: Callable[[Notice | None], None],
                 poll_seconds: float = 1.0, lost_after_failures: int = 5):
        self.client = client
        self.on_notice = on_notice
        self.poll_seconds = poll_seconds
        self.lost_after_failures = lost_after_failures
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notice-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.poll_seconds):
            try:
                notice = self.client.spot_notice()
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
