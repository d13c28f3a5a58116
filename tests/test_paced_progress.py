"""Paced progress reports: fewer DHT stores per step, epoch changes and shutdown never delayed."""

import json
import subprocess
import sys
from pathlib import Path

from spotrain.kernels.paced_progress import _PacedSignal

HERE = Path(__file__).resolve().parent


def test_signal_lets_one_set_through_per_interval_and_urgent_ones_always():
    signal = _PacedSignal(interval=3600.0)
    signal.set()
    assert signal.is_set()  # the first one passes
    signal.clear()
    signal.set()
    assert not signal.is_set()  # within the interval: dropped
    signal.urgent = True
    signal.set()
    assert signal.is_set() and not signal.urgent  # urgent passes once, then pacing resumes
    signal.clear()
    signal.set()
    assert not signal.is_set()


def test_zero_interval_reports_every_step_as_hivemind_does():
    signal = _PacedSignal(interval=0.0)
    for _ in range(3):
        signal.set()
        assert signal.is_set()
        signal.clear()


def _peer(interval: float) -> list[str]:
    result = subprocess.run([sys.executable, str(HERE / "paced_tracker_peer.py"), str(interval)], cwd=HERE,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_real_dht_sees_paced_steps_prompt_epochs_and_a_prompt_shutdown():
    seen = _peer(3600.0)
    assert seen[:2] == ["steps held back", "epoch reported"]
    assert seen[2].startswith("shut down: True")  # not left waiting for the metadata refresh


def test_real_dht_sees_every_step_with_zero_interval():
    assert _peer(0.0)[0] == "steps reported"
