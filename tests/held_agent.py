"""`spotrain agent` with its role held at one point of the drain, past any drain window: for a
test to see the window end on each path of agents/daemon.py (`Agent._abandon`).

    python tests/held_agent.py step|shutdown USER_DATA

The role is the one the daemon would choose (`role_for`), wrapped; everything else is the real
agent. `step`: once the notice stops the training, the role does not return from its work, as a
step waiting in averaging on a peer that never answers does; the window ends before the agent
leaves the swarm. `shutdown`: the role's shutdown (the optimizer's averagers) starts HOLD_SECONDS
late; the window ends while the agent leaves the swarm, before hivemind is shut down.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from spotrain.agents.daemon import Agent, role_for
from spotrain.agents.log import log
from spotrain.agents.roles.base import Role, RoleContext
from spotrain.contracts.agent_config import AgentConfig
from spotrain.contracts.log_format import configure as configure_logging

HOLD_SECONDS = 120.0  # far past a test's drain window: the test's own wait for the exit fails first
HOLDS = ("step", "shutdown")


class HeldRole:
    """`inner`, held for HOLD_SECONDS at `hold`: after its work ("step") or before its shutdown."""

    def __init__(self, inner: Role, hold: str):
        self.inner, self.hold = inner, hold

    def start(self, context: RoleContext) -> None:
        self.inner.start(context)

    def run_until(self, stop: threading.Event) -> None:
        self.inner.run_until(stop)
        self._held("step")

    def flush_duty(self) -> None:
        self.inner.flush_duty()

    def shutdown(self) -> None:
        self._held("shutdown")
        self.inner.shutdown()

    def _held(self, point: str) -> None:
        if self.hold == point:
            log(f"test role: {point} held for {HOLD_SECONDS:.0f}s")
            time.sleep(HOLD_SECONDS)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in HOLDS:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(HOLDS)} USER_DATA")
    configure_logging()
    user_data = Path(sys.argv[2])
    config = AgentConfig.from_json(user_data.read_text(), source=user_data)
    sys.exit(Agent(config, role=HeldRole(role_for(config), sys.argv[1])).run())
