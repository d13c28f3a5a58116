"""A local metadata server that speaks the Compute Engine protocol (the GCE twin of imds_server.py).

`GET /computeMetadata/v1/<path>` needs `Metadata-Flavor: Google` (403 without it, and 403 for
any request that carries `X-Forwarded-For`); answers carry `Metadata-Flavor: Google` and an
`ETag`; an unknown path is 404. `?wait_for_change=true` hangs until the value's ETag changes
(at once when `last_etag` is given and already stale), or until `timeout_sec`, then answers
the current value. `instance/preempted` is `FALSE` until a preemption, then `TRUE`;
`instance/maintenance-event` is `NONE` until an event. `fail_next(n)` makes the next n
requests answer 503, as the real server may during maintenance.
"""

from __future__ import annotations

import hashlib
import threading
import time
from urllib.parse import parse_qs, urlsplit

from spotrain.providers.background_http import BackgroundHTTPServer, BoundedHandler

PREFIX = "/computeMetadata/v1/"
MAX_WAIT_SECONDS = 300.0


def etag_of(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class GceMetadataState:
    def __init__(self, name: str, zone: str, project_number: str = "123456789012", instance_id: str = "1"):
        self._changed = threading.Condition()
        self._failures = 0
        self.values = {
            "instance/name": name, "instance/id": instance_id,
            "instance/zone": f"projects/{project_number}/zones/{zone}",
            "instance/scheduling/provisioning-model": "SPOT",
            "instance/preempted": "FALSE", "instance/maintenance-event": "NONE",
            "project/numeric-project-id": project_number,
        }

    def set(self, path: str, value: str) -> None:
        with self._changed:
            self.values[path] = value
            self._changed.notify_all()

    def preempt(self) -> None:
        self.set("instance/preempted", "TRUE")

    def maintenance(self, event: str) -> None:
        self.set("instance/maintenance-event", event)

    def fail_next(self, count: int) -> None:
        with self._changed:
            self._failures += count

    def take_failure(self) -> bool:
        with self._changed:
            if self._failures > 0:
                self._failures -= 1
                return True
            return False

    def read(self, path: str, wait: bool, last_etag: str | None, timeout: float) -> str | None:
        with self._changed:
            if path not in self.values:
                return None
            if wait:
                start = etag_of(self.values[path]) if last_etag is None else last_etag
                deadline = time.monotonic() + timeout
                while etag_of(self.values[path]) == start and time.monotonic() < deadline:
                    self._changed.wait(timeout=deadline - time.monotonic())
            return self.values[path]


class _Handler(BoundedHandler):
    server: GceMetadataServer

    def _reply(self, status: int, body: str, etag: str | None = None) -> None:
        headers = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        self.reply(status, body, {**headers, "ETag": etag} if etag else headers)

    def _refuse_other_methods(self) -> None:
        if self.read_body() is not None:
            self._reply(405, "Method Not Allowed")

    do_PUT = do_POST = do_DELETE = do_PATCH = _refuse_other_methods

    def do_GET(self) -> None:
        if self.read_body() is None:
            return
        state = self.server.state
        if self.headers.get("X-Forwarded-For"):
            return self._reply(403, "Forbidden: requests with X-Forwarded-For are refused")
        if self.headers.get("Metadata-Flavor") != "Google":
            return self._reply(403, "Missing required header: Metadata-Flavor: Google")
        if state.take_failure():
            return self._reply(503, "Service Unavailable")
        url = urlsplit(self.path)
        if not url.path.startswith(PREFIX):
            return self._reply(404, "Not Found")
        query = parse_qs(url.query)
        wait = query.get("wait_for_change", ["false"])[0].lower() == "true"
        try:
            timeout = min(float(query.get("timeout_sec", [MAX_WAIT_SECONDS])[0]), MAX_WAIT_SECONDS)
        except ValueError:
            return self._reply(400, "Bad Request: timeout_sec")
        if not 0.0 <= timeout <= MAX_WAIT_SECONDS:  # NaN and negatives too
            return self._reply(400, "Bad Request: timeout_sec")
        value = state.read(url.path[len(PREFIX):].rstrip("/"), wait, query.get("last_etag", [None])[0], timeout)
        if value is None:
            return self._reply(404, "Not Found")
        self._reply(200, value, etag_of(value))


class GceMetadataServer(BackgroundHTTPServer):
    thread_name = "gce-metadata"

    def __init__(self, state: GceMetadataState, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.state = state
