"""The session-wide process check fails a test that leaves a process behind, even one orphaned to
init, kills it, and passes a test that cleans up after itself (an inner pytest run on a small file)."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import processes_under

LEAKY = '''
import os, subprocess, sys

def test_cleans_up(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    child.kill(); child.wait()

def test_leaves_an_orphan(tmp_path):
    os.system("LEAKY_MARK={mark} sleep 300 &")  # the shell exits: the sleep is orphaned to init, its environment ours
'''


def test_a_process_left_by_a_test_fails_it_and_is_killed(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY.replace("{mark}", str(tmp_path)))
    tests = Path(__file__).parent
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "process_leaks", "-p", "no:cacheprovider",
                             str(tmp_path / "test_leaky.py")], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tests), "SPOTRAIN_LEAK_GRACE_SECONDS": "1"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 passed, 1 error" in result.stdout, result.stdout
    assert "test_leaves_an_orphan" in result.stdout and "left 1 process(es) running (killed now)" in result.stdout
    assert processes_under(tmp_path) == []  # the orphan is dead
