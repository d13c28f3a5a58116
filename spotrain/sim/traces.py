"""Loaders for real spot traces: each file becomes one location's capacity over time.

Formats (see the data's PROVENANCE.md):
- spot-traces JSON `{"metadata": {"gap_seconds": N}, "data": [...], "prices"?: [...]}`: a value
  > 0 means spot capacity was there (multi-node files count instances); preemption traces use
  the same encoding (1: the probe instance ran, 0: it was preempted or could not start).
- Bamboo event CSV `t_ms,add|remove,nodeN`; Bamboo gcloud `YYYY-MM-DD, HH:MM:SS, count`;
  Bamboo `(time, #instances)` steps (seconds, or hours in `_scaled` and p2 files).
- Parcae `t_ms,node_count` CSV and `trace_*.txt` JSON lines `[t_ms, "add"|"remove"|..., {"nodes": [...]}]`.
A file named like `us-east-1a_v100_1.json` maps to AWS zone us-east-1a and GPU V100; the folder
name's prefix (`aws-...`, `gcp-...`) names the provider.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from spotrain.errors import SpotrainError

_ZONE = re.compile(r"^[a-z]+-[a-z]+\d(-?[a-z])?$")  # us-east-1a, us-central1-a
_GCLOUD_NAME = re.compile(r"^(?P<gpu>[a-z0-9]+?)x\d+-(?P<area>east|west|central)(?P<n>\d)(?P<z>[a-z])$")
_AWS_ZONE_IN_NAME = re.compile(r"(us|eu|ap|sa|ca|me|af)-[a-z]+-\d[a-z]")
_GPU_NAMES = {"v100": "V100", "k80": "K80", "t4": "T4", "a100": "A100", "l4": "L4", "a10g": "A10G",
              "p3": "V100", "g4dn": "T4", "p2": "K80", "intel": None, "c3-88": None}


class TraceError(SpotrainError):
    """A trace file that cannot be used; names the file."""


@dataclass(frozen=True)
class LocationTrace:
    location: str  # "aws:us-east-1a"
    gpu: str | None
    times: tuple[float, ...]  # seconds from the trace start, increasing
    capacity: tuple[int, ...]  # instances available from that time on
    prices: tuple[float, ...] | None
    source: str

    @property
    def horizon(self) -> float:
        return self.times[-1]

    def _index(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.times, t) - 1)

    def capacity_at(self, t: float) -> int:
        return self.capacity[self._index(t)] if t <= self.horizon else 0

    def price_at(self, t: float) -> float | None:
        return self.prices[self._index(t)] if self.prices else None


def _provider_of(path: Path) -> str:
    for part in reversed(path.parts[:-1]):
        if part.startswith(("aws-", "gcp-", "azure-")):
            return part.split("-", 1)[0]
    return "aws" if "aws" in path.name or _AWS_ZONE_IN_NAME.search(path.name) else "trace"


def _location_and_gpu(path: Path) -> tuple[str, str | None]:
    parts = path.stem.split("_")
    provider = _provider_of(path)
    if len(parts) >= 2 and _ZONE.match(parts[0]):
        return f"{provider}:{parts[0]}", _GPU_NAMES.get(parts[1], parts[1].upper())
    gcloud = _GCLOUD_NAME.match(path.stem)
    if gcloud:  # Bamboo's gcloud files: a100x1-east1b -> gcp:us-east1-b
        return f"gcp:us-{gcloud['area']}{gcloud['n']}-{gcloud['z']}", _GPU_NAMES.get(gcloud["gpu"])
    zone = _AWS_ZONE_IN_NAME.search(path.name)
    gpu = next((g for key, g in _GPU_NAMES.items() if key in path.name.lower()), None)
    if zone:
        return f"aws:{zone.group(0)}", gpu
    return f"{provider}:{path.stem}", gpu


def _steps(points: list[tuple[float, int]], path: Path) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if not points:
        raise TraceError(f"{path}: empty trace")
    points.sort(key=lambda p: p[0])
    start = points[0][0]
    times: list[float] = []
    values: list[int] = []
    for t, v in points:
        if times and t - start == times[-1]:
            values[-1] = v  # several events at one time: the last count holds
        else:
            times.append(t - start)
            values.append(v)
    return tuple(times), tuple(values)


def _spot_traces_json(data: dict, path: Path) -> tuple[list[tuple[float, int]], tuple[float, ...] | None]:
    gap = float(data["metadata"]["gap_seconds"])
    values = data["data"]
    if not isinstance(values, list) or not values:
        raise TraceError(f"{path}: empty trace")
    prices = data.get("prices")
    if prices is not None and len(prices) != len(values):
        raise TraceError(f"{path}: 'prices' has {len(prices)} points, 'data' {len(values)}")
    return [(i * gap, int(v)) for i, v in enumerate(values)], tuple(float(p) for p in prices) if prices else None


def _csv_rows(text: str) -> list[list[str]]:
    return [row for row in csv.reader(text.splitlines()) if row and any(cell.strip() for cell in row)]


def load_trace(path: Path) -> LocationTrace:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise TraceError(f"{path}: cannot read: {error.strerror}") from None
    location, gpu = _location_and_gpu(path)
    prices = None
    if not text.strip():
        raise TraceError(f"{path}: empty trace")
    try:
        points = _parse(text, path)
        if isinstance(points, tuple):
            points, prices = points
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise TraceError(f"{path}: unknown trace format ({type(error).__name__}: {error})") from None
    times, capacity = _steps(points, path)
    if prices is not None and len(prices) != len(times):
        prices = None  # duplicate times were merged; prices no longer line up
    return LocationTrace(location, gpu, times, capacity, prices, str(path))


def _parse(text: str, path: Path):
    stripped = text.lstrip()
    if stripped.startswith("{"):
        data = json.loads(text)
        if "metadata" not in data or "data" not in data:
            raise ValueError("JSON without 'metadata' and 'data'")
        return _spot_traces_json(data, path)
    if stripped.startswith("["):  # Parcae JSON lines
        count, points = 0, []
        for line in text.splitlines():
            if not line.strip():
                continue
            t_ms, event, detail = json.loads(line)
            nodes = len(detail.get("nodes", []))
            count += nodes if event == "add" else -nodes if event == "remove" else 0
            points.append((float(t_ms) / 1000.0, count))
        return points
    rows = _csv_rows(text)
    first = rows[0]
    if len(first) == 3 and first[1].strip() in ("add", "remove"):  # Bamboo events
        count, points = 0, []
        for t_ms, event, _node in rows:
            count += 1 if event.strip() == "add" else -1
            points.append((float(t_ms) / 1000.0, count))
        return points
    if len(first) == 3 and re.match(r"^\d{4}-\d{2}-\d{2}$", first[0].strip()):  # Bamboo gcloud
        stamps = [(datetime.strptime(f"{d.strip()} {t.strip()}", "%Y-%m-%d %H:%M:%S"), int(c)) for d, t, c in rows]
        start = stamps[0][0]
        return [((s - start).total_seconds(), c) for s, c in stamps]
    if len(first) == 2:  # (time, count) steps
        hours = "_scaled" in path.name or "p2-xlarge" in path.name
        milliseconds = path.parent.name == "traces" and path.name == "p3.csv"  # Parcae's t_ms
        scale = 3600.0 if hours else 0.001 if milliseconds else 1.0
        return [(float(t) * scale, int(float(c))) for t, c in rows]
    raise ValueError(f"{len(first)} columns")


def load_traces(paths: list[Path]) -> list[LocationTrace]:
    """Files, or folders of files (each file one location); locations must be distinct."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".csv", ".txt"))
            if not found:
                raise TraceError(f"{path}: no trace files in this folder")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise TraceError(f"{path}: no such file or folder")
    traces = [load_trace(f) for f in files]
    seen: dict[str, str] = {}
    for trace in traces:
        if trace.location in seen:
            raise TraceError(f"{trace.source}: location {trace.location} is also given by {seen[trace.location]}")
        seen[trace.location] = trace.source
    return traces
