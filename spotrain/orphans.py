"""Keep a killed controller from leaving processes behind.

hivemind runs its DHT in a forked child, which starts p2pd. If the controller dies by SIGKILL,
both would live on. The DHT child asks the kernel for SIGTERM when its parent dies, and on
SIGTERM kills its own children (p2pd) before it exits.
"""

from __future__ import annotations

import ctypes
import os
import signal

from spotrain.agents.process_tree import children_of

PR_SET_PDEATHSIG = 1


def _kill_children_and_exit(*_: object) -> None:
    for child in children_of(os.getpid()):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def die_with_parent() -> None:
    """Call first thing in a forked child."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _kill_children_and_exit)
    if os.getppid() != parent:  # the parent died before prctl took effect
        _kill_children_and_exit()
