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
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from spotrain.providers.background_http import BackgroundHTTPServer, BoundedHandler

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL_SECONDS = 21600
MAX_LIVE_TOKENS = 1024  # issuing more drops the ones that expire soonest: memory stays bounded
_TTL = re.compile(r"[0-9]{1,5}")


def iso_utc(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MetadataState:
    """What the metadata service knows about its instance; thread-safe."""

    def __init__(self, instance_id: str, zone: str, instance_type: str = "local.cpu",
                 live_files: dict[str, Path] | None = None, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
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
        now = self._clock()
        with self._lock:
            self._tokens = {t: expiry for t, expiry in self._tokens.items() if expiry > now}  # prune the expired
            excess = len(self._tokens) - MAX_LIVE_TOKENS + 1
            for oldest in sorted(self._tokens, key=self._tokens.__getitem__)[:max(0, excess)]:
                del self._tokens[oldest]
            self._tokens[token] = now + ttl
        return token

    def live_tokens(self) -> int:
        with self._lock:
            return len(self._tokens)

    def token_valid(self, token: str | None) -> bool:
        with self._lock:
            expiry = self._tokens.get(token or "")
        return expiry is not None and expiry > self._clock()

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


class _Handler(BoundedHandler):
    server: MetadataServer

    def _reply(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
        self.reply(status, body, {"Content-Type": content_type})

    def _refuse_other_methods(self) -> None:
        if self.read_body() is not None:
            self._reply(405, "Method Not Allowed")

    do_POST = do_DELETE = do_PATCH = _refuse_other_methods

    def do_PUT(self) -> None:
        if self.read_body() is None:
            return
        if self.path != TOKEN_PATH:
            return self._reply(404, "Not Found")
        if self.headers.get("X-Forwarded-For"):  # EC2 refuses token requests that went through a proxy
            return self._reply(403, "Forbidden")
        text = self.headers.get(TTL_HEADER, "")
        if not _TTL.fullmatch(text):  # digits only, as EC2 takes it: no sign, spaces or exponent
            return self._reply(400, "Bad Request")
        ttl = int(text)
        if not 1 <= ttl <= MAX_TTL_SECONDS:
            return self._reply(400, "Bad Request")
        self._reply(200, self.server.state.issue_token(ttl))

    def do_GET(self) -> None:
        if self.read_body() is None:
            return
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
