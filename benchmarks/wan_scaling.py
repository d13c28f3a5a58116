"""Training throughput across bandwidth-shaped links: spotrain's codecs against three baselines.

Agents (one torch thread each) train the example task (default: tiny_gpt's 3.3M-parameter
`task_3m`, 10 to 20 samples/s per thread depending on the machine) in separate network namespaces
whose links are shaped with tc tbf (benchmarks/wan_emulation.py). Measured in the same run:

  compute limit   the same agents training alone, no communication at all (measured first and
                  last, or after every point with --bracket; the fastest run is the limit)
  hivemind        hivemind.Optimizer as it comes: Float16Compression, no delayed updates
  ddp             torch DistributedDataParallel (gloo) over the same links
  spotrain G/S    hivemind.Optimizer with spotrain's gradient codec G and state codec S, its
                  all-reduce guarded against poisoned parts as the agent's (kernels/poison_guard.py);
                  --guard-cost runs each such point again without the guard and prints the ratio

spotrain runs use kernels.optimizer_options as the agent does (delayed updates on, the spec's
default; --no-delayed-updates for foreground averaging), with group_size = the number of
agents (what user-data's optional `group_size` gives an agent). Each agent and its helpers are
pinned to one core (--no-pin to turn off), like one VM each. samples/s counts the samples every
agent put into averaged gradients; "blocked" is the share of time spent inside optimizer.step();
"train CPU" is the trainer thread's CPU time over the wall time, "bg CPU" that of everything else
the agent runs (hivemind's threads, its DHT and averager processes, p2pd). "CPU/sample" is the
trainer thread's CPU time inside forward + backward per sample over the same figure alone (the
lowest of the limit runs): above 1 the trainer does less per CPU-second than alone. "preempt/s"
is how often the trainer thread was pushed off its core (involuntary context switches).
"x bracket" is each point against the mean of the limit runs just before and just after it:
a shared machine's speed can drift by a third within one run, and this cancels a steady drift
where the fastest limit run ("x limit", the conservative figure) cannot. --bracket measures
the limit again after every point, so each point has its own pair (one more limit run per point).
The held-out loss after the same number of global epochs is a sanity check; benchmarks/
convergence.py trains long enough to compare codecs.

Ratios against hivemind depend on how long an epoch lasts: hivemind as it comes averages in the
foreground, a few seconds per epoch whatever the epoch's length, so on a slower machine (longer
epochs) it loses less. The targets were set on a machine where 512 samples took 15 s; where the
limit is lower, --target-batch (limit x 15 s, a multiple of agents x batch) gives the same epoch.

    sudo .venv/bin/python benchmarks/wan_scaling.py                       # the full run (long)
    sudo .venv/bin/python benchmarks/wan_scaling.py --rates 10 --codecs blockwise8/blockwise8 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.wan_emulation import WanEmulation, WanEmulationError, exit_on_signals
from spotrain.progress_bars import StepBars

WORKER = Path(__file__).resolve().parent / "wan_worker.py"
DEFAULT_CODECS = ("none/none", "float16/float16", "uniform8/uniform8", "blockwise8/blockwise8",
                  "blockwise4/blockwise8", "powersgd:4/blockwise8")


def main() -> int:
    args = _parse()
    exit_on_signals()
    points: list[dict] = []
    baselines = [("hivemind", "float16", "float16")] * (not args.skip_hivemind)
    baselines += [("ddp", "-", "-")] * (not args.skip_ddp)
    configs = [(mode, gradients, state, guard)
               for mode, gradients, state in baselines + [("spotrain", *c.split("/")) for c in args.codecs]
               for guard in ((True, False) if mode == "spotrain" and args.guard_cost else (True,))]
    # the limit first, then every configuration at every rate, each bracketed or the limit once more at the end
    steps = 1 + len(args.rates) * len(configs) * (2 if args.bracket else 1) + (0 if args.bracket else 1)
    try:
        with WanEmulation(hosts=args.agents) as wan, StepBars(steps) as bars:
            _measure_limit(wan, args, points, bars)
            for rate in args.rates:
                wan.set_rate(rate)
                for mode, gradients, state, guard in configs:
                    point = {"mode": mode, "rate_mbit": rate, "gradients": gradients, "state": state,
                             "poison_guard": guard}
                    bars.start(f"{_name(point)} @ {rate:g} Mbit/s")
                    point = _run(wan, args, mode, rate, gradients, state, guard)
                    points.append(point)
                    _progress(bars, point)
                    if args.bracket:
                        _measure_limit(wan, args, points, bars)
            if not args.bracket:
                _measure_limit(wan, args, points, bars)  # shared machines drift: the limit is the faster of two
    except WanEmulationError as error:
        print(f"wan_scaling: {error}", file=sys.stderr)
        return 2
    figures = _figures(points, args)
    print(json.dumps(figures) if args.json else _table(figures))
    return 0


def _measure_limit(wan: WanEmulation, args: argparse.Namespace, points: list[dict], bars: StepBars) -> None:
    bars.start("compute limit: the agents alone, no communication")
    limit = _run(wan, args, "alone")
    points.append(limit)
    _progress(bars, limit)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[1000.0, 50.0, 10.0],
                        help="link rates in Mbit/s, comma-separated (default 1000,50,10)")
    parser.add_argument("--codecs", type=lambda v: v.split(","), default=list(DEFAULT_CODECS),
                        help="GRADIENTS/STATE pairs, comma-separated")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--task", default="spotrain.examples.tiny_gpt:task_3m", help="TrainingTask to train")
    parser.add_argument("--target-batch", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="global epochs before measuring")
    parser.add_argument("--epochs", type=int, default=5, help="global epochs measured per point")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per point before giving up")
    parser.add_argument("--tuning", default="{}", help="extra hivemind.Optimizer arguments for spotrain (JSON)")
    parser.add_argument("--no-delayed-updates", action="store_true",
                        help="spotrain runs average and step in the foreground (training.delayed_updates: false)")
    parser.add_argument("--report-interval", type=float, default=None,
                        help="spotrain runs: seconds between progress reports (0: every step, as hivemind does)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin each agent to its own core")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--skip-hivemind", action="store_true")
    parser.add_argument("--bracket", action="store_true",
                        help="measure the compute limit again after every point (x bracket: its own pair)")
    parser.add_argument("--guard-cost", action="store_true",
                        help="run every spotrain point twice, with and without the poison guard, and print the ratio")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    return parser.parse_args()


def _run(wan: WanEmulation, args: argparse.Namespace, mode: str, rate: float | None = None,
         gradients: str = "-", state: str = "-", guard: bool = True) -> dict:
    point = {"mode": mode, "rate_mbit": rate, "gradients": gradients, "state": state, "poison_guard": guard}
    with tempfile.TemporaryDirectory(prefix="spotrain-wan-") as work:
        processes = []
        for index, host in enumerate(wan.hosts):
            argv = [sys.executable, str(WORKER), "--mode", mode, "--index", str(index), "--world", str(args.agents),
                    "--host", host.address, "--peers", f"{work}/peers", "--out", f"{work}/out{index}.json",
                    "--gradients", gradients, "--state", state, "--task", args.task,
                    "--target-batch", str(args.target_batch),
                    "--batch", str(args.batch), "--warmup", str(args.warmup), "--epochs", str(args.epochs),
                    "--tuning", args.tuning]
            if args.no_delayed_updates:
                argv.append("--no-delayed-updates")
            if args.report_interval is not None:
                argv += ["--report-interval", str(args.report_interval)]
            if not args.no_pin:  # one core per agent, like one VM each
                argv += ["--cpu", str(index % os.cpu_count())]
            env = dict(os.environ, GLOO_SOCKET_IFNAME=host.interface, OMP_NUM_THREADS="1")
            if not guard:
                env["SPOTRAIN_POISON_GUARD"] = "0"
            with open(f"{work}/log{index}", "w") as log:  # the child keeps its own descriptor
                processes.append(wan.popen(index, argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + args.timeout
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        results = []
        for index, process in enumerate(processes):
            out = Path(f"{work}/out{index}.json")
            if process.poll() is None or process.returncode != 0 or not out.exists():
                tail = Path(f"{work}/log{index}").read_text()[-1500:]
                wan.close_processes()
                return {**point, "error": f"agent {index} failed (exit {process.poll()}): ...{tail}"}
            results.append(json.loads(out.read_text()))
    rates = [r["samples_per_second"] for r in results]
    point["samples_per_second"] = sum(rates) if mode != "ddp" else sum(rates) / len(rates)
    point["eval_loss"] = None  # only swarm runs train the same number of samples
    for figure in ("trainer_cpu_share", "background_cpu_share",  # of each agent's one core
                   "compute_cpu_ms_per_sample", "trainer_preemptions_per_second",
                   "trainer_page_faults_per_sample", "trainer_system_cpu_share"):  # these two: --json only
        if all(figure in r for r in results):
            point[figure] = sum(r[figure] for r in results) / len(results)
    if mode in ("spotrain", "hivemind"):
        point["eval_loss"] = sum(r["eval_loss"] for r in results) / len(results)
        epochs = max(1, min(r["epochs"] for r in results))
        point["mb_sent_per_agent_epoch"] = sum(r["bytes_sent"] for r in results) / len(results) / epochs / 1e6
        point["blocked_fraction"] = sum(r["blocked_fraction"] for r in results) / len(results)
    return point


def _figures(points: list[dict], args: argparse.Namespace) -> dict:
    alone = [p for p in points if p["mode"] == "alone" and "error" not in p]
    limits = [p["samples_per_second"] for p in alone]
    limit = max(limits) if limits else None
    alone_cpu = [p["compute_cpu_ms_per_sample"] for p in alone]
    rows = []
    for position, point in enumerate(points):
        if point["mode"] == "alone" or "error" in point:
            rows.append(point)
            continue
        bracket = _bracketing_limit(points, position)
        same_link = [p for p in points if p["rate_mbit"] == point["rate_mbit"] and "error" not in p]
        hivemind = next((p for p in same_link if p["mode"] == "hivemind"), None)
        ddp = next((p for p in same_link if p["mode"] == "ddp"), None)
        plain = next((p for p in same_link if p["mode"] == "spotrain" and p["gradients"] == "none"
                      and p["state"] == "none"), None)
        rate = point["samples_per_second"]
        row = dict(point, vs_compute_limit=rate / limit if limit else None,
                   vs_bracketing_limits=rate / bracket if bracket else None,
                   vs_hivemind=rate / hivemind["samples_per_second"] if hivemind else None,
                   vs_ddp=rate / ddp["samples_per_second"] if ddp else None,
                   loss_vs_uncompressed=point["eval_loss"] / plain["eval_loss"]
                   if plain and point["eval_loss"] is not None else None,
                   # > 1: forward + backward cost the trainer more CPU per sample than when it trains alone
                   compute_cpu_vs_alone=point["compute_cpu_ms_per_sample"] / min(alone_cpu)
                   if alone_cpu and "compute_cpu_ms_per_sample" in point else None)
        rows.append(row)
    return {"benchmark": "wan_scaling", "task": args.task, "delayed_updates": not args.no_delayed_updates,
            "agents": args.agents, "target_batch_size": args.target_batch,
            "batch_size": args.batch, "warmup_epochs": args.warmup, "epochs": args.epochs,
            "compute_limit_samples_per_second": limit, "compute_limit_measurements": limits,
            # hivemind's foreground averaging costs seconds per epoch: its ratio depends on this
            "epoch_seconds_at_limit": args.target_batch / limit if limit else None, "points": rows,
            "alone_points": alone, "guard_cost": _guard_cost(rows)}


def _guard_cost(rows: list[dict]) -> list[dict]:
    """Each spotrain point measured with and without the poison guard: x limit both ways, and their ratio."""
    pairs = []
    for row in rows:
        if row["mode"] != "spotrain" or "error" in row or not row.get("poison_guard", True):
            continue
        bare = next((r for r in rows if r["mode"] == "spotrain" and "error" not in r and not r.get("poison_guard", True)
                     and (r["rate_mbit"], r["gradients"], r["state"]) == (row["rate_mbit"], row["gradients"],
                                                                          row["state"])), None)
        if bare is not None:
            pairs.append({"rate_mbit": row["rate_mbit"], "codecs": f"{row['gradients']}/{row['state']}",
                          "x_limit_with_guard": row["vs_compute_limit"], "x_limit_without": bare["vs_compute_limit"],
                          "x_bracket_with_guard": row["vs_bracketing_limits"],
                          "x_bracket_without": bare["vs_bracketing_limits"],
                          "with_vs_without": row["samples_per_second"] / bare["samples_per_second"]})
    return pairs


def _bracketing_limit(points: list[dict], position: int) -> float | None:
    """The mean of the limit runs nearest before and after points[position] (either alone at the ends)."""
    def nearest(candidates):
        return next((p["samples_per_second"] for p in candidates if p["mode"] == "alone" and "error" not in p), None)

    pair = [value for value in (nearest(reversed(points[:position])), nearest(points[position + 1:])) if value]
    return sum(pair) / len(pair) if pair else None


def _name(point: dict) -> str:
    if point["mode"] == "spotrain":
        return f"spotrain {point['gradients']}/{point['state']}" + ("" if point.get("poison_guard", True)
                                                                    else " no guard")
    return {"alone": "compute limit", "hivemind": "hivemind as it comes", "ddp": "torch DDP (gloo)"}[point["mode"]]


def _progress(bars: StepBars, point: dict) -> None:
    """One line per measured point on stderr (above the bars), --json too: a full run takes the
    better part of an hour."""
    rate = "-" if point["rate_mbit"] is None else f"{point['rate_mbit']:g} Mbit/s"
    value = (point.get("error", "").splitlines()[0] if "error" in point
             else f"{point['samples_per_second']:.1f} samples/s")
    bars.say(f"  measured {_name(point)} @ {rate}: {value}")


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _table(figures: dict) -> str:
    header = (f"{'link':>10}  {'configuration':<36}{'samples/s':>10}{'x limit':>9}{'x bracket':>10}{'x hivemind':>11}"
              f"{'x DDP':>8}"
              f"{'loss':>8}{'loss/none':>10}{'MB/ag/ep':>9}{'train CPU':>10}{'bg CPU':>8}{'CPU/sample':>11}"
              f"{'preempt/s':>10}")
    limit = _fmt(figures["compute_limit_samples_per_second"], "{:.1f}")
    measured = ", ".join(f"{value:.1f}" for value in figures["compute_limit_measurements"])
    title = (f"wan_scaling: {figures['task']}, {figures['agents']} agents, "
             f"target batch {figures['target_batch_size']}, "
             f"{figures['epochs']} epochs measured after {figures['warmup_epochs']}")
    alone = figures["alone_points"]
    lines = [title,
             (f"compute limit (agents alone, no communication; the fastest of {measured}, in order): {limit} "
              f"samples/s, an epoch every {_fmt(figures['epoch_seconds_at_limit'], '{:.1f}')} s"),
             "alone: " + "; ".join(f"{_fmt(p.get('compute_cpu_ms_per_sample'), '{:.1f}')} CPU ms/sample, "
                                   f"{_fmt(p.get('trainer_preemptions_per_second'), '{:.1f}')} preemptions/s"
                                   for p in alone), "",
             header]
    for row in figures["points"]:
        if row["mode"] == "alone":
            continue
        link = f"{row['rate_mbit']:g} Mbit"
        if "error" in row:
            lines.append(f"{link:>10}  {_name(row):<36}{'FAILED: ' + row['error'].splitlines()[0]}")
            continue
        lines.append(f"{link:>10}  {_name(row):<36}{row['samples_per_second']:>10.1f}"
                     f"{_fmt(row['vs_compute_limit'], '{:.2f}'):>9}{_fmt(row['vs_bracketing_limits'], '{:.2f}'):>10}"
                     f"{_fmt(row['vs_hivemind'], '{:.2f}'):>11}"
                     f"{_fmt(row['vs_ddp'], '{:.1f}'):>8}{_fmt(row['eval_loss'], '{:.3f}'):>8}"
                     f"{_fmt(row['loss_vs_uncompressed'], '{:.3f}'):>10}"
                     f"{_fmt(row.get('mb_sent_per_agent_epoch'), '{:.2f}'):>9}"
                     f"{_fmt(row.get('trainer_cpu_share'), '{:.2f}'):>10}"
                     f"{_fmt(row.get('background_cpu_share'), '{:.2f}'):>8}"
                     f"{_fmt(row.get('compute_cpu_vs_alone'), '{:.3f}'):>11}"
                     f"{_fmt(row.get('trainer_preemptions_per_second'), '{:.1f}'):>10}")
    for pair in figures["guard_cost"]:
        lines.append(f"poison guard cost, {pair['codecs']} @ {pair['rate_mbit']:g} Mbit: x limit "
                     f"{_fmt(pair['x_limit_with_guard'], '{:.3f}')} with, {_fmt(pair['x_limit_without'], '{:.3f}')} "
                     f"without (x bracket {_fmt(pair['x_bracket_with_guard'], '{:.3f}')} with, "
                     f"{_fmt(pair['x_bracket_without'], '{:.3f}')} without); "
                     f"with/without {pair['with_vs_without']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
