"""Checks what `make demo-geo-swarm` promises (SWARM on the emulated multi-region cloud, stages
spanning regions), then takes the cloud down and checks that nothing is left; exits 1 on a miss.
Run as root with the demo's SPOTRAIN_HOME, after `spotrain launch examples/local-geo-swarm.yaml`:

    SPOTRAIN_HOME=.demo-geo-swarm .venv/bin/python examples/check_geo_swarm_demo.py

Every figure comes from the run's ledger and report (the stages the controller saw served, with the
regions of the instances serving them from its own instance list, not from what peers claim), the
agents' logs, the kernel's namespace list, the cgroup tree and /proc.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from spotrain.home import existing_cluster, home, ledger_path
from spotrain.ledger import Ledger
from spotrain.providers.geo_buckets import EMULATED_CREDENTIALS
from spotrain.providers.geo_network import entered
from spotrain.providers.local import LocalProvider
from spotrain.providers.local_leftovers import down_and_report
from spotrain.spec_file import stored_spec


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotrain", *args], capture_output=True, text=True, check=False)


def stage_checkpoints(store_url: str, namespace: str) -> set[int]:
    """The stages with a checkpoint manifest in a region's bucket, listed from inside the region (the
    buckets live in the emulated cloud, not on the host's network)."""
    import boto3

    parts = urlsplit(store_url)
    endpoint, prefix = parse_qs(parts.query)["endpoint"][0], parts.path.strip("/")
    manifest = re.compile(rf"^{re.escape(prefix)}/stage(\d+)/ckpt-\d{{8,}}-[^/]+\.json$")
    with entered(namespace):
        client = boto3.client("s3", endpoint_url=endpoint, region_name=EMULATED_CREDENTIALS["AWS_DEFAULT_REGION"],
                              aws_access_key_id=EMULATED_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=EMULATED_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=parts.netloc, Prefix=f"{prefix}/")
        keys = [item["Key"] for page in pages for item in page.get("Contents", ())]
    return {int(found.group(1)) for key in keys if (found := manifest.match(key))}


def checkpoints_in_buckets(spotrain_home: Path, name: str) -> dict[str, set[int]]:
    """Each store's domain -> the stages with a checkpoint in it (the e2e test waits on this too)."""
    ledger = Ledger.open_existing(spotrain_home / "clusters" / name / "ledger.db")
    spec = stored_spec(ledger.current_run().spec)
    ledger.close()
    plan = LocalProvider(spec.providers.local, spotrain_home / "local-cloud").cloud(name).plan
    namespace_of = {f"local:{region.name}": region.namespace for region in plan.regions}
    return {store.domain: stage_checkpoints(store.url, namespace_of[store.domain])
            for store in spec.checkpoint.stores if not isinstance(store, str)}


def main() -> int:
    report = json.loads(cli("report", "--json").stdout)
    name = existing_cluster(None)
    ledger = Ledger.open_existing(ledger_path(name))
    spec = stored_spec(ledger.current_run().spec)
    provider = LocalProvider(spec.providers.local, home() / "local-cloud")
    regions = {f"local:{region}" for region in spec.providers.local.regions}
    in_buckets = checkpoints_in_buckets(home(), name)
    wanted = spec.training.pipeline.stages

    # the stages as the controller saw them served, each time they changed
    stages_seen = [json.loads(row["detail"]) for row in ledger.events(report["run"], ("stages",))]
    complete = [i for i, stages in enumerate(stages_seen) if len(stages) == wanted]
    kept = bool(complete) and all(len(stages) == wanted and all(s["peers"] >= 1 for s in stages)
                                  for stages in stages_seen[complete[0]:])
    spanning = [stages for stages in stages_seen
                if len(stages) == wanted and all(set(s.get("domains", ())) == regions for s in stages)]
    each_spanned = {s["stage"] for stages in stages_seen for s in stages if set(s.get("domains", ())) == regions}
    retried = 0
    for log in (home() / "local-cloud" / "vms").glob("*/agent.log"):
        counts = re.findall(r"stage calls retried on another peer so far: (\d+)", log.read_text(errors="replace"))
        retried += max((int(c) for c in counts), default=0)
    region_of = {f"local:{zone}": location.region for zone, location in spec.providers.local.locations.items()}
    between = sum(p["gb"] for p in report["egress_by_path"]
                  if region_of.get(p["source"]) != region_of.get(p["destination"]))
    loss_first, loss_last = report["loss_first"], report["loss_last"]
    noticed = report["preemptions"] - report["preemptions_without_notice"]
    checks = [
        (f"the loss fell ({loss_first} -> {loss_last})",
         loss_first is not None and loss_last is not None and loss_last < loss_first),
        (f"every stage had peers in both regions ({sorted(each_spanned)} of {wanted} stages at some point)",
         each_spanned == set(range(wanted))),
        (f"all stages spanned both regions at once ({len(spanning)} of {len(stages_seen)} stage reports)",
         bool(spanning)),
        (f"every stage kept a serving peer ({len(stages_seen)} stage reports)", kept),
        (f"preemptions with notice ({noticed}) and without ({report['preemptions_without_notice']})",
         noticed >= 1 and report["preemptions_without_notice"] >= 1),
        (f"a preempted stage peer's microbatches were retried on another peer ({retried} calls)", retried >= 1),
        ("a stage checkpoint in each region's bucket ("
         + ", ".join(f"{domain}: stages {sorted(stages)}" for domain, stages in sorted(in_buckets.items())) + ")",
         set(in_buckets) == regions and all(in_buckets.values())),
        (f"traffic crossed between the regions ({between * 1e3:.1f} MB)", between > 0),
        (f"spent within budget (${report['spent_usd']:.4f} <= ${report['budget_usd']:.2f})",
         report["spent_usd"] <= report["budget_usd"]),
    ]
    return down_and_report(checks, provider, name, home())


if __name__ == "__main__":
    sys.exit(main())
