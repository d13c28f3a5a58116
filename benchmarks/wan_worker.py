"""One agent of the WAN benchmark: trains the example task in one mode and writes one JSON file.

Modes, all on the --task (default spotrain.examples.tiny_gpt:task_3m) with one torch thread:
  alone     the compute limit: the same steps, one optimizer step per global batch, no communication
  spotrain  hivemind.Optimizer with spotrain's codecs (kernels.optimizer_options, as the agent)
Both keep freed memory for reuse as the agent does (agents/memory.py); the two baselines below
run with glibc's defaults.
  hivemind  hivemind.Optimizer as it comes: Float16Compression, no delayed updates
  ddp       torch DistributedDataParallel over gloo, one all-reduce per local step

Throughput is measured after `warmup` global epochs (target_batch_size samples each) over the
next `epochs`; the loss is the mean on fixed held-out batches of the final model, so every mode
is compared after the same number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

EVAL_SEED, EVAL_BATCHES, EVAL_BATCH = 999_983, 8, 32


def main() -> int:
    args = _parse()
    if args.cpu is not None:  # one core per agent, like one VM each; helpers inherit it
        os.sched_setaffinity(0, {args.cpu})
    if args.mode in ("alone", "spotrain"):  # spotrain's agent setup; the limit is the same agent, alone
        from spotrain.agents.memory import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(1)
    from spotrain.contracts.task import load_task

    task = load_task(args.task)
    model = task.build_model()
    result = {"mode": args.mode, "index": args.index}
    run = {"alone": _alone, "spotrain": _swarm, "hivemind": _swarm, "ddp": _ddp}[args.mode]
    result.update(run(args, task, model))
    result["eval_loss"] = _eval_loss(task, model)
    Path(args.out).write_text(json.dumps(result))
    return 0


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("alone", "spotrain", "hivemind", "ddp"), required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--task", default="spotrain.examples.tiny_gpt:task_3m")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--peers", required=True, help="file where agent 0 writes its addresses")
    parser.add_argument("--gradients", default="none")
    parser.add_argument("--state", default="none")
    parser.add_argument("--target-batch", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="global epochs before measuring")
    parser.add_argument("--epochs", type=int, default=4, help="global epochs measured")
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--averaging-timeout", type=float, default=30.0)
    parser.add_argument("--tuning", default="{}", help="extra hivemind.Optimizer arguments (JSON), spotrain mode")
    parser.add_argument("--group-size", type=int, default=1,
                        help="spotrain mode: averaging groups start once all --world agents joined (0: off)")
    parser.add_argument("--no-delayed-updates", action="store_true",
                        help="spotrain mode: average and step in the foreground (training.delayed_updates: false)")
    parser.add_argument("--report-interval", type=float, default=None,
                        help="spotrain mode: seconds between progress reports to the DHT (default: the agent's; "
                             "0: every step, as hivemind does)")
    parser.add_argument("--cpu", type=int, default=None, help="pin this agent and its helpers to one core")
    parser.add_argument("--port", type=int, default=29511)
    parser.add_argument("--ddp-steps", type=int, default=24,
                        help="DDP measures at most this many steps (it is stationary and slow on thin links)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def _eval_loss(task, model: torch.nn.Module) -> float:
    batches = task.batches(EVAL_SEED, EVAL_BATCH)
    with torch.no_grad():
        return sum(float(task.loss(model, next(batches))) for _ in range(EVAL_BATCHES)) / EVAL_BATCHES


def _local_steps(args: argparse.Namespace) -> tuple[int, int]:
    """(warmup, measured) local steps giving this agent its share of the global samples."""
    per_step = args.batch * args.world
    return args.warmup * args.target_batch // per_step, args.epochs * args.target_batch // per_step


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live descendants (the
    DHT and averager processes, p2pd): what the swarm's background work takes from the core."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        used[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total, frontier = 0.0, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        total += used.get(pid, 0.0)
        frontier.extend(children.get(pid, []))
    return total


def involuntary_switches() -> int:
    """How often the calling thread was taken off its core while it still wanted to run."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])


