"""Checks what `make demo-geo` promises, then takes the emulated cloud down and checks that nothing
is left; exits 1 on a miss. Run as root, after `spotrain launch examples/local-geo.yaml`."""

import json
import subprocess
import sys

from spotrain.home import existing_cluster, home, ledger_path
from spotrain.ledger import Ledger
from spotrain.providers.local import LocalProvider
from spotrain.providers.local_leftovers import down_and_report
from spotrain.spec_file import stored_spec


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotrain", *args], capture_output=True, text=True, check=False)


report = json.loads(cli("report", "--json").stdout)
name = existing_cluster(None)
ledger = Ledger.open_existing(ledger_path(name))
spec = stored_spec(ledger.current_run().spec)
provider = LocalProvider(spec.providers.local, home() / "local-cloud")
locations = {row["location"] for row in report["spend_by_location"]}
checks = [
    (f"VMs in both regions ({', '.join(sorted(locations))})", len(locations) == 2),
    (f"training advanced (global epoch {report['epochs']}, loss {report['loss_first']} -> {report['loss_last']})",
     report["epochs"] > 0 and report["loss_last"] is not None and report["loss_last"] < report["loss_first"]),
    (f"preempted VMs replaced ({report['preemptions']} preemptions, {report['replacements']} replacements)",
     report["preemptions"] >= 1 and report["replacements"] >= report["preemptions"]),
    (f"a checkpoint in a region's bucket ({report['checkpoint_dir']}, epoch {report['checkpoint_epoch']})",
     str(report["checkpoint_dir"]).startswith("s3://") and report["checkpoint_epoch"] is not None),
    (f"spent within budget (${report['spent_usd']:.4f} <= ${report['budget_usd']:.2f})",
     report["spent_usd"] <= report["budget_usd"]),
]
sys.exit(down_and_report(checks, provider, name, home()))
