#!/bin/sh
# Run by spotrain-agent-failed.service once systemd gave up on the agent (5 crashes in 10 minutes,
# or exit 78: a config no restart can fix). Says why on the console, where the controller reads it
# (EC2 console output, GCE serial port 1), then powers the VM off: the controller sees a VM that
# ended itself, prints these lines, launches nothing more and deletes it (spotrain.logs reads the
# marker: keep its words in step with AGENT_FAILED_MARKER and AGENT_FAILED_HEADER).
unit=spotrain-agent.service
# a unit waiting to restart, or stopped by a shutdown, has not failed for good: leave the VM be
systemctl is-failed --quiet "$unit" || exit 0
status=$(systemctl show -p ExecMainStatus --value "$unit")
case $(systemctl show -p ExecMainCode --value "$unit") in
  1) how="exit $status" ;;  # CLD_EXITED
  *) how="signal $status" ;;  # killed or dumped
esac
echo "spotrain: agent failed ($how); powering off"
# the agent's own lines only (_SYSTEMD_UNIT: not systemd's messages about the unit)
journalctl --no-pager --output=cat --lines=60 "_SYSTEMD_UNIT=$unit" | sed 's/^/spotrain: agent failed: /'
systemctl poweroff
