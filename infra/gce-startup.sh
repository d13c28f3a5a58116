#!/bin/sh
# GCE runs this on every boot (cloud-init's runcmd runs on the first only): keep the agent up.
systemctl start spotrain-agent.service || true
