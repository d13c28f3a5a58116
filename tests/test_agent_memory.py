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
    buffers = [bytearray(int(sys.argv[2])) for _ in range(int(sys.argv[3]))]  # bytearray(n) zeroes every page
    del buffers
step()
before = faults()
for _ in range(10):
    step()
print(faults() - before)
"""
MEDIUM = (1 << 20, 24)  # bytes per buffer, buffers per step
LARGE = (64 << 20, 2)  # over glibc's largest mmap threshold (32 MiB): mapped on its own by default


def cycle_faults(mode: str, buffers: tuple[int, int] = MEDIUM) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode, *map(str, buffers)], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def step_pages(buffers: tuple[int, int]) -> int:
    return buffers[0] * buffers[1] // 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("buffers", [MEDIUM, LARGE], ids=["1 MiB buffers", "64 MiB buffers"])
def test_freed_buffers_are_reused_instead_of_faulted_in_again(buffers):
    # glibc's defaults hand most of each step's memory back to the OS and fault it in again
    assert cycle_faults("default", buffers) > 5 * step_pages(buffers)
    assert cycle_faults("keep", buffers) < step_pages(buffers) // 4  # kept: ten steps cost a fraction of one
