"""The simulator's clock: time moves only when the simulation advances it."""

from __future__ import annotations


class SimClock:
    def __init__(self, start: float = 0.0):
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
