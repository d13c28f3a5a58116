"""A user's own code, without a swarm: the spec's code_dir, stored specs read without the task,
`spotrain init`, refused locations, provider errors in one line, an agent that keeps failing, the
`workers N/M` line, and the log helpers behind `spotrain logs`."""

import sys
import textwrap
import time

import pytest
from conftest import run_cli, wait_for

from spotrain.config import ClusterSpec
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.states import LIVE_STATES
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.errors import SpecError, SpotrainError
from spotrain.ledger import Ledger
from spotrain.logs import LogSource, _added, follow, last_error_lines
from spotrain.providers.local import LocalProvider
from spotrain.scaffold import cluster_name_for, write_skeleton
from spotrain.spec_file import load_spec, stored_spec

TASK = textwrap.dedent("""
    from spotrain.examples.tiny_gpt import task as tiny
    task = tiny
""")


@pytest.fixture
def clean_import_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_spec puts code_dir first; undone after the test


def test_the_task_is_imported_from_the_spec_folder_or_code_dir(tmp_path, clean_import_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "task_from_code_dir.py").write_text(TASK)
    (tmp_path / "task_beside_the_spec.py").write_text(TASK)
    beside = tmp_path / "a.yaml"
    beside.write_text("name: a\nbudget: {total_usd: 1}\ntraining: {task: 'task_beside_the_spec:task'}\n")
    assert load_spec(beside).training.code_dir == str(tmp_path)
    elsewhere = tmp_path / "b.yaml"
    elsewhere.write_text("name: b\nbudget: {total_usd: 1}\n"
                         "training: {task: 'task_from_code_dir:task', code_dir: code}\n")
    spec = load_spec(elsewhere)
    assert spec.training.code_dir == str(tmp_path / "code") and sys.path[0] == str(tmp_path / "code")
    assert stored_spec(spec.model_dump(mode="json")) == spec  # what the ledger keeps loads back the same


def test_a_stored_spec_is_read_without_importing_its_task(tmp_path):
    data = {"name": "gone", "budget": {"total_usd": 1}, "training": {"task": "no_such_module_anywhere:task"}}
    assert stored_spec(data).training.task == "no_such_module_anywhere:task"
    path = tmp_path / "c.yaml"
    path.write_text("name: gone\nbudget: {total_usd: 1}\ntraining: {task: 'no_such_module_anywhere:task'}\n")
    with pytest.raises(SpecError, match="training.task: cannot import 'no_such_module_anywhere'"):
        load_spec(path)  # a spec given to launch or plan still imports its task


def test_init_writes_a_task_and_a_spec_that_loads_and_never_overwrites(tmp_path, clean_import_path):
    folder = tmp_path / "My Model_2"
    _, spec_path = write_skeleton(folder)
    spec = load_spec(spec_path)
    assert spec.name == cluster_name_for(folder) == "my-model-2"
    assert spec.training.task == "my_task:task" and spec.training.code_dir == str(folder)
    assert spec.providers.enabled() == ["local"]
    with pytest.raises(SpotrainError, match="already exist"):
        write_skeleton(folder)
    with pytest.raises(SpotrainError, match="--name"):
        write_skeleton(tmp_path / "other", name="Bad Name")


def test_the_skeleton_tasks_loss_falls_from_its_first_epoch_on(tmp_path, clean_import_path):
    """Trained as the swarm trains it (one optimizer step per global epoch of target_batch_size
    samples), the skeleton's loss on held-out samples is below its start after each of its first
    epochs: at lr=3e-3 the first step overshot (0.43 -> 1.24), and a short run could end above its start."""
    import importlib

    import torch

    _, spec_path = write_skeleton(tmp_path / "m")
    training = load_spec(spec_path).training
    task = importlib.import_module("my_task").task
    model = task.build_model()
    optimizer = task.make_optimizer(model.parameters())
    steps_per_epoch = training.target_batch_size // training.batch_size
    batches, held_out = task.batches(7, training.batch_size), next(task.batches(99, 2048))
    with torch.no_grad():
        start = float(task.loss(model, held_out))
    for _ in range(4):
        optimizer.zero_grad()
        for _ in range(steps_per_epoch):
            (task.loss(model, next(batches)) / steps_per_epoch).backward()
        optimizer.step()
        with torch.no_grad():
            assert float(task.loss(model, held_out)) < 0.8 * start


