"""A newcomer's own model through the installed `spotrain` command, run from the task's folder:
init, launch on the local provider, export, the HTML report in headless Chromium, then every
read-only command once the task is gone; and a task that only fails inside the agents, which
ends the run with the agent's error."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from conftest import processes_under, wait_for
from report_page import ARTIFACTS, plot_boxes, require_chromium, screenshot, undrawn

from spotrain.cli import RUN_FAILED_EXIT


def spotrain(*args: str, home: Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script, as a user runs it: its folder, not the current one, is on its import path."""
    script = Path(sys.executable).parent / "spotrain"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "spotrain"]
    env = dict(os.environ, SPOTRAIN_HOME=str(home))
    env.pop("PYTHONPATH", None)
    return subprocess.run([*command, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def follow_until(args: list[str], home: Path, cwd: Path, wanted: list[str], limit: float = 120.0) -> str:
    """What a command that never ends by itself (`logs -f`) printed once every `wanted` text showed
    (or `limit` seconds passed); it must still be running then."""
    script = Path(sys.executable).parent / "spotrain"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "spotrain"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"SPOTRAIN_HOME": str(home)}
    process = subprocess.Popen([*command, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: all(text in "".join(seen) for text in wanted) or process.poll() is not None, limit,
                 f"`spotrain {' '.join(args)}` printing {wanted}")
        assert process.poll() is None, f"`spotrain {' '.join(args)}` ended by itself"
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=5)
    return "".join(seen)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def module_from(path: Path):
    spec = importlib.util.spec_from_file_location(f"user_task_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`spotrain init` into a fresh folder, then 40 s of training launched from that folder."""
    tmp_path = tmp_path_factory.mktemp("own-model")
    home, folder = tmp_path / "home", tmp_path / "my model"
    ok(spotrain("init", str(folder), home=home, cwd=tmp_path))
    out = ok(spotrain("launch", "spotrain.yaml", "--duration", "40", "--no-report", home=home, cwd=folder))
    assert "workers 2/2" in out and "run ended: duration reached" in out
    yield home, folder
    spotrain("down", home=home, cwd=tmp_path)


def test_the_own_model_trains_and_exports_to_plain_torch(trained, tmp_path):
    home, folder = trained
    report = json.loads(ok(spotrain("report", "--json", home=home, cwd=folder)))
    assert report["epochs"] >= 2 and report["samples"] > 0
    assert report["loss_last"] < report["loss_first"]
    planned = json.loads(ok(spotrain("plan", "spotrain.yaml", "--json", home=home, cwd=folder)))
    assert report["planned"] == {key: planned[key] for key in  # what `plan` says, kept by launch
                                 ("samples_per_second", "cost_per_million_samples_usd", "usd_per_hour")}
    terminal = ok(spotrain("report", home=home, cwd=folder))
    assert f"{planned['samples_per_second']:.1f} -> {report['samples_per_second']:.1f}" in terminal
    model_file = tmp_path / "model.pt"
    assert "written to" in ok(spotrain("export", "my-model", str(model_file), home=home, cwd=tmp_path))
    weights = torch.load(model_file, weights_only=True)
    model = module_from(folder / "my_task.py").task.build_model()
    untrained = {key: value.clone() for key, value in model.state_dict().items()}
    model.load_state_dict(weights)  # the exported file is the model's own state_dict
    assert any(not torch.equal(untrained[key], value) for key, value in weights.items())


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S+: ")  # spotrain.contracts.log_format


def test_every_log_line_of_the_run_is_in_the_one_format_without_tracebacks(trained):
    """The controller's log and each agent's, through a clean drain at the duration's end."""
    home, _ = trained
    logs = [home / "clusters" / "my-model" / "controller.log", *sorted(home.glob("local-cloud/vms/*/agent.log"))]
    assert len(logs) >= 3
    for path in logs:
        lines = path.read_text().splitlines()
        assert lines, path
        assert [line for line in lines if not LOG_LINE.match(line) or "Traceback" in line] == [], path
    # each agent's last line: drained, or its drain window ended first (a step still waiting on the
    # peer that drained sooner; agents/daemon.py abandons it and ends every process it started)
    ends = (" agent: drained", " agent: drain window ending with a step still in flight: abandoning it",
            " agent: drain window ending while leaving the swarm: exiting now")
    assert all(path.read_text().splitlines()[-1].endswith(ends) for path in logs[1:])


def test_the_html_report_of_the_run_renders_every_plot_in_chromium(trained, tmp_path):
    """Every plot draws data of the run (report_page.undrawn: each `data-` artist laid out with a box),
    no console error, and the page and its screenshot kept in build/test-artifacts (SPOTRAIN_TEST_ARTIFACTS)."""
    require_chromium()
    home, folder = trained
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = ARTIFACTS / "report.html"
    ok(spotrain("report", "--html", str(page), home=home, cwd=folder))
    picture, console = screenshot(page, "report.png", tmp_path)
    assert picture.stat().st_size > 10_000 and console == []
    plots = plot_boxes(page, tmp_path)
    assert [plot["plot"] for plot in plots] == ["spend", "fleet", "progress", "cost"]
    assert undrawn(plots) == [], plots
    names = {element for plot in plots for element, _, _ in plot["data"]}
    assert {"data-spend", "data-progress-rate", "data-progress-loss", "data-cost-spot-0"} <= names
    assert sum(name.startswith("data-fleet-bar-") for name in names) >= 2  # both workers' bars


def test_the_read_only_commands_work_once_the_task_is_gone(trained, tmp_path):
    home, folder = trained
    report = json.loads(ok(spotrain("report", "--json", home=home, cwd=folder)))
    (folder / "my_task.py").unlink()  # the user's code is gone: nothing below may need it
    assert json.loads(ok(spotrain("status", "my-model", "--json", home=home, cwd=tmp_path)))["cluster"] == "my-model"
    assert json.loads(ok(spotrain("report", "--json", home=home, cwd=tmp_path)))["samples"] == report["samples"]
    logs = ok(spotrain("logs", home=home, cwd=tmp_path))
    assert "==> controller (" in logs
    assert "ending the run: duration reached" in logs and "agent: joined the swarm" in logs
    controller_only = ok(spotrain("logs", "--controller", "-n", "0", home=home, cwd=tmp_path))
    assert "agent:" not in controller_only and "launched i-" in controller_only
    instance = next(line.split(" launched ")[1].split()[0] for line in controller_only.splitlines()
                    if " controller: launched i-" in line)  # HH:MM:SS controller: launched i-... (the one format)
    one = ok(spotrain("logs", instance, "-n", "3", home=home, cwd=tmp_path))  # the only cluster's instance
    assert one.startswith(f"==> {instance} (local:") and len(one.splitlines()) == 4
    followed = follow_until(["logs", "-f", "-n", "1"], home, tmp_path, ["[controller] ", f"[{instance}] "])
    assert "[controller] " in followed and f"[{instance}] " in followed
    ok(spotrain("down", home=home, cwd=tmp_path))
    ok(spotrain("export", "my-model", str(tmp_path / "again.pt"), home=home, cwd=tmp_path))
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")


AGENTS_ONLY_FAILURE = textwrap.dedent("""
    import os

    if "SPOTRAIN_METADATA_URL" in os.environ:  # set for agents only, by their VM
        raise RuntimeError("this task only imports in the controller")
    from spotrain.examples.tiny_gpt import task
""")


def test_a_task_that_fails_in_every_agent_stops_the_controller_with_the_agents_error(tmp_path):
    home, folder = tmp_path / "home", tmp_path / "broken"
    folder.mkdir()
    (folder / "broken_task.py").write_text(AGENTS_ONLY_FAILURE)
    (folder / "spec.yaml").write_text("name: broken\nbudget: {total_usd: 0.5}\ntraining: {task: 'broken_task:task'}\n"
                                      "placement: {workers: 1}\nproviders: {local: {time_compression: 1}}\n")
    result = spotrain("launch", "spec.yaml", "--duration", "300", home=home, cwd=folder)
    assert result.returncode == RUN_FAILED_EXIT == 1, result.stdout + result.stderr  # the task ended the run
    out = result.stdout
    assert "RuntimeError: this task only imports in the controller" in out
    ended = next(line for line in out.splitlines() if "run ended: " in line)
    assert "agent failed (exit 1) on i-" in ended and ended.endswith(
        "RuntimeError: this task only imports in the controller")
    assert "workers 1/1" not in out  # a VM that runs is not a worker that trains
    report = json.loads(ok(spotrain("report", "--json", home=home, cwd=folder)))
    assert report["workers_launched"] == 1 and report["samples"] == 0
    assert wait_for(lambda: processes_under(home) == [], 30, "no process left")
