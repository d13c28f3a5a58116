"""How fast a placement trains: samples/s per GPU type, and what communication between
locations takes away (the granularity of Erben et al., VLDB 2024: compute time / communication
time per optimizer step).

Per-GPU rates are relative to one T4 and scaled by the task's T4 rate; the spec may override
them (`training.throughput`), and agents' reported samples/s correct them at run time.
`ClusterSpec.task_profile()` is the one way a spec becomes a profile, for plan, launch and simulate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from spotrain.kernels.table import nominal_ratio
from spotrain.market import Location, egress_usd_per_gb

# Training speed relative to one T4 (mixed precision, transformer-like models); public benchmark ratios.
RELATIVE_GPU_SPEED = {"T4": 1.0, "K80": 0.35, "L4": 2.0, "A10G": 2.2, "V100": 2.6, "A100": 6.0, "H100": 12.0}
CPU_SPEED = 0.3  # a CPU-only VM (and the local provider's processes), relative to a T4

# Single-stream bandwidth, bits/s. Between continents one TCP stream gets 50-80 Mbit/s.
BANDWIDTH_BPS = {"same-zone": 5e9, "same-region": 2e9, "same-continent": 5e8, "cross-provider": 3e8,
                 "intercontinental": 6.5e7}
EPOCH_OVERHEAD_SECONDS = 2.0  # matchmaking and bookkeeping per averaging round
# Wire share of a codec whose size depends on the model's shapes (PowerSGD): a rough estimate.
MODEL_DEPENDENT_WIRE_RATIO = 0.25


def relation(a: Location, b: Location) -> str:
    if a == b:
        return "same-zone"
    if a.provider == b.provider and a.region == b.region:
        return "same-region"
    if a.continent != b.continent:
        return "intercontinental"
    return "same-continent" if a.provider == b.provider else "cross-provider"


@lru_cache(maxsize=65536)
def bandwidth_bps(a: Location, b: Location) -> float:
    return BANDWIDTH_BPS[relation(a, b)]


@dataclass(frozen=True)
class TaskProfile:
    t4_samples_per_second: float = 100.0
    model_bytes: float = 4 * 125e6  # fp32 parameters of the model that is averaged
    target_batch_size: int = 4096
    compression_ratio: float = 1.0  # bytes on the wire / fp32 bytes
    per_gpu: dict[str, float] = field(default_factory=dict)  # samples/s overrides by GPU type

    def rate(self, gpu: str | None, gpu_count: int = 1) -> float:
        if gpu in self.per_gpu:
            return self.per_gpu[gpu] * max(1, gpu_count)
        speed = RELATIVE_GPU_SPEED.get(gpu or "", CPU_SPEED)
        return self.t4_samples_per_second * speed * max(1, gpu_count)


def wire_ratio(codec: str) -> float:
    """Bytes on the wire per fp32 byte of a gradient codec."""
    fp32_bytes_per_wire_byte = nominal_ratio(codec)
    return MODEL_DEPENDENT_WIRE_RATIO if fp32_bytes_per_wire_byte is None else 1.0 / fp32_bytes_per_wire_byte


@lru_cache(maxsize=16)
def counted_parameters(task: str, pipeline: bool = False) -> int:
    """Parameters of the task's model, built once per task (this imports torch and the user's code);
    of a pipeline task, its largest stage's (what a stage peer averages)."""
    from spotrain.contracts.task import load_pipeline_task, load_task

    if pipeline:
        stages = load_pipeline_task(task)
        return max(sum(p.numel() for p in stages.build_stage(i).parameters()) for i in range(stages.num_stages))
    return sum(p.numel() for p in load_task(task).build_model().parameters())


@dataclass(frozen=True)
class Worker:
    location: Location
    gpu: str | None
    gpu_count: int = 1


@dataclass(frozen=True)
class FleetEstimate:
    samples_per_second: float
    compute_seconds_per_epoch: float
    communication_seconds_per_epoch: float
    egress_usd_per_hour: float

    @property
    def granularity(self) -> float:
        comm = self.communication_seconds_per_epoch
        return float("inf") if comm == 0 else self.compute_seconds_per_epoch / comm


def estimate(workers: Sequence[Worker], profile: TaskProfile) -> FleetEstimate:
    """Samples/s and egress cost of data-parallel training over these workers (no overlap of
    communication and compute: a conservative model)."""
    if not workers:
        return FleetEstimate(0.0, float("inf"), 0.0, 0.0)
    compute_rate = sum(profile.rate(w.gpu, w.gpu_count) for w in workers)
    compute = profile.target_batch_size / compute_rate
    n = len(workers)
    if n == 1:
        return FleetEstimate(compute_rate, compute, 0.0, 0.0)
    # butterfly all-reduce: each peer sends and receives 2 (n-1)/n of the model per round
    bytes_per_peer = 2.0 * profile.model_bytes * profile.compression_ratio * (n - 1) / n
    # per distinct location (a fleet is a few places, many workers): O(places^2), not O(workers^2)
    count: dict[Location, int] = {}
    for w in workers:
        count[w.location] = count.get(w.location, 0) + 1
    places = list(count)
    links = [bandwidth_bps(a, b) for i, a in enumerate(places) for b in places[i + 1:]]
    links += [bandwidth_bps(a, a) for a in places if count[a] > 1]
    comm = bytes_per_peer * 8.0 / min(links) + EPOCH_OVERHEAD_SECONDS
    rate = profile.target_batch_size / (compute + comm)
    epochs_per_hour = 3600.0 / (compute + comm)
    share = bytes_per_peer / (n - 1) / 1e9  # each peer's bytes go evenly to the others
    egress = sum(share * count[a] * count[b] * _egress(a, b) for a in places for b in places if a != b)
    return FleetEstimate(rate, compute, comm, egress * epochs_per_hour)


_egress = lru_cache(maxsize=65536)(egress_usd_per_gb)