def test_launch_refuses_a_location_no_enabled_provider_serves(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: az\nbudget: {total_usd: 1}\nplacement: {locations: [local:zone-a, azure:eastus-1]}\n")
    for command in ("plan", "launch"):
        result = run_cli(command, str(config), "--duration", "5", home=tmp_path / "home", timeout=120) \
            if command == "launch" else run_cli(command, str(config), home=tmp_path / "home", timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        enabled = "enabled " * (command == "launch")
        assert result.stderr.strip() == (f"spotrain: error: placement.locations: no {enabled}"
                                         "provider serves azure:eastus-1 (spotrain launches on local, aws, gcp only)")
    assert not (tmp_path / "home" / "clusters").exists()  # nothing launched, no ledger
    config.write_text("name: aw\nbudget: {total_usd: 10}\nplacement: {gpu: [T4], locations: [aws:us-east-1a]}\n")
    planned = run_cli("plan", str(config), home=tmp_path / "home", timeout=120)
    assert planned.returncode == 0, planned.stderr  # a what-if from the catalog, before setting aws up
    assert ("aws:us-east-1a is planned from catalog prices: `launch` needs it served (set providers.aws)"
            in planned.stderr)
    launched = run_cli("launch", str(config), home=tmp_path / "home", timeout=120)
    assert launched.returncode == 2 and launched.stderr.strip() == (
        "spotrain: error: placement.locations: no enabled provider serves aws:us-east-1a (set providers.aws)")


def test_plan_without_aws_credentials_plans_from_the_catalog_with_one_note(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    config = tmp_path / "c.yaml"
    config.write_text("name: aw\nbudget: {total_usd: 10}\nproviders: {aws: {regions: [us-east-1]}}\n")
    result = run_cli("plan", str(config), home=tmp_path / "home", timeout=120)
    assert result.returncode == 0, result.stderr  # a dry run needs no credentials: the catalog prices it
    assert result.stderr.strip() == ("aws: no usable credentials (prices in us-east-1); "
                                     "planning with the catalog's prices")


class Swarm:
    def __init__(self):
        self.records: dict[str, AgentStatus] = {}

    def statuses(self):
        return dict(self.records)

    def addresses(self):
        return []

    def assign_duty(self, ids):
        pass


def status(instance_id: str, state: str) -> AgentStatus:
    return AgentStatus(instance_id, state, epoch=1, samples=10, samples_per_second=5.0, loss=1.0, bytes_sent=0,
                       bytes_received=0, checkpoint_epoch=None, addresses=(), time=time.time())


def make_loop(tmp_path, workload: list[str], workers: int, said: list[str]) -> ControlLoop:
    # these workloads never drain: a 1 s notice ends their VMs at finish() at once, not after 10 s
    spec = ClusterSpec.model_validate({"name": "c", "budget": {"total_usd": 5.0}, "placement": {"workers": workers},
                                       "providers": {"local": {"time_compression": 0.001, "notice_seconds": 1.0}}})
    ledger = Ledger.create(tmp_path / "ledger.db")
    run = ledger.open_run(5.0, spec.model_dump(mode="json"), now=time.time())
    provider = LocalProvider(spec.providers.local, tmp_path / "cloud", workload=workload)
    return ControlLoop(spec, ledger, run, provider, Swarm(), LoopSettings(), say=said.append)


def test_workers_counts_agents_that_train_not_vms(tmp_path):
    said: list[str] = []
    loop = make_loop(tmp_path, [sys.executable, "-c", "import time; time.sleep(600)"], 2, said)
    try:
        loop.tick()
        assert said[-1].startswith("workers 0/2 (+2 starting)  epoch 0")  # the line right after launching
        first, second = [i.instance_id for i in loop.provider.list_instances("c")]
        loop.swarm.records = {first: status(first, "training"), "i-not-ours": status("i-not-ours", "training")}
        loop._last_line = 0.0
        loop.tick()
        assert said[-1].startswith("workers 1/2 (+1 starting)  epoch 1")
        loop.swarm.records[second] = status(second, "draining")
        loop._last_line = 0.0
        loop.tick()
        # the draining VM's replacement, launched in this tick, is starting
        assert said[-1].startswith("workers 1/2 (+1 starting) (+1 draining)  epoch 1")
        assert len(loop.ledger.instances(states=LIVE_STATES)) == 3
    finally:
        loop.finish("test over")
        loop.ledger.close()


def test_a_vm_asked_for_and_not_yet_running_counts_as_starting(tmp_path):
    said: list[str] = []
    loop = make_loop(tmp_path, [sys.executable, "-c", "import time; time.sleep(600)"], 1, said)
    try:
        loop.tick()
        assert said[-1].startswith("workers 0/1 (+1 starting)")
        # a cloud that has not answered yet: the ledger holds the request, no instance id
        loop.ledger.record_request(loop.run.id, "r-pending", "local", "local:zone-a", 0.1, time.time())
        assert [r.state for r in loop.ledger.instances() if r.request_id == "r-pending"] == ["requested"]
        loop._last_line = 0.0
        loop._progress_line(time.time(), loop.last_observed)
        assert said[-1].startswith("workers 0/1 (+2 starting)")
    finally:
        loop.finish("test over")
        loop.ledger.close()


def test_an_agent_that_keeps_failing_ends_the_run_with_its_error_lines(tmp_path):
    crash = [sys.executable, "-c", "print('agent: starting', flush=True); import my_missing_dependency"]
    said: list[str] = []
    loop = make_loop(tmp_path, crash, 2, said)
    try:
        wait_for(lambda: loop.tick() or loop.ended.is_set(), 90, "the run to end", every=0.5)
        assert loop.failed and loop.end_reason is not None and loop.end_reason.startswith("agent failed (exit 1) on i-")
        assert loop.end_reason.endswith("ModuleNotFoundError: No module named 'my_missing_dependency'")
        assert "  Traceback (most recent call last):" in said
        assert any(line.startswith("see `spotrain logs c i-") for line in said)
        assert len(loop.ledger.instances()) == 2  # nothing launched after the failure: no replacement
        assert loop.ledger.current_run().end_reason == loop.end_reason
    finally:
        loop.ledger.close()


def test_last_error_lines_start_at_the_last_traceback():
    log = "agent: starting\nTraceback (most recent call last):\n  old\nOldError\nagent: starting\n" \
          "Traceback (most recent call last):\n  File 'x'\nValueError: boom\n"
    assert last_error_lines(log) == ["Traceback (most recent call last):", "  File 'x'", "ValueError: boom"]
    assert last_error_lines("\n".join(f"line {n}" for n in range(20))) == [f"line {n}" for n in range(8, 20)]
    assert last_error_lines("") == []


def test_a_long_traceback_is_printed_from_its_header_and_a_far_one_is_cut_to_the_last_lines():
    frames = [f'  File "m.py", line {n}, in f{n}\n    f{n + 1}()\n    ^^^^^^^^' for n in range(10)]
    log = "agent: starting\nTraceback (most recent call last):\n" + "\n".join(frames) + "\nRecursionError: deep\n"
    lines = last_error_lines(log)  # 32 lines: more than 12, and not from a stray `^^^^` line
    assert lines[0] == "Traceback (most recent call last):" and lines[-1] == "RecursionError: deep"
    assert len(lines) == 32
    far = log + "".join(f"agent: retry {n}\n" for n in range(40))  # its header is 41+ lines back
    assert last_error_lines(far) == [f"agent: retry {n}" for n in range(28, 40)]


def test_a_cloud_consoles_failure_marker_gives_the_agents_lines_and_exit():
    from spotrain.logs import agent_lines, failed_exit

    console = ("[  0.0] Linux version 6.8\ncloud-init: running modules\n"
               "spotrain: agent failed (exit 1); powering off\n"
               "spotrain: agent failed: Traceback (most recent call last):\n"
               "spotrain: agent failed:   File \"t.py\", line 1\n"
               "spotrain: agent failed: RuntimeError: no\n[  9.9] reboot: Power down\n")
    assert last_error_lines(agent_lines(console)) == [
        "Traceback (most recent call last):", '  File "t.py", line 1', "RuntimeError: no"]
    assert failed_exit(console) == "exit 1"
    assert agent_lines("agent: plain log\n") == "agent: plain log\n" and failed_exit("agent: plain log") is None


def test_follow_prints_the_tail_then_what_is_added_with_labels():
    out: list[str] = []
    one = [LogSource("a", "a", lambda: "1\n2\n3\n")]
    follow(lambda: one, 2, out.append, every=0.0, rounds=1)
    assert "".join(out) == "2\n3\n"  # one source: no label
    out.clear()
    rounds = iter([{"a": "1\n2\n", "b": ""}, {"a": "1\n2\n3\npar", "b": "x\n"}, {"a": "1\n2\n3\npartial\n"}])
    current: dict[str, str] = {}

    def refresh():
        current.update(next(rounds))
        return [LogSource(name, name, lambda name=name: current[name]) for name in current]

    follow(refresh, 0, out.append, every=0.0, rounds=3)
    assert "".join(out) == "[a] 1\n[a] 2\n[a] 3\n[b] x\n[a] partial\n"  # half a line waits for its end


def test_added_survives_a_console_that_dropped_its_start():
    assert _added("a\nb\n", "a\nb\nc\n") == "c\n"
    shown = "".join(f"line {n}\n" for n in range(100))
    assert _added(shown, shown[-400:] + "line 100\n") == "line 100\n"
    assert _added("gone\n", "other\n") == "other\n"