def thread_faults_and_system_seconds() -> tuple[int, float]:
    """The calling thread's minor page faults and its CPU seconds in the kernel, so far."""
    fields = Path(f"/proc/self/task/{threading.get_native_id()}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def _alone(args: argparse.Namespace, task, model: torch.nn.Module) -> dict:
    """The same work as a swarm agent minus the swarm: one optimizer step per global batch."""
    optimizer = task.make_optimizer(model.parameters())
    batches = task.batches(1000 + args.index, args.batch)
    warmup, measured = _local_steps(args)
    steps_per_epoch = max(1, args.target_batch // (args.batch * args.world))
    window = _Window()
    _start_together(args)
    for step in range(warmup + measured):
        if step == warmup:
            window.open(0, 0, 0)
        computing = time.thread_time()
        task.loss(model, next(batches)).backward()
        window.compute_cpu += time.thread_time() - computing
        if (step + 1) % steps_per_epoch == 0:
            optimizer.step()
            optimizer.zero_grad()
    elapsed = time.perf_counter() - window.started
    return {"samples_per_second": measured * args.batch / elapsed, "elapsed": elapsed,
            "trainer_cpu_share": (time.thread_time() - window.trainer_cpu) / elapsed,
            **window.trainer_figures(measured * args.batch, elapsed)}


def _ddp(args: argparse.Namespace, task, model: torch.nn.Module) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    leader = _leader_address(args)
    dist.init_process_group("gloo", init_method=f"tcp://{leader}:{args.port}", rank=args.index,
                            world_size=args.world)
    ddp = DistributedDataParallel(model)
    optimizer = task.make_optimizer(ddp.parameters())
    batches = task.batches(1000 + args.index, args.batch)
    warmup, measured = _local_steps(args)
    warmup, measured = min(warmup, 4), min(measured, args.ddp_steps)
    started = 0.0
    _start_together(args)
    for step in range(warmup + measured):
        if step == warmup:
            dist.barrier()
            started = time.perf_counter()
        task.loss(ddp, next(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
    elapsed = time.perf_counter() - started
    dist.destroy_process_group()
    return {"samples_per_second": measured * args.batch * args.world / elapsed, "elapsed": elapsed,
            "steps": measured}


def _leader_address(args: argparse.Namespace) -> str:
    if args.index == 0:
        Path(args.peers).write_text(json.dumps([args.host]))
        return args.host
    return _wait_for_peers(args.peers)[0]


def _start_together(args: argparse.Namespace, timeout: float = 180.0) -> None:
    """A file barrier: nobody trains (and runs ahead, forcing a state download) before all are ready."""
    Path(f"{args.peers}.ready{args.index}").touch()
    deadline = time.monotonic() + timeout
    while not all(Path(f"{args.peers}.ready{i}").exists() for i in range(args.world)):
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {args.world} agents ready after {timeout:.0f}s")
        time.sleep(0.1)


def _wait_for_peers(path: str, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit(f"no peer addresses in {path} after {timeout:.0f}s")


def _swarm(args: argparse.Namespace, task, model: torch.nn.Module) -> dict:
    import hivemind
    from hivemind.compression import Float16Compression

    from spotrain.kernels import SwarmOptimizer, install_codecs, optimizer_options, traffic

    install_codecs()  # also counts bytes for the hivemind baseline
    if args.mode == "spotrain":
        from spotrain.kernels.poison_guard import install_poison_guard

        install_poison_guard()  # as the agent does; SPOTRAIN_POISON_GUARD=0 (wan_scaling --guard-cost) leaves it off
    peers = [] if args.index == 0 else _wait_for_peers(args.peers)
    dht = hivemind.DHT(initial_peers=peers, host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True)
    if args.index == 0:
        Path(args.peers + ".tmp").write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        os.replace(args.peers + ".tmp", args.peers)
    optimizer_class = hivemind.Optimizer
    if args.mode == "spotrain":
        options = optimizer_options(args.gradients, args.state, group_size=args.world if args.group_size else None,
                                    delayed_updates=not args.no_delayed_updates)
        if args.report_interval is not None:
            options["progress_report_interval"] = args.report_interval
        options.update(json.loads(args.tuning))
        optimizer_class = SwarmOptimizer
    else:
        options = {"grad_compression": Float16Compression(), "state_averaging_compression": Float16Compression()}
    optimizer = optimizer_class(
        dht=dht, run_id="wan-bench", params=model.parameters(), optimizer=task.make_optimizer,
        batch_size_per_step=args.batch, target_batch_size=args.target_batch,
        matchmaking_time=args.matchmaking_time, averaging_timeout=args.averaging_timeout, verbose=False, **options,
    )
    batches = task.batches(1000 + args.index, args.batch)
    _start_together(args)
    window = _Window()
    deadline = time.monotonic() + 3600
    while optimizer.local_epoch < args.warmup + args.epochs and time.monotonic() < deadline:
        computing = time.thread_time()
        task.loss(model, next(batches)).backward()
        window.compute_cpu += time.thread_time() - computing
        stepped = time.perf_counter()
        optimizer.step()
        window.blocked += time.perf_counter() - stepped
        optimizer.zero_grad()
        window.samples += args.batch
        if window.started is None and optimizer.local_epoch >= args.warmup:
            window.open(optimizer.local_epoch, traffic.sent, traffic.received)
    if window.started is None:
        raise SystemExit(f"never reached epoch {args.warmup} (at {optimizer.local_epoch})")
    elapsed = time.perf_counter() - window.started
    trainer_cpu, all_cpu = time.thread_time() - window.trainer_cpu, tree_cpu_seconds() - window.all_cpu
    epochs = optimizer.local_epoch - window.epoch
    result = {"samples_per_second": window.samples / elapsed,  # what this agent put into averaged gradients
              "epoch_samples_per_second": epochs * args.target_batch / elapsed, "elapsed": elapsed,
              "epochs": epochs, "blocked_fraction": window.blocked / elapsed,
              "bytes_sent": traffic.sent - window.sent, "bytes_received": traffic.received - window.received,
              "trainer_cpu_share": trainer_cpu / elapsed, "background_cpu_share": (all_cpu - trainer_cpu) / elapsed,
              **window.trainer_figures(window.samples, elapsed)}
    optimizer.shutdown()
    dht.shutdown()
    return result


class _Window:
    """What happens between the end of warmup and the end of the run."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.samples, self.blocked, self.epoch, self.sent, self.received = 0, 0.0, 0, 0, 0
        self.trainer_cpu, self.all_cpu = 0.0, 0.0  # CPU seconds at the start: the trainer thread's, the tree's
        self.compute_cpu = 0.0  # the trainer thread's CPU seconds inside forward + backward
        self.switches = 0  # the trainer thread's involuntary context switches at the start
        self.faults, self.system_cpu = 0, 0.0  # its minor page faults and kernel CPU seconds at the start

    def open(self, epoch: int, sent: int, received: int) -> None:
        self.started, self.epoch, self.sent, self.received = time.perf_counter(), epoch, sent, received
        self.samples, self.blocked, self.compute_cpu = 0, 0.0, 0.0
        self.trainer_cpu, self.all_cpu = time.thread_time(), tree_cpu_seconds()
        self.switches = involuntary_switches()
        self.faults, self.system_cpu = thread_faults_and_system_seconds()

    def trainer_figures(self, samples: int, elapsed: float) -> dict:
        """Whether the trainer does less per CPU-second, how often it is pushed off its core, and
        how much of its time goes to page faults and the kernel."""
        faults, system_cpu = thread_faults_and_system_seconds()
        return {"compute_cpu_ms_per_sample": 1000 * self.compute_cpu / max(1, samples),
                "trainer_preemptions_per_second": (involuntary_switches() - self.switches) / elapsed,
                "trainer_page_faults_per_sample": (faults - self.faults) / max(1, samples),
                "trainer_system_cpu_share": (system_cpu - self.system_cpu) / elapsed}


if __name__ == "__main__":
    sys.exit(main())
