"""Progress of long commands and benchmarks, on stderr: stdout stays the command's result (one JSON
object under --json), and is never redirected (what a command prints there while the bars run stays
there). On a terminal rich draws an overall bar with a count and one bar per step, redrawn 4 times
a second (what a benchmark measures meanwhile shares the machine with that); anywhere else (a
pipe, a log file, TERM=dumb) nothing is drawn and each step is one plain line as it starts, so a
log shows what ran when, without a line per update."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepBars:
    """Named steps (a policy replayed, a trace set, a benchmark point), each from 0 to 1 through
    `update`; `substeps(n)` splits the current step into n named parts with a bar of their own.
    `start` and `update` are the sim engine's Progress protocol, so `compare(progress=...)` takes
    a StepBars or its substeps."""

    def __init__(self, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                             disable=not self.live, refresh_per_second=4, redirect_stdout=False)
        self.total_steps = max(1, total_steps)
        self.overall = self.bars.add_task("[bold]overall", total=self.total_steps, count=self._count(0))
        self.task: TaskID | None = None
        self.done = 0  # steps started
        self.began = time.monotonic()

    def __enter__(self) -> StepBars:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self._finish_step()
        self.bars.stop()
        if not self.live and kind is None:
            self.say(f"{self._count(self.done)} steps done in {self._elapsed()}")

    def start(self, name: str) -> None:
        """The next step begins (the one before it is done)."""
        self._finish_step()
        self.done += 1
        label = f"[{self.done}/{self.total_steps}] {name}"
        if self.live:
            self.task = self.bars.add_task(label, total=1.0, count="")
        else:
            self.say(f"{label}  ({self._elapsed()} in)")

    def update(self, fraction: float) -> None:
        """How far the current step is, from 0 to 1."""
        fraction = min(1.0, max(0.0, fraction))
        if self.task is not None:
            self.bars.update(self.task, completed=fraction, count=f"{fraction:>4.0%}")
        self.bars.update(self.overall, completed=max(0, self.done - 1) + fraction)

    def substeps(self, total: int) -> Substeps:
        """The current step as `total` named parts (the policies of one trace set, say)."""
        return Substeps(self, total)

    def say(self, line: str) -> None:
        """A plain line on the bars' console (above the bars on a terminal)."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _finish_step(self) -> None:
        if self.task is not None:
            self.bars.update(self.task, completed=1.0, count="done")
            self.task = None
        self.bars.update(self.overall, completed=self.done, count=self._count(self.done))

    def _count(self, finished: int) -> str:
        return f"{finished}/{self.total_steps}"

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self.began)
        return f"{seconds // 60}m{seconds % 60:02d}s"


class Substeps:
    """The parts of one step: one bar reused for each part (on a terminal), the step's own bar
    filling as the parts finish; elsewhere one indented line per part."""

    def __init__(self, parent: StepBars, total: int):
        self.parent = parent
        self.total = max(1, total)
        self.done = 0
        self.task: TaskID | None = None

    def start(self, name: str) -> None:
        self.done += 1
        label = f"    [{self.done}/{self.total}] {name}"
        bars = self.parent.bars
        if not self.parent.live:
            self.parent.say(label)
        elif self.task is None:
            self.task = bars.add_task(label, total=1.0, count="")
        else:
            bars.reset(self.task, description=label, total=1.0, count="")
        self.update(0.0)

    def update(self, fraction: float) -> None:
        fraction = min(1.0, max(0.0, fraction))
        if self.task is not None:
            self.parent.bars.update(self.task, completed=fraction, count=f"{fraction:>4.0%}")
        self.parent.update((self.done - 1 + fraction) / self.total)

    def close(self) -> None:
        """Drop the parts' bar (the step's own bar stays, with its time)."""
        if self.task is not None:
            self.parent.bars.remove_task(self.task)
            self.task = None

    def __enter__(self) -> Substeps:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
