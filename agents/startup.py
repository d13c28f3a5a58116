"""How long this agent's process has been up. Its log stamps the steps of its start with it: a
replacement's recovery time is where its start goes (benchmarks/recovery.py reads the lines)."""

from __future__ import annotations

import os
import time

_FALLBACK_START = time.monotonic()  # where /proc cannot say: this module's import


def seconds_since_start() -> float:
    """Seconds since the kernel started this process (/proc/self/stat's start time against
    /proc/uptime, both since boot), so the interpreter's start and the imports count too."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command
            now = float(uptime.read().split()[0])
        return max(0.0, now - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _FALLBACK_START
