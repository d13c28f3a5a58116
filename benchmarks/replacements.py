"""Replacements: held-out loss of a swarm whose peers are replaced one after another, each
replacement downloading the training state from the live peers, per codec pair against none/none.

This is what spot training does to the state codec and what `benchmarks/convergence.py` (two
peers for the whole run, no download) never exercises: a replacement's first optimizer step
uses the optimizer statistics it downloaded. Real hivemind peers (spotrain's SwarmOptimizer with
`optimizer_options`, delayed updates as the spec's default has them) on 127.0.0.1, one torch
thread each, in one process. Peer 0 trains alone for `--warmup` epochs; then each round a new
peer joins (its first step downloads the state), trains beside the others for `--epochs-per-round`
global epochs, and the oldest leaves when more than `--live` peers are up. The figure is the
newest peer's loss on fixed held-out batches after each round (`peak` is the worst of them), and
the bytes one state download takes with the pair's state codec.

    .venv/bin/python benchmarks/replacements.py [--codecs float16/float16,blockwise8/float16] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch

from spotrain.contracts.task import load_task
from spotrain.kernels import SwarmOptimizer, install_codecs, optimizer_options
from spotrain.progress_bars import StepBars

DEFAULT_CODECS = ("float16/none", "float16/float16", "blockwise8/float16", "blockwise8/blockwise8",
                  "blockwise4/blockwise4")
HELD_OUT_SEED = 999_999


@dataclass
class Peer:
    dht: Any
    model: torch.nn.Module
    optimizer: Any
    batches: Any
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", type=lambda v: v.split(","), default=list(DEFAULT_CODECS),
                        help="GRADIENTS/STATE pairs, comma-separated; none/none is always run first")
    parser.add_argument("--rounds", type=int, default=4, help="replacements")
    parser.add_argument("--warmup", type=int, default=6, help="epochs peer 0 trains alone first")
    parser.add_argument("--epochs-per-round", type=int, default=3)
    parser.add_argument("--live", type=int, default=2, help="peers up at once after a round")
    parser.add_argument("--target-batch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--task", default="spotrain.examples.tiny_gpt:task")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    install_codecs()
    task = load_task(args.task)
    held_out = [next(task.batches(HELD_OUT_SEED + i, 32)) for i in range(2)]
    rows = []
    codecs = ["none/none"] + [c for c in args.codecs if c != "none/none"]
    with StepBars(len(codecs)) as bars:
        for codec in codecs:
            bars.start(f"codec {codec}: warm-up, then {args.rounds} replacement(s)")
            gradients, state = codec.split("/")
            losses, download = _run(args, task, held_out, gradients, state, bars)
            rows.append({"codec": codec, "losses": losses, "final": losses[-1], "peak": max(losses),
                         "download_mb": round(download / 1e6, 2)})
            bars.say(f"  {codec}: loss after each round {losses}")
    for row in rows:
        row["final_vs_uncompressed"] = row["final"] / rows[0]["final"]
        row["peak_vs_uncompressed"] = row["peak"] / rows[0]["peak"]
    figures = {"benchmark": "replacements", "task": args.task, "rounds": args.rounds, "warmup": args.warmup,
               "epochs_per_round": args.epochs_per_round, "live": args.live,
               "target_batch_size": args.target_batch, "rows": rows}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"replacements: {args.rounds} replacements, {args.epochs_per_round} epochs each, held-out loss")
        print(f"{'gradients/state':<24}{'final':>10}{'x none':>10}{'peak':>10}{'x none':>10}{'download MB':>13}")
        for row in rows:
            print(f"{row['codec']:<24}{row['final']:>10.3f}{row['final_vs_uncompressed']:>10.3f}"
                  f"{row['peak']:>10.3f}{row['peak_vs_uncompressed']:>10.3f}{row['download_mb']:>13.2f}")
    return 0


def _run(args: argparse.Namespace, task: Any, held_out: list[torch.Tensor], gradients: str,
         state: str, progress: StepBars) -> tuple[list[float], int]:
    """The newest peer's held-out loss after each round, and the bytes of one state download;
    `progress` hears of the warm-up and each round."""
    run_id = f"replacements-{gradients.replace(':', '')}-{state}-{time.monotonic_ns()}"
    options = optimizer_options(gradients, state, delayed_updates=True)
    peers = [_start(task, args, run_id, [], options, seed=0)]
    losses = []
    try:
        _until_epoch(peers, args.warmup)
        progress.update(1 / (args.rounds + 1))
        for round_ in range(1, args.rounds + 1):
            initial = [str(a) for a in peers[-1].dht.get_visible_maddrs()]
            peers.append(_start(task, args, run_id, initial, options, seed=round_))
            # the newcomer's first step finds it behind and downloads; then the round's epochs
            _until_epoch(peers[-1:], max(p.optimizer.local_epoch for p in peers[:-1]))
            _until_epoch(peers, peers[-1].optimizer.local_epoch + args.epochs_per_round)
            while len(peers) > args.live:
                _stop(peers.pop(0))
            losses.append(round(_held_out_loss(task, peers[-1], held_out), 4))
            progress.update((round_ + 1) / (args.rounds + 1))
        download = _download_bytes(peers[-1], options["load_state_compression"])
    finally:
        for peer in peers:
            _stop(peer)
    return losses, download


def _download_bytes(peer: Peer, codec: Any) -> int:
    """What a peer serving its state sends with `codec` (hivemind's messages, before streaming)."""
    _, tensors, infos = peer.optimizer.state_averager.get_current_state()
    return sum(codec.compress(tensor, info).ByteSize() for tensor, info in zip(tensors, infos))


def _start(task: Any, args: argparse.Namespace, run_id: str, initial: list[str], options: dict[str, Any],
           seed: int) -> Peer:
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = task.build_model()
    optimizer = SwarmOptimizer(dht=dht, run_id=run_id, params=model.parameters(), optimizer=task.make_optimizer,
                               batch_size_per_step=args.batch, target_batch_size=args.target_batch,
                               matchmaking_time=1.0, averaging_timeout=15.0, verbose=False,
                               # a download's chunk may wait seconds on a loaded 2-core machine: no retries
                               next_chunk_timeout=10.0, **options)
    peer = Peer(dht, model, optimizer, task.batches(seed, args.batch))
    peer.thread = threading.Thread(target=_train, args=(task, peer), daemon=True)
    peer.thread.start()
    return peer


def _train(task: Any, peer: Peer) -> None:
    while not peer.stop.is_set():
        loss = task.loss(peer.model, next(peer.batches))
        if bool(torch.isfinite(loss)):  # as the agent does: a non-finite loss skips the step
            loss.backward()
            peer.optimizer.step()
        peer.optimizer.zero_grad()


def _until_epoch(peers: list[Peer], epoch: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while min(p.optimizer.local_epoch for p in peers) < epoch:
        if time.monotonic() > deadline:
            raise RuntimeError(f"peers stuck at epochs {[p.optimizer.local_epoch for p in peers]}, wanted {epoch}")
        time.sleep(0.2)


def _held_out_loss(task: Any, peer: Peer, held_out: list[torch.Tensor]) -> float:
    model = task.build_model()
    with torch.no_grad():
        model.load_state_dict({k: v.detach().clone() for k, v in peer.model.state_dict().items()})
        return sum(float(task.loss(model, batch)) for batch in held_out) / len(held_out)


def _stop(peer: Peer) -> None:
    peer.stop.set()
    if peer.thread is not None:
        peer.thread.join(timeout=60)
    peer.optimizer.shutdown()
    peer.dht.shutdown()


if __name__ == "__main__":
    sys.exit(main())
