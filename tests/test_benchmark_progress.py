"""Progress of long commands and benchmarks stays on stderr: under --json, stdout is one JSON object.

The benchmark runs on a tiny trace written here (8 nodes for 12 hours, in bamboo's event format),
so it takes seconds and needs no shared data; once with stderr piped (a plain line per step) and
once with rich told stderr is a terminal (live bars)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from rich.console import Console

from spotrain.progress_bars import StepBars

SET = "bamboo p3"  # one trace set of planner_vs_baselines, picked by --only


def _tiny_data(tmp_path: Path) -> Path:
    folder = tmp_path / "data" / "bamboo" / "traces"
    folder.mkdir(parents=True)
    lines = [f"0,add,node{n}" for n in range(1, 9)] + ["43200000,remove,node1"]  # ms: a node leaves at 12 h
    (folder / "p3-trace.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "data"


def _planner_json(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "benchmarks" / "planner_vs_baselines.py"
    return subprocess.run([sys.executable, str(script), "--data", str(_tiny_data(tmp_path)), "--only", SET, "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "120", **env})


def _one_json_object(stdout: str) -> dict:
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout[:500]
    figures = json.loads(stdout)
    assert isinstance(figures, dict)
    return figures


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_the_planner_benchmark_draws_progress_on_stderr_and_prints_one_json_object(tmp_path, terminal):
    env = {"TTY_COMPATIBLE": "1", "TERM": "xterm"} if terminal else {"TTY_COMPATIBLE": "0"}
    result = _planner_json(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = _one_json_object(result.stdout)
    assert set(figures) == {"trace_sets", "planning"}
    [row] = figures["trace_sets"]
    assert row["trace_set"].startswith(SET) and set(row["policies"]) == {
        "spotrain", "eager-next-region", "uniform-progress", "on-demand", "oracle"}
    err = result.stderr
    assert f"[1/2] trace set: {SET}" in err and "[2/2] planning time" in err
    if terminal:  # rich's live display: the overall count and bars, drawn with cursor controls
        assert "overall" in err and "2/2" in err and "━" in err and "\x1b[" in err
    else:  # one plain line per step and per policy, nothing redrawn
        assert "\x1b[" not in err and "━" not in err
        lines = err.splitlines()
        assert [line.strip() for line in lines if line.startswith("    [")] == [
            "[1/5] spotrain", "[2/5] eager-next-region", "[3/5] uniform-progress", "[4/5] on-demand", "[5/5] oracle"]
        assert lines[-1].startswith("2/2 steps done in ")


def test_off_a_terminal_each_step_is_one_line_however_often_it_updates():
    out = io.StringIO()
    with StepBars(2, console=Console(file=out, width=80)) as bars:
        for name in ("first", "second"):
            bars.start(name)
            for i in range(1000):
                bars.update(i / 1000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("[1/2] first") and lines[1].startswith("[2/2] second")


def test_on_a_terminal_the_bars_leave_stdout_alone(capsys):
    out = io.StringIO()
    with StepBars(1, console=Console(file=out, force_terminal=True, width=80)) as bars:
        bars.start("a step")
        with bars.substeps(2) as parts:
            parts.start("part one")
            print("the result")  # what a command prints while its bars run stays on stdout
            parts.start("part two")
            parts.update(0.5)
    assert capsys.readouterr().out == "the result\n"
    drawn = out.getvalue()
    assert "the result" not in drawn and "[1/1] a step" in drawn and "1/1" in drawn
