"""training.compression in the spec, and the traffic and codecs `spotrain report` shows."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from spotrain.errors import SpecError
from spotrain.kernels.table import SPEC_CODECS, nominal_ratio
from spotrain.ledger import Ledger
from spotrain.report import build_report, print_report
from spotrain.spec_file import load_spec

SPEC = """
name: t1
budget: {{total_usd: 1.0}}
training: {{compression: {{gradients: {gradients}, state: {state}}}}}
"""


def spec_file(tmp_path: Path, gradients: str, state: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC.format(gradients=gradients, state=state))
    return path


@pytest.mark.parametrize("gradients, state", [("none", "none"), ("float16", "uniform8"),
                                              ("blockwise8", "blockwise8"), ("blockwise4", "float16"),
                                              ("powersgd:4", "blockwise8")])
def test_every_codec_of_the_table_is_accepted(tmp_path, gradients, state):
    spec = load_spec(spec_file(tmp_path, gradients, state))
    assert (spec.training.compression.gradients, spec.training.compression.state) == (gradients, state)


@pytest.mark.parametrize("gradients, state, expected", [
    ("zip", "none", ("training.compression.gradients: unknown codec 'zip'; valid: none, float16, uniform8, "
                     "blockwise8, blockwise4, powersgd:RANK")),
    ("powersgd:0", "none", "training.compression.gradients: unknown codec 'powersgd:0'"),
    ("powersgd:RANK", "none", "training.compression.gradients: unknown codec 'powersgd:RANK'"),
    ("none", "powersgd:2", ("training.compression.state: unknown codec 'powersgd:2'; valid: none, float16, "
                            "uniform8, blockwise8, blockwise4 (got")),
    ("none", "blockwise16", "training.compression.state: unknown codec 'blockwise16'"),
])
def test_unknown_codecs_are_one_line_errors_naming_the_key_and_the_valid_names(tmp_path, gradients, state,
                                                                                expected):
    path = spec_file(tmp_path, gradients, state)
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert str(error.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(error.value)


def test_nominal_ratios_of_the_table():
    ratios = {name: nominal_ratio(name) for name in SPEC_CODECS[:-1]}
    assert ratios["none"] == 1.0 and ratios["float16"] == 2.0 and ratios["uniform8"] == 4.0
    assert 3.9 < ratios["blockwise8"] < 4.0 and 7.5 < ratios["blockwise4"] < 8.0
    assert nominal_ratio("powersgd:8") is None


def test_report_shows_traffic_per_worker_and_the_codecs(tmp_path):
    ledger = Ledger.create(tmp_path / "ledger.db")
    spec = {"training": {"compression": {"gradients": "blockwise4", "state": "powersgd:2"}}}
    run = ledger.open_run(1.0, spec, now=100.0)
    status = {"state": "training", "epoch": 3, "samples": 640, "samples_per_second": 10.0, "loss": 2.5}
    ledger.record_metrics(run.id, 110.0, [dict(status, instance_id="i-a", bytes_sent=4_000_000,
                                               bytes_received=3_500_000),
                                          dict(status, instance_id="i-b", bytes_sent=1_250_000,
                                               bytes_received=2_000_000)])
    report = build_report(ledger, run, "t1")
    assert report["compression"]["gradients"]["codec"] == "blockwise4"
    assert report["compression"]["gradients"]["nominal_ratio"] == pytest.approx(nominal_ratio("blockwise4"))
    assert report["compression"]["state"]["nominal_ratio"] is None  # unknown to this table: no guess
    json.dumps(report)
    console = Console(record=True, width=120)
    print_report(report, console)
    text = console.export_text()
    assert "tensor traffic by worker" in text
    assert "i-a" in text and "4.00" in text and "3.50" in text and "1.25" in text
    assert "blockwise4 (7.76x)" in text
