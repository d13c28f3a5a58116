"""Checks what the SWARM demo (examples/local-swarm.yaml) promises, from its ledger, report and the
local VMs' agent logs; exits 1 on a miss. Run with the demo's SPOTRAIN_HOME after the run:

    SPOTRAIN_HOME=.demo-swarm .venv/bin/python examples/check_swarm_demo.py
"""

import json
import re
import subprocess
import sys

from spotrain.home import existing_cluster, home, ledger_path
from spotrain.ledger import Ledger

report = json.loads(subprocess.run([sys.executable, "-m", "spotrain", "report", "--json"], check=True,
                                   capture_output=True, text=True).stdout)
ledger = Ledger.open_existing(ledger_path(existing_cluster(None)))
stages_seen = [json.loads(row["detail"]) for row in ledger.events(report["run"], ("stages",))]
wanted = 3
# every stage record list the controller kept, after the pipeline was first complete, has every stage served
complete = [i for i, stages in enumerate(stages_seen) if len(stages) == wanted]
kept = bool(complete) and all(len(stages) == wanted and all(s["peers"] >= 1 for s in stages)
                              for stages in stages_seen[complete[0]:])
retried = 0
for log in (home() / "local-cloud" / "vms").glob("*/agent.log"):
    counts = re.findall(r"stage calls retried on another peer so far: (\d+)", log.read_text(errors="replace"))
    retried += max((int(c) for c in counts), default=0)
loss_first, loss_last = report["loss_first"], report["loss_last"]
checks = [
    (f"at least 1 preemption of a VM survived ({report['preemptions']})", report["preemptions"] >= 1),
    (f"every stage kept a serving peer ({len(stages_seen)} stage reports)", kept),
    (f"a preempted stage peer's microbatches were retried on another peer ({retried} calls)", retried >= 1),
    (f"the loss fell ({loss_first} -> {loss_last})",
     loss_first is not None and loss_last is not None and loss_last < loss_first),
    (f"spent within budget (${report['spent_usd']:.4f} <= ${report['budget_usd']:.2f})",
     report["spent_usd"] <= report["budget_usd"]),
]
for text, ok in checks:
    print(f"{'ok  ' if ok else 'MISS'} {text}")
sys.exit(0 if all(ok for _, ok in checks) else 1)
