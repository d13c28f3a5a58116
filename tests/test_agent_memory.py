"""The agent keeps freed memory for reuse (agents/memory.py), counted in page faults, not time."""

import subprocess
import sys

import pytest

# A training step's pattern: many medium buffers (activations) allocated, written, all freed.
# Print the page faults of 10 such steps after a first one.
CYCLES = """
import resource, sys
if sys.argv[1] == "keep":
    from spotrain.agents.memory import keep_freed_memory
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    buffers = [bytearray(1 << 20) for _ in range(24)]  # bytearray(n) writes zeros into every page
    del buffers
step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""
STEP_PAGES = 24 * (1 << 20) // 4096


def cycle_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # glibc's defaults hand most of each step's memory back to the OS and fault it in again
    assert cycle_faults("default") > 5 * STEP_PAGES
    assert cycle_faults("keep") < STEP_PAGES // 4  # kept: ten steps cost a fraction of one step's pages
