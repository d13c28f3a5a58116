"""Convergence: held-out loss after the same number of samples, each codec against uncompressed.

Two agents (separate processes, one torch thread each, on 127.0.0.1: bandwidth does not matter
here) train the example task (spotrain.examples.tiny_gpt:task) with hivemind.Optimizer and
spotrain's codecs, with delayed updates as the spec's default has them, for a fixed number of
global epochs, then the final model's loss on fixed held-out batches is compared with
that of `none/none` trained the same way in the same run. Target: within 2%.

    .venv/bin/python benchmarks/convergence.py [--epochs 100] [--target-batch 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from spotrain.progress_bars import StepBars

WORKER = Path(__file__).resolve().parent / "wan_worker.py"
DEFAULT_CODECS = ("none/none", "float16/float16", "uniform8/uniform8", "blockwise8/blockwise8",
                  "blockwise4/blockwise8", "powersgd:4/blockwise8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", type=lambda v: v.split(","), default=list(DEFAULT_CODECS),
                        help="GRADIENTS/STATE pairs, comma-separated; none/none is always run first")
    parser.add_argument("--epochs", type=int, default=100, help="global epochs (optimizer steps) per codec")
    parser.add_argument("--target-batch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs per codec (the mean loss is compared)")
    parser.add_argument("--task", default="spotrain.examples.tiny_gpt:task")
    parser.add_argument("--no-delayed-updates", action="store_true", help="average and step in the foreground")
    parser.add_argument("--tuning", default="{}", help="extra hivemind.Optimizer arguments (JSON)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    codecs = ["none/none"] + [c for c in args.codecs if c != "none/none"]
    rows = []
    with StepBars(len(codecs) * args.repeats) as bars:  # on stderr: --json keeps stdout
        for codec in codecs:
            losses = []
            for repeat in range(args.repeats):
                bars.start(f"codec {codec}: 2 agents, {args.epochs} epochs"
                           + (f" (run {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""))
                losses.append(_train(args, *codec.split("/")))
            row = {"codec": codec, "losses": losses, "loss": sum(losses) / len(losses)}
            rows.append(row)
            bars.say(f"  {codec}: loss {row['loss']:.4f}")
    baseline = rows[0]["loss"]
    for row in rows:
        row["loss_vs_uncompressed"] = row["loss"] / baseline
        row["within_2_percent"] = row["loss_vs_uncompressed"] <= 1.02
    figures = {"benchmark": "convergence", "task": args.task, "delayed_updates": not args.no_delayed_updates,
               "agents": 2, "epochs": args.epochs, "target_batch_size": args.target_batch,
               "samples": args.epochs * args.target_batch, "tuning": json.loads(args.tuning), "rows": rows}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"convergence: 2 agents, {args.epochs} epochs x {args.target_batch} samples, held-out loss")
        print(f"{'gradients/state':<26}{'loss':>9}{'x none/none':>13}{'within 2%':>11}")
        for row in rows:
            print(f"{row['codec']:<26}{row['loss']:>9.4f}{row['loss_vs_uncompressed']:>13.4f}"
                  f"{'yes' if row['within_2_percent'] else 'NO':>11}")
    return 0


def _train(args: argparse.Namespace, gradients: str, state: str) -> float:
    with tempfile.TemporaryDirectory(prefix="spotrain-conv-") as work:
        processes = []
        for index in range(2):
            argv = [sys.executable, str(WORKER), "--mode", "spotrain", "--index", str(index), "--world", "2",
                    "--peers", f"{work}/peers", "--out", f"{work}/out{index}.json", "--gradients", gradients,
                    "--state", state, "--target-batch", str(args.target_batch), "--batch", str(args.batch),
                    "--warmup", "0", "--epochs", str(args.epochs), "--tuning", args.tuning, "--task", args.task]
            argv += ["--no-delayed-updates"] * args.no_delayed_updates
            with open(f"{work}/log{index}", "w") as log:
                processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                  env=dict(os.environ, OMP_NUM_THREADS="1")))
        codes = [p.wait() for p in processes]
        if any(codes):
            raise SystemExit(f"{gradients}/{state}: agents exited {codes}: {Path(work, 'log0').read_text()[-2000:]}")
        losses = [json.loads(Path(f"{work}/out{i}.json").read_text())["eval_loss"] for i in range(2)]
    return sum(losses) / len(losses)


if __name__ == "__main__":
    sys.exit(main())
