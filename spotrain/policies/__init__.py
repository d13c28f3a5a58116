"""Placement policies: which offer the next worker gets, and which workers to retire.

Every policy sees the same PlacementContext (the fleet, preemptions and capacity failures per
location, progress against the deadline) and registers itself by name when its module is
imported; base.POLICY_MODULES names the module of each name, and `get_policy` imports it:

- `spotrain` (cost_per_sample.py): the default for clouds, cheapest expected cost per sample;
- `spread-cheapest` (spread.py): the simple spread used for the local provider;
- `on-demand`, `uniform-progress`, `eager-next-region` (baselines.py): the policies users have
  today, for the simulator to compare against.

The package itself imports only base.py (providers.base and the throughput model): config
checks a spec's policy name without importing any policy.
"""

from __future__ import annotations

from spotrain.policies.base import (
    FleetMember,
    PlacementContext,
    PlacementPolicy,
    check_policy_name,
    get_policy,
    policy_names,
)

__all__ = ["FleetMember", "PlacementContext", "PlacementPolicy", "check_policy_name", "get_policy", "policy_names"]
