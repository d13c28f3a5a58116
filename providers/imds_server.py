"""A local instance-metadata server that speaks the AWS IMDSv2 protocol.

Each local "VM" runs one, so its agent finds preemption notices exactly as on EC2:
`PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` returns a session token;
every `GET` must carry it in `X-aws-ec2-metadata-token` (401 without a valid one);
`GET /latest/meta-data/spot/instance-action` is 404 until a notice, then
`{"action": "terminate", "time": "2026-01-01T00:00:00Z"}`;
`GET /latest/meta-data/events/recommendations/rebalance` is 404 until a rebalance
recommendation, then `{"noticeTime": "2026-01-01T00:00:00Z"}`.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from spotrain.providers.background_http import BackgroundHTTPServer

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL_SECONDS = 21600


def iso_utc(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MetadataState:
    """What the metadata service knows about its instance; thread-safe."""

    def __init__(self, instance_id: str, zone: str, instance_type: str = "local.cpu",
                 live_files: dict[str, Path] | None = None):
        self._lock = threading.Lock()
        self.live_files = live_files or {}  # documents read from a file at each request (the live peers)
        self._tokens: dict[str, float] = {}
        self._notice: dict | None = None
        self._rebalance: dict | None = None
        self.documents = {
            "instance-id": instance_id,
            "instance-type": instance_type,
            "placement/availability-zone": zone,
            "instance-life-cycle": "spot",
        }

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.monotonic() + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > time.monotonic()

    def post_notice(self, terminate_at: float) -> None:
        with self._lock:
            if self._notice is None:
                self._notice = {"action": "terminate", "time": iso_utc(terminate_at)}

    def post_rebalance(self, at: float) -> None:
        with self._lock:
            if self._rebalance is None:
                self._rebalance = {"noticeTime": iso_utc(at)}

    def rebalance(self) -> dict | None:
        with self._lock:
            return dict(self._rebalance) if self._rebalance else None

    def notice(self) -> dict | None:
        with self._lock:
            return dict(self._notice) if self._notice else None


class _Handler(BaseHTTPRequestHandler):
    server: MetadataServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the supervisor logs what matters
        pass

    def _reply(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TOKEN_PATH:
            return self._reply(404, "Not Found")
        if self.headers.get("X-Forwarded-For"):  # EC2 refuses token requests that went through a proxy
            return self._reply(403, "Forbidden")
        try:
            ttl = int(self.headers.get(TTL_HEADER, ""))
        except ValueError:
            return self._reply(400, "Bad Request")
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            return self._reply(400, "Bad Request")
        self._reply(200, self.server.state.issue_token(ttl))

    def do_GET(self) -> None:
        if not self.server.state.token_valid(self.headers.get(TOKEN_HEADER)):
            return self._reply(401, "Unauthorized")
        path = self.path.split("?", 1)[0]
        prefix = "/latest/meta-data/"
        if not path.startswith(prefix):
            return self._reply(404, "Not Found")
        key = path[len(prefix):].rstrip("/")
        if key == "spot/instance-action":
            notice = self.server.state.notice()
            return self._reply(200, json.dumps(notice), "application/json") if notice else self._reply(404, "Not Found")
        if key == "events/recommendations/rebalance":
            rebalance = self.server.state.rebalance()
            return (self._reply(200, json.dumps(rebalance), "application/json") if rebalance
                    else self._reply(404, "Not Found"))
        live = self.server.state.live_files.get(key)
        if live is not None:
            try:
                return self._reply(200, live.read_text())
            except FileNotFoundError:
                return self._reply(404, "Not Found")
        if key in self.server.state.documents:
            return self._reply(200, self.server.state.documents[key])
        self._reply(404, "Not Found")


class MetadataServer(BackgroundHTTPServer):
    thread_name = "imds"

    def __init__(self, state: MetadataState, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _Handler)
        self.state = state
