"""A minimal built-in table of GCE spot prices, until spotrain/market.py's catalog replaces it.

Compute Engine has no API for live spot prices (they change at most once a day, published at
https://cloud.google.com/spot-vms/pricing). These are approximate us-central1 Spot list prices
in USD per hour (machine type incl. its built-in GPUs, without disks) from that page and from
https://cloud.google.com/compute/vm-instance-pricing; they were not re-checked on the day this
table was written (no network), so treat them as estimates. Override them per spec with
`providers.gcp.spot_prices_usd_per_hour`.
"""

from __future__ import annotations

# machine type -> (approximate us-central1 spot USD/h, GPU model or None)
SPOT_USD_PER_HOUR: dict[str, tuple[float, str | None]] = {
    "e2-standard-4": (0.040, None),
    "n1-standard-4": (0.042, None),
    "n2-standard-4": (0.047, None),
    "g2-standard-4": (0.280, "L4"),
    "g2-standard-8": (0.340, "L4"),
    "a2-highgpu-1g": (1.100, "A100"),
}


def spot_price(machine_type: str, overrides: dict[str, float] | None = None) -> float | None:
    if overrides and machine_type in overrides:
        return overrides[machine_type]
    entry = SPOT_USD_PER_HOUR.get(machine_type)
    return entry[0] if entry else None


def gpu_of(machine_type: str) -> str | None:
    entry = SPOT_USD_PER_HOUR.get(machine_type)
    return entry[1] if entry else None
