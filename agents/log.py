"""The agent's log: `HH:MM:SS agent: message` on stdout, the VM's console (spotrain.contracts.log_format)."""

from __future__ import annotations

import logging

_agent = logging.getLogger("spotrain.agent")  # shown as "agent"


def log(message: str) -> None:
    _agent.info(message)
