"""What the poison guard adds to receiving a part, against decoding that part (same run).

For every part of a 3.3M-value gradient (tiny_gpt's task_3m; hivemind's default part size at
blockwise8's ratio), a receiver decodes the part (hivemind's deserialize_torch_tensor through
spotrain's codec table) and, with the guard, checks it (`part_verdict`: one norm of the received
part, one of its own part). The guard's share is its time over the decode's, best of --repeats;
benchmarks/wan_scaling.py --guard-cost measures the end-to-end throughput with and without it.

    .venv/bin/python benchmarks/poison_guard_cost.py [--values 3300000] [--repeats 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from spotrain.agents.memory import keep_freed_memory
from spotrain.kernels import get_codec, install_codecs
from spotrain.kernels.poison_guard import SenderHistory, part_verdict, rms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=3_300_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    keep_freed_memory()  # as the agent: decoded parts reuse memory instead of faulting fresh pages in
    install_codecs()
    torch.set_num_threads(1)  # an agent's averager shares its one core
    codec = get_codec("blockwise8")
    vector = torch.randn(args.values)
    info = CompressionInfo.from_tensor(vector, key=0)
    part_values = int(DEFAULT_PART_SIZE_BYTES / (4 * codec.estimate_compression_ratio(info)))
    received = [codec.compress(p, info) for p in vector.split(part_values)]
    own = [p * 0.9 for p in vector.split(part_values)]
    history = SenderHistory()
    own_scale = rms(vector)

    def decode() -> list[torch.Tensor]:
        return [deserialize_torch_tensor(message) for message in received]

    parts = decode()

    def guard() -> None:
        for part, mine in zip(parts, own):
            if part_verdict(part, 1.0, mine, own_scale, history.median("peer")) is None:
                history.accept("peer", rms(part))

    decode_s, guard_s = (min(_seconds(f) for _ in range(args.repeats)) for f in (decode, guard))
    figures = {"benchmark": "poison_guard_cost", "values": args.values, "parts": len(received),
               "decode_seconds": decode_s, "guard_seconds": guard_s, "guard_vs_decode": guard_s / decode_s}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.values:,} values in {len(received)} parts (blockwise8), one thread, best of {args.repeats}: "
              f"decode {decode_s * 1e3:.2f} ms, guard {guard_s * 1e3:.2f} ms, guard/decode {guard_s / decode_s:.3f}")
    return 0


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
