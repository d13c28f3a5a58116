"""Progress bars for long commands, on stderr: stdout stays the command's result (one JSON object
under --json). rich draws them only on a terminal; piped, nothing is drawn and nothing is lost."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class StepBars:
    """One bar per named step (a policy replayed, a benchmark point), each from 0 to 1."""

    def __init__(self, total_steps: int, console: Console | None = None):
        self.total_steps = total_steps
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                             TimeElapsedColumn(), console=console or Console(stderr=True), transient=False)
        self.task: TaskID | None = None
        self.done = 0

    def __enter__(self) -> StepBars:
        self.bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.bars.stop()

    def start(self, name: str) -> None:
        if self.task is not None:
            self.bars.update(self.task, completed=1.0)
        self.done += 1
        self.task = self.bars.add_task(f"[{self.done}/{self.total_steps}] {name}", total=1.0)

    def update(self, fraction: float) -> None:
        if self.task is not None:
            self.bars.update(self.task, completed=fraction)
