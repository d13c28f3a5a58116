"""The budget guarantee: never launch what the money left cannot pay, end the run in time.

Instances keep costing money between two controller ticks and while they drain after a
termination request, so the guard keeps a reserve of the fleet's burn over that window.
"""

from __future__ import annotations

from dataclasses import dataclass

LAUNCH_HORIZON_TICKS = 10  # a new instance must be payable for this many ticks beyond the reserve


@dataclass(frozen=True)
class BudgetGuard:
    total_usd: float
    tick_seconds: float
    termination_lag_seconds: float
    max_hourly_usd: float | None = None

    def reserve_usd(self, burn_usd_per_hour: float) -> float:
        """What the fleet may still cost after we decide to stop: a late tick, then the drain."""
        return burn_usd_per_hour * (2 * self.tick_seconds + self.termination_lag_seconds) / 3600.0

    def must_end(self, spent_usd: float, burn_usd_per_hour: float) -> bool:
        return spent_usd + self.reserve_usd(burn_usd_per_hour) >= self.total_usd

    def can_launch(self, spent_usd: float, burn_usd_per_hour: float, price_usd_per_hour: float) -> bool:
        burn = burn_usd_per_hour + price_usd_per_hour
        if self.max_hourly_usd is not None and burn > self.max_hourly_usd + 1e-12:
            return False
        horizon = self.reserve_usd(burn) + burn * LAUNCH_HORIZON_TICKS * self.tick_seconds / 3600.0
        return spent_usd + horizon < self.total_usd
