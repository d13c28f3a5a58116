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
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from spotrain.errors import SpotrainError
from spotrain.textfiles import UnreadableText, read_user_text

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


MAX_TRACE_BYTES = 64 << 20
MAX_TRACE_SECONDS = 10 * 365 * 86_400.0  # a trace longer than ten years is a unit mistake
_ROW_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


@contextmanager
def _at(path: Path, where: str) -> Iterator[None]:
    """Any error parsing the part of the file at `where` ("line 7", "data[3]") names the file and it."""
    try:
        yield
    except _ROW_ERRORS as error:
        reason = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise TraceError(f"{path}: {where}: {reason}") from None


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} {value!r} is not a number")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{what} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {str(value)[:40]} is not finite")
    return number


def _capacity(value: object) -> int:
    number = _number(value, "capacity")
    if number < 0:
        raise ValueError(f"capacity {value!r} is below 0")
    return int(number)


def _seconds(value: object, scale: float = 1.0) -> float:
    seconds = _number(value, "time") * scale
    if not math.isfinite(seconds):
        raise ValueError(f"time {value!r} is out of range")
    return seconds


def _steps(points: list[tuple[float, int]], path: Path) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if not points:
        raise TraceError(f"{path}: empty trace")
    points.sort(key=lambda p: p[0])
    start = points[0][0]
    if points[-1][0] - start > MAX_TRACE_SECONDS:
        raise TraceError(f"{path}: spans {points[-1][0] - start:.3g} s, more than ten years")
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
    with _at(path, "metadata.gap_seconds"):
        gap = _number(data["metadata"]["gap_seconds"], "gap")
        if gap <= 0:
            raise ValueError(f"gap {gap:g} is not above 0")
    values, prices = data["data"], data.get("prices")
    if not isinstance(values, list) or not values:
        raise TraceError(f"{path}: empty trace")
    if prices is not None and (not isinstance(prices, list) or len(prices) != len(values)):
        raise TraceError(f"{path}: 'prices' is no list of {len(values)} points, as 'data' is")
    points = []
    for index, value in enumerate(values):
        with _at(path, f"data[{index}]"):
            points.append((_seconds(index * gap), _capacity(value)))
    for index, price in enumerate(prices or ()):
        with _at(path, f"prices[{index}]"):
            if _number(price, "price") <= 0:
                raise ValueError(f"price {price!r} is not above 0")
    return points, tuple(float(p) for p in prices) if prices else None


def _csv_rows(text: str, path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every line that holds something."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error as error:  # a cell past csv's field size limit
            raise TraceError(f"{path}: line {number}: {error}") from None
        if any(cell.strip() for cell in cells):
            rows.append((number, cells))
    if not rows:
        raise TraceError(f"{path}: empty trace")
    return rows


def load_trace(path: Path) -> LocationTrace:
    path = Path(path)
    try:
        text = read_user_text(path, MAX_TRACE_BYTES)
    except UnreadableText as error:
        raise TraceError(f"{path}: {error}") from None
    location, gpu = _location_and_gpu(path)
    prices = None
    if not text.strip():
        raise TraceError(f"{path}: empty trace")
    points = _parse(text, path)
    if isinstance(points, tuple):
        points, prices = points
    times, capacity = _steps(points, path)
    if prices is not None and len(prices) != len(times):
        prices = None  # duplicate times were merged; prices no longer line up
    return LocationTrace(location, gpu, times, capacity, prices, str(path))


def _json(text: str, path: Path, where: str = "") -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = where or f"line {error.lineno}, column {error.colno}"
        raise TraceError(f"{path}: {at}: not JSON: {error.msg}") from None
    except RecursionError:
        raise TraceError(f"{path}: {where or 'JSON'} nested too deeply") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise TraceError(f"{path}: {where or 'JSON'}: {error}") from None


def _parse(text: str, path: Path):
    stripped = text.lstrip()
    if stripped.startswith("{"):
        data = _json(text, path)
        if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict) or "data" not in data:
            raise TraceError(f"{path}: unknown trace format (JSON without 'metadata' and 'data')")
        return _spot_traces_json(data, path)
    if stripped.startswith("["):
        return _parcae_json_lines(text, path)
    rows = _csv_rows(text, path)
    first = rows[0][1]
    if len(first) == 3 and first[1].strip() in ("add", "remove"):
        return _bamboo_events(rows, path)
    if len(first) == 3 and re.match(r"^\d{4}-\d{2}-\d{2}$", first[0].strip()):
        return _bamboo_gcloud(rows, path)
    if len(first) == 2:  # (time, count) steps
        hours = "_scaled" in path.name or "p2-xlarge" in path.name
        milliseconds = path.parent.name == "traces" and path.name == "p3.csv"  # Parcae's t_ms
        scale = 3600.0 if hours else 0.001 if milliseconds else 1.0
        points = []
        for number, row in rows:
            with _at(path, f"line {number}"):
                t, count = row
                points.append((_seconds(t, scale), _capacity(count)))
        return points
    raise TraceError(f"{path}: unknown trace format ({len(first)} columns at line {rows[0][0]})")


def _parcae_json_lines(text: str, path: Path) -> list[tuple[float, int]]:
    """`[t_ms, "add"|"remove"|..., {"nodes": [...]}]` per line."""
    count, points = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        item = _json(line, path, f"line {number}")
        with _at(path, f"line {number}"):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], dict)
                    and isinstance(item[2].get("nodes", []), list)):
                raise ValueError('expected [t_ms, "add" or "remove", {"nodes": [...]}]')
            t_ms, event, detail = item
            nodes = len(detail.get("nodes", []))
            count += nodes if event == "add" else -nodes if event == "remove" else 0
            points.append((_seconds(t_ms, 0.001), _capacity(count)))
    return points


def _bamboo_events(rows: list[tuple[int, list[str]]], path: Path) -> list[tuple[float, int]]:
    """`t_ms,add|remove,nodeN` per line."""
    count, points = 0, []
    for number, row in rows:
        with _at(path, f"line {number}"):
            t_ms, event, _node = row
            if event.strip() not in ("add", "remove"):
                raise ValueError(f"event {event.strip()!r} is neither add nor remove")
            count += 1 if event.strip() == "add" else -1
            points.append((_seconds(t_ms, 0.001), _capacity(count)))
    return points


def _bamboo_gcloud(rows: list[tuple[int, list[str]]], path: Path) -> list[tuple[float, int]]:
    """`YYYY-MM-DD, HH:MM:SS, count` per line."""
    stamps = []
    for number, row in rows:
        with _at(path, f"line {number}"):
            day, clock, count = row
            stamps.append((datetime.strptime(f"{day.strip()} {clock.strip()}", "%Y-%m-%d %H:%M:%S"), _capacity(count)))
    start = stamps[0][0]
    return [((stamp - start).total_seconds(), count) for stamp, count in stamps]


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
        if trace.horizon <= 0:
            raise TraceError(f"{trace.source}: one point in time: a trace to replay needs two at least")
        if trace.location in seen:
            raise TraceError(f"{trace.source}: location {trace.location} is also given by {seen[trace.location]}")
        seen[trace.location] = trace.source
    return traces
