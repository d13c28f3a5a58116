from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from pydantic import ValidationError

from spotrain.errors import SpecError
from spotrain.spec_file import load_spec

GOOD = """
name: t1
budget: {total_usd: 1.0}
training: {task: "spotrain.examples.tiny_gpt:task"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_example_spec_loads():
    spec = load_spec(ROOT / "examples" / "local.yaml")
    assert spec.placement.workers == 3
    assert spec.allowed_locations() == ["local:zone-a", "local:zone-b"]
    with pytest.raises(ValidationError):
        spec.budget.total_usd = 3  # frozen


def test_defaults_enable_the_local_provider(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.providers.local is not None
    assert spec.provider_locations() == ["local:zone-a", "local:zone-b"]
    assert spec.allowed_locations() == ["local:zone-a", "local:zone-b"]
    assert "aws:us-east-1a" in spec.known_locations()  # the catalog: for plan and simulate


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "placement: {workers: 2, colour: red}\n", "placement.colour: unknown key"),
        (GOOD.replace("1.0", "-5"), "budget.total_usd: Input should be greater than 0 (got -5"),
        (GOOD.replace("tiny_gpt:task", "nope:task"), "training.task: cannot import 'spotrain.examples.nope'"),
        (GOOD.replace("tiny_gpt:task", "tiny_gpt:missing"),
         "training.task: module 'spotrain.examples.tiny_gpt' has no"),
        (GOOD + "placement: {locations: [aws:mars-1]}\n", "placement.locations.0: unknown location 'aws:mars-1'"),
        (GOOD + "training: [\n", "YAML syntax error"),
        (GOOD + "checkpoint: {stores: ['ftp://host/run']}\n", "checkpoint.stores: 0: checkpoint store 'ftp://host/run'"),
        (GOOD + "checkpoint: {stores: ['s3://b/run?endpont=x']}\n", "unknown option 'endpont'"),
        (GOOD + "checkpoint: {stores: ['/a', 'relative/dir']}\n", "checkpoint.stores: 1: store 'relative/dir' must be"),
        (GOOD + "checkpoint: {stores: ['/a', 'file:///a']}\n", "checkpoint.stores: 1: store 'file:///a' is listed"),
        (GOOD + "checkpoint: {stores: [{url: 'gs://b/r', domain: 'aws:mars-1'}]}\n",
         "checkpoint.stores.0.domain: unknown failure domain 'aws:mars-1'"),
        (GOOD.replace('task"}', 'task", compression: {gradients: zip}}'),  # one training key: twice is an error
         "training.compression.gradients: unknown codec 'zip'"),
    ],
)
def test_bad_specs_name_the_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_yaml_error_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\nbudget: {total_usd: 1\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+: YAML syntax error"):
        load_spec(path)


@pytest.mark.parametrize(
    "text",
    [GOOD + "bogus: 1\n", GOOD.replace("1.0", "-1"), GOOD.replace("tiny_gpt:task", "not_a_module_xyz:task"),
     "name: [unclosed\n"],
)
def test_cli_launch_with_bad_spec_exits_nonzero_with_one_line_and_writes_nothing(tmp_path, text):
    home = tmp_path / "home"
    path = write(tmp_path, text)
    result = run_cli("launch", str(path), home=home, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert result.stdout == ""
    assert not home.exists()


def test_cli_rejects_negative_budget_flag(tmp_path):
    home = tmp_path / "home"
    result = run_cli("launch", str(write(tmp_path, GOOD)), "--budget", "-3", home=home, timeout=120)
    assert result.returncode == 2
    assert "--budget" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not home.exists()


@pytest.mark.parametrize("command", [("launch",), ("plan",), ("simulate", "--trace", "TRACE")])
def test_cli_rejects_an_unknown_policy_in_one_line_naming_the_valid_ones(tmp_path, command):
    home = tmp_path / "home"
    path = write(tmp_path, GOOD + "placement: {policy: magic}\n")
    trace = tmp_path / "us-east-1a_v100_1.json"
    trace.write_text('{"metadata": {"gap_seconds": 600}, "data": [1, 1, 1]}')
    args = [str(trace) if arg == "TRACE" else arg for arg in command]
    result = run_cli(args[0], str(path), *args[1:], home=home, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}: placement.policy: unknown policy 'magic'; valid: eager-next-region, on-demand" in lines[0]
    assert "spotrain, spread-cheapest, uniform-progress" in lines[0]
    assert not home.exists()
