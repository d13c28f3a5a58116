"""The agent's log line: a timestamp, "agent:", the message (systemd and the local VM keep stdout)."""

from __future__ import annotations

import time


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} agent: {message}", flush=True)
