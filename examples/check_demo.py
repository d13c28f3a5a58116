"""Checks what `make demo` promises, from the ledger of the demo's run; exits 1 on a miss."""

import json
import subprocess
import sys

from spotrain.home import existing_cluster, ledger_path
from spotrain.ledger import Ledger

report = json.loads(subprocess.run([sys.executable, "-m", "spotrain", "report", "--json"], check=True,
                                   capture_output=True, text=True).stdout)
with_notice = report["preemptions"] - report["preemptions_without_notice"]
ledger = Ledger.open_existing(ledger_path(existing_cluster(None)))
global_epoch_by_tick: dict[float, int] = {}
for m in ledger.metrics(report["run"]):
    global_epoch_by_tick[m["t"]] = max(global_epoch_by_tick.get(m["t"], 0), m["epoch"])
timeline = [global_epoch_by_tick[t] for t in sorted(global_epoch_by_tick)]
never_fell = all(b >= a for a, b in zip(timeline, timeline[1:]))
loss_first, loss_last = report["loss_first"], report["loss_last"]
checks = [
    (f"at least 3 workers launched ({report['workers_launched']})", report["workers_launched"] >= 3),
    (f"at least 2 preemptions with notice survived ({with_notice})", with_notice >= 2),
    (f"at least 1 kill without notice survived ({report['preemptions_without_notice']})",
     report["preemptions_without_notice"] >= 1),
    (f"the global epoch kept rising (0 -> {report['epochs']}, never fell)", report["epochs"] > 0 and never_fell),
    (f"the loss fell ({loss_first} -> {loss_last})",
     loss_first is not None and loss_last is not None and loss_last < loss_first),
    (f"spent within budget (${report['spent_usd']:.4f} <= ${report['budget_usd']:.2f})",
     report["spent_usd"] <= report["budget_usd"]),
]
for text, ok in checks:
    print(f"{'ok  ' if ok else 'MISS'} {text}")
sys.exit(0 if all(ok for _, ok in checks) else 1)
