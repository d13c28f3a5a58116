"""What the controller says and records when an agent kept failing: its last error lines, read
from the VM's log or console, and the run's end reason."""

from __future__ import annotations

from collections.abc import Callable

from spotrain.providers.base import ConsoleProvider, Instance, Provider, ProviderError


def agent_failure(provider: Provider, instance: Instance, cluster: str, say: Callable[[str], None]) -> str:
    """The end reason for an agent that kept failing, after its log's last error lines. A cloud VM
    that powered itself off after its agent's unit gave up (infra/spotrain-agent-failed.sh) left
    those lines and the exit status on its console: they are read first, then the VM is deleted
    (a stopped GCE VM still bills its disk)."""
    lines: list[str] = []
    detail = instance.end_detail
    if isinstance(provider, ConsoleProvider):
        from spotrain.logs import agent_lines, failed_exit, last_error_lines

        try:
            log = provider.console_output(instance.instance_id, instance.location)
            lines = last_error_lines(agent_lines(log))
            detail = failed_exit(log) or detail
        except ProviderError as error:
            lines = [f"(its log cannot be read: {error})"]
    try:
        provider.terminate(instance.instance_id)  # idempotent: a local VM or EC2 instance is gone already
    except ProviderError as error:
        say(f"deleting {instance.instance_id} failed: {error}")
    why = f"{instance.end_reason} ({detail})" if detail else f"{instance.end_reason}"
    say(f"the agent on {instance.instance_id} kept failing ({why}); its last lines:")
    for line in lines:
        say(f"  {line}")
    say(f"see `spotrain logs {cluster} {instance.instance_id}`")
    last = f": {lines[-1].strip()}" if lines else ""
    return f"{why} on {instance.instance_id}{last}"
