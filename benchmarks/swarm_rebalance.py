"""SWARM: rebalancing after half of one stage's peers are killed, activation bytes, memory per
stage peer, loss against data parallelism. Needs root (a CPU cgroup per stage peer).

Rebalancing: `--peers` stage peers per stage of a 2-stage tiny GPT (`tiny_gpt_pipeline:task_2stage`),
each a real `spotrain agent` in its own cgroup with `--quota` of a core, and one trainer. Throughput
is the trainer's completed samples/s (from its status records). Phases: balanced; then half of
stage 0's peers killed without notice, measured two rebalance periods later, in a run where stage
peers rebalance and in the same run repeated with rebalancing off.

    sudo .venv/bin/python benchmarks/swarm_rebalance.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from swarm_cluster import LocalSwarm  # noqa: E402

TASK = "spotrain.examples.tiny_gpt_pipeline:task_2stage"
NEVER = 1e6  # rebalance_seconds that never comes within a run


def rebalance_run(args: argparse.Namespace, rebalance: bool) -> dict[str, object]:
    period = args.period if rebalance else NEVER
    with tempfile.TemporaryDirectory(prefix="spotrain-swarm-bench-") as work:
        swarm = LocalSwarm(Path(work), TASK, stages=2, rebalance_seconds=period)
        try:
            swarm.start_view()
            for index in range(2 * args.peers):
                swarm.start(f"peer{index}", "stage", cgroup=True)
            _wait(lambda: _spread(swarm, args.peers), 300, "stage peers spread over the stages")
            swarm.start("trainer", "trainer", cgroup=False)
            swarm.set_quota(args.quota)
            _wait(lambda: _measured(swarm, args.peers), 300, "every stage peer measured")
            time.sleep(args.window / 2)  # settle under the quota
            balanced = swarm.throughput("trainer", args.window)
            victims = sorted(r.instance_id for r in swarm.serving()[0])[: args.peers // 2]
            for victim in victims:
                swarm.kill(victim)
            killed_at = time.monotonic()
            time.sleep(max(0.0, 2 * args.period - (time.monotonic() - killed_at)))
            after = swarm.throughput("trainer", args.window)
            stages = {stage: len(records) for stage, records in swarm.serving().items()}
            return {"rebalance": rebalance, "balanced": balanced, "after_kill": after, "killed": victims,
                    "peers_per_stage_after": stages}
        finally:
            swarm.stop()


def _spread(swarm: LocalSwarm, peers: int) -> bool:
    serving = swarm.serving()
    return sorted(len(serving.get(stage, [])) for stage in range(2)) == [peers, peers]


def _measured(swarm: LocalSwarm, peers: int) -> bool:
    serving = swarm.serving()
    found = swarm.trainer_samples("trainer")
    return (_spread(swarm, peers) and all(r.samples_per_second > 0 for rs in serving.values() for r in rs)
            and found is not None and found[1] > 0)


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as error:  # noqa: BLE001 - the DHT may not answer while agents start
            print(f"  waiting for {what}: {error!r}", file=sys.stderr)
        time.sleep(2)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="stage peers per stage (even, at least 4)")
    parser.add_argument("--quota", type=float, default=0.15, help="each stage peer's CPU quota, in cores")
    parser.add_argument("--period", type=float, default=20.0, help="rebalance_seconds")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3, help="loss runs per mode (the mean is compared)")
    parser.add_argument("--samples", type=int, default=4096, help="samples per loss run")
    parser.add_argument("--target-batch", type=int, default=16,
                        help="samples per optimizer step, data parallelism's and every stage's")
    parser.add_argument("--quick", action="store_true", help="short windows and loss runs")
    parser.add_argument("--skip", default="",
                        help="comma-separated parts to skip: rebalance,bytes,memory,loss,factors")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    if args.quick:
        args.window, args.period, args.samples, args.repeats = 20.0, 15.0, 1024, 2
    skip = set(filter(None, args.skip.split(",")))

    figures: dict[str, object] = {"benchmark": "swarm_rebalance", "quick": args.quick, "task": TASK}
    if "rebalance" not in skip:
        figures["rebalance"] = _rebalance_figures(args)
    import swarm_figures

    if "bytes" not in skip:
        figures["activation_bytes"] = swarm_figures.activation_bytes()
    if "memory" not in skip:
        figures["memory"] = swarm_figures.memory_per_stage()
    if "loss" not in skip:
        figures["loss"] = swarm_figures.loss_against_data_parallel(args.samples, args.repeats, args.target_batch)
    if "factors" not in skip:
        figures["loss_factors"] = swarm_figures.loss_factors(args.samples, args.repeats)
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


def _rebalance_figures(args: argparse.Namespace) -> dict[str, object]:
    runs = [rebalance_run(args, rebalance) for rebalance in (True, False)]
    with_, without = runs
    for run in runs:
        print(f"  rebalance={run['rebalance']}: {run}", file=sys.stderr, flush=True)
    balanced = float(with_["balanced"])  # type: ignore[arg-type]
    survivors = 2 * args.peers - args.peers // 2
    return {
        "peers_per_stage": args.peers, "quota_cores": args.quota, "rebalance_seconds": args.period,
        "window_seconds": args.window, "runs": runs,
        "with_vs_balanced": float(with_["after_kill"]) / balanced,  # type: ignore[arg-type]
        "without_vs_balanced": float(without["after_kill"]) / float(without["balanced"]),  # type: ignore[arg-type]
        "with_vs_without": float(with_["after_kill"]) / max(float(without["after_kill"]), 1e-9),  # type: ignore[arg-type]
        # the best any assignment of the survivors can do, as a share of the balanced pipeline
        "best_possible_vs_balanced": (survivors // 2) / args.peers,
    }


if __name__ == "__main__":
    sys.exit(main())
