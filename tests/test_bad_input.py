"""Every bad input is one line naming the file and the key, value or line: specs, command-line
numbers, traces and ledgers (docs/bad-input.md lists each case and its answer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from typer.testing import CliRunner

from spotrain.cli import app
from spotrain.errors import SpecError
from spotrain.ledger import Ledger
from spotrain.sim.traces import TraceError, load_trace, load_traces
from spotrain.spec_file import load_spec

GOOD = "name: t1\nbudget: {total_usd: 1.0}\n"


def cli(*args: str, home: Path):
    """The CLI in this process (the same code as `spotrain`, without an interpreter start per case)."""
    return CliRunner().invoke(app, list(args), env={"SPOTRAIN_HOME": str(home)})


def spec_file(tmp_path: Path, content: str | bytes, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def spec_error(path: Path) -> str:
    with pytest.raises(SpecError) as error:
        load_spec(path)
    return str(error.value)


# -- specs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)), "a binary file, not text (NUL byte at offset 0)"),
    (b"name: t\xe9st\n", "not UTF-8 text (byte 0xe9 at offset 7)"),
    (GOOD + "budget: {total_usd: 999}\n", "line 3, column 1: duplicate key 'budget' (first given at line 2)"),
    ("name: t1\nbudget: {total_usd: 1, total_usd: 2}\n", "line 2, column 24: duplicate key 'total_usd'"),
    ("name: t1\nbudget: " + "[" * 100_000 + "\n", "nested deeper than 32 levels"),
    ('{"name": "t1", "budget": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 32 levels"),
    ("name: t1\nbudget: {total_usd: .inf}\n", "budget.total_usd: Input should be a finite number (got inf)"),
    ("name: t1\nbudget: {total_usd: .nan}\n", "budget.total_usd: Input should be a finite number (got nan)"),
    (GOOD + "placement: {workers: 100000000}\n",
     "placement.workers: Input should be less than or equal to 1000 (got 100000000)"),
    (GOOD + "training: {throughput: {T4: .nan}}\n", "training.throughput.T4: Input should be a finite number"),
    (GOOD + "providers: {local: {time_compression: .inf}}\n", "providers.local.time_compression: Input should be"),
    (GOOD + "providers: {local: {locations: {z: {price_usd_per_hour: 1, trace_offset_hours: 1e300}}}}\n",
     "providers.local.locations.z.trace_offset_hours: Input should be less than or equal to 87600"),
    (GOOD + "extra: 2001-02-30\n", "line 3, column 8: bad value '2001-02-30': day is out of range for month"),
    (GOOD + "placement: {workers: !!int abc}\n", "line 3, column 22: bad value 'abc'"),
    (GOOD + "x: \x07\n", "line 3: YAML syntax error: unacceptable character #x0007"),
    (GOOD + '"a\\nb": 1\n', "a\\nb: unknown key"),
    (GOOD + 'training: {task: "os:getenv"}\n',
     "training.task: building the task 'os:getenv' failed: TypeError: getenv() missing 1 required"),
])
def test_bad_specs_are_one_line_naming_the_file_and_the_key_or_line(tmp_path, content, expected):
    path = spec_file(tmp_path, content)
    message = spec_error(path)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message


def test_several_problems_are_listed_one_line_each(tmp_path):
    path = spec_file(tmp_path, "name: T1\nbudget: {total_usd: .inf}\ntraining: {throughput: {T4: .nan, V100: -5}}\n"
                               "colour: red\n")
    lines = spec_error(path).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "name", "budget.total_usd", "training.throughput.T4", "training.throughput.V100", "colour"]
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_a_flood_of_problems_lists_ten_and_counts_the_rest(tmp_path):
    path = spec_file(tmp_path, GOOD + "placement: {gpu: [" + ", ".join(["[1]"] * 500) + "]}\n")
    lines = spec_error(path).splitlines()
    assert len(lines) == 11 and lines[-1] == f"{path}: and 490 more errors"


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_a_spec_that_is_no_file_is_one_line_and_never_hangs(tmp_path, kind):
    path = tmp_path / "cluster.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes it: opening it plainly would block forever
    elif kind == "directory":
        path.mkdir()
    expected = {"fifo": "not a regular file (a FIFO, socket or device)", "directory": "cannot read: Is a directory",
                "missing": "cannot read: No such file or directory"}[kind]
    assert spec_error(path) == f"{path}: {expected}"


def test_merge_keys_may_be_overridden_without_counting_as_duplicates(tmp_path):
    path = spec_file(tmp_path, GOOD + "training: {<<: {batch_size: 4}, batch_size: 8}\n")
    assert load_spec(path).training.batch_size == 8


def test_the_sane_upper_bounds_leave_real_specs_alone(tmp_path):
    spec = load_spec(spec_file(tmp_path, GOOD + "placement: {workers: 1000, backups: 1000}\n"))
    assert (spec.placement.workers, spec.placement.backups) == (1000, 1000)
    assert load_spec(spec_file(tmp_path, "name: t1\nbudget: {total_usd: 1e308}\n")).budget.total_usd == 1e308


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", GOOD + "budget: {total_usd: 2}\n"])
def test_cli_launch_of_a_bad_spec_is_one_line_nonzero_and_writes_nothing(tmp_path, content):
    home = tmp_path / "home"
    path = spec_file(tmp_path, content)
    result = run_cli("launch", str(path), home=home, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"spotrain: error: {path}: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not home.exists()


def test_cli_lists_every_spec_problem_each_on_an_error_line(tmp_path):
    path = spec_file(tmp_path, "name: T1\nbudget: {total_usd: .inf}\nplacement: {workers: 0}\n")
    result = cli("plan", str(path), home=tmp_path / "home")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"spotrain: error: {path}: ") for line in lines)


# -- command-line numbers -----------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--budget", "nan"), ("--budget", "inf"), ("--budget", "-1"), ("--budget", "0"),
    ("--duration", "nan"), ("--duration", "inf"), ("--duration", "0"), ("--duration", "-5"),
    ("--duration", "1e300"), ("--tick", "nan"), ("--tick", "inf"), ("--tick", "0"), ("--target-epoch", "0"),
])
def test_cli_numbers_must_be_finite_and_in_range(tmp_path, flag, value):
    home = tmp_path / "home"
    path = spec_file(tmp_path, GOOD)
    result = cli("launch", str(path), "--detach", flag, value, home=home)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"spotrain: error: {flag}: ")
    assert "Traceback" not in result.stderr
    assert not home.exists()  # refused before anything is written


@pytest.mark.parametrize("command, value", [("plan", "nan"), ("plan", "0"), ("simulate", "0.01"),
                                            ("simulate", "inf")])
def test_plan_and_simulate_ticks_must_be_finite_and_in_range(tmp_path, command, value):
    path = spec_file(tmp_path, GOOD)
    trace = tmp_path / "us-east-1a_v100_1.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, 1, 0]}))
    extra = ["--trace", str(trace)] if command == "simulate" else []
    result = cli(command, str(path), *extra, "--tick", value, home=tmp_path / "home")
    assert result.exit_code == 2 and result.stderr.startswith("spotrain: error: --tick: ")
    assert len(result.stderr.splitlines()) == 1


# -- traces -------------------------------------------------------------------------------------

def trace_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("b.json", b"\xff\xfe\x00garbage", "a binary file, not text (NUL byte at offset 2)"),
    ("l.csv", b"0,add,n\xe9\n", "not UTF-8 text (byte 0xe9 at offset 7)"),
    ("a.json", '{"metadata": {"gap_seconds": 60}, "data": [1e999]}', "data[0]: capacity inf is not finite"),
    ("g.json", '{"metadata": {"gap_seconds": NaN}, "data": [1, 1]}', "metadata.gap_seconds: gap nan is not finite"),
    ("z.json", '{"metadata": {"gap_seconds": 0}, "data": [1, 1]}', "metadata.gap_seconds: gap 0 is not above 0"),
    ("m.json", '{"metadata": {}, "data": [1, 1]}', "metadata.gap_seconds: missing 'gap_seconds'"),
    ("p.json", '{"metadata": {"gap_seconds": 60}, "data": [1, 1], "prices": [1, -1]}',
     "prices[1]: price -1 is not above 0"),
    ("d.json", '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ("j.json", '{"metadata": {"gap_seconds": 60},\n "data": [1, 1,]}', "line 2, column 16: not JSON"),
    ("trace_1.txt", '[0, "add", {"nodes": [1, 2]}]\n[0, "add", 5]\n', "line 2: expected [t_ms"),
    ("trace_2.txt", '[0, "add", {"nodes": [1]}]\n[60000, "remove", {"nodes": [1, 2]}]\n',
     "line 2: capacity -1 is below 0"),
    ("c.csv", "0,3\n60,-7\n", "line 2: capacity '-7' is below 0"),
    ("t.csv", "0,3\n1e400,2\n", "line 2: time 1e400 is not finite"),
    ("y.csv", "0,3\n1e12,2\n", "spans 1e+12 s, more than ten years"),
    ("e.csv", "0,add,n1\n10,oops,n2\n", "line 2: event 'oops' is neither add nor remove"),
    ("f.csv", "0,add,n1\n\n10,add\n", "line 3: not enough values to unpack (expected 3, got 2)"),
    ("h.txt", "2023-01-01, 00:00:00, 3\n2023-13-01, 00:00:00, 2\n", "line 2: time data '2023-13-01 00:00:00'"),
    ("w.csv", ",,\n , \n", "empty trace"),
    ("k.csv", "0," + "9" * 200_000 + "\n", "line 1: field larger than field limit"),
])
def test_bad_traces_are_one_line_naming_the_file_and_line(tmp_path, name, content, expected):
    path = trace_file(tmp_path, name, content)
    with pytest.raises(TraceError) as error:
        load_trace(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_a_trace_fifo_is_refused_at_once(tmp_path):
    path = tmp_path / "us-east-1a_v100_1.csv"
    os.mkfifo(path)
    with pytest.raises(TraceError, match="not a regular file"):
        load_traces([path])


def test_a_trace_of_one_point_in_time_cannot_be_replayed(tmp_path):
    path = trace_file(tmp_path, "us-east-1a_v100_1.json", '{"metadata": {"gap_seconds": 60}, "data": [1]}')
    assert load_trace(path).horizon == 0  # readable (real Bamboo files are like this) ...
    with pytest.raises(TraceError, match="one point in time"):
        load_traces([path])  # ... but not a job's market


def test_cli_simulate_of_a_binary_trace_is_one_line(tmp_path):
    path = spec_file(tmp_path, GOOD)
    trace = trace_file(tmp_path, "us-east-1a_v100_1.json", os.urandom(64) + b"\0")
    result = run_cli("simulate", str(path), "--trace", str(trace), home=tmp_path / "home", timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"spotrain: error: {trace}: ")
    assert len(result.stderr.splitlines()) == 1


# -- ledgers ------------------------------------------------------------------------------------

def real_ledger(home: Path) -> Path:
    path = home / "clusters" / "t1" / "ledger.db"
    ledger = Ledger.create(path)
    run = ledger.open_run(1.0, {"name": "t1", "budget": {"total_usd": 1.0}}, now=100.0)
    for i in range(2000):
        ledger.record_metrics(run.id, 100.0 + i, [{"instance_id": "i-1", "state": "training", "epoch": i,
                                                   "samples": i, "samples_per_second": 1.0, "loss": 1.0,
                                                   "bytes_sent": 0, "bytes_received": 0}])
    ledger._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ledger.close()
    return path


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "directory"])
@pytest.mark.parametrize("command", ["status", "report", "down"])
def test_a_damaged_ledger_is_one_line_naming_it(tmp_path, damage, command):
    home = tmp_path / "home"
    path = real_ledger(home)
    data = path.read_bytes()
    path.unlink()
    damaged = {"random": os.urandom(5000), "truncated": data[: len(data) // 3], "empty": b"", "directory": None}[damage]
    if damaged is None:
        path.mkdir()
    else:
        path.write_bytes(damaged)
    result = cli(command, "t1", home=home)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"spotrain: error: {path}: ")
    assert damaged is None or path.read_bytes() == damaged  # nothing written into it
    if damage != "truncated":  # refused before SQLite opens it (which adds its -wal and -shm files)
        assert not list(path.parent.glob("ledger.db-*"))


def test_launch_on_a_garbage_ledger_is_one_line_naming_it(tmp_path):
    home = tmp_path / "home"
    ledger = home / "clusters" / "t1" / "ledger.db"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(os.urandom(4096))
    result = run_cli("launch", str(spec_file(tmp_path, GOOD)), home=home, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"spotrain: error: {ledger}: not a spotrain ledger (no SQLite header); " \
                            f"move it away to start afresh\n"
