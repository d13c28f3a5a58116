"""Codec throughput and error on one 64 MiB fp32 tensor, against hivemind's codecs and a plain copy.

Each codec goes through hivemind's CompressionBase interface (compress to a runtime_pb2.Tensor,
then extract), so its figure includes building the message, like hivemind's own codecs. GB/s is
the input's bytes over compress + decompress time (best of --repeats; the median is printed
too). Two ceilings: torch.clone (a copy that allocates its output, as a decoder must) and
copy_ into a preallocated tensor (memory bandwidth). The blockwise codecs run their fused C
path; the same codecs forced onto the torch reference path (as on a machine without a C
compiler) are the baseline that path is measured against.

The process keeps freed memory as the agent does (`agents/memory.py`): a decoder's output then
reuses memory instead of being faulted in and zeroed by the kernel at every call.
`--glibc-defaults` measures with malloc as it comes instead.

    .venv/bin/python benchmarks/kernels_throughput.py [--repeats 7] [--threads N] [--glibc-defaults] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from spotrain.agents.memory import keep_freed_memory
from spotrain.kernels import native

SIZE_BYTES = 64 * 1024 * 1024
# the same codecs forced onto the torch reference path: the baseline of the fused C path
REFERENCE_ROWS = {8: "blockwise8, torch reference path", 4: "blockwise4, torch reference path"}
# quantize + dequantize without hivemind's message: what the kernels cost apart from the two
# copies of the payload that hivemind's protobuf path makes (into the message, out by .buffer)
KERNEL_ROWS = {8: "blockwise8 kernels alone (no message)", 4: "blockwise4 kernels alone (no message)"}
WARMUP_ROUNDS = 8


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="malloc as it comes, not the agent's kept freed memory")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    memory = "glibc defaults" if args.glibc_defaults or not keep_freed_memory() else "kept, as in the agent"
    if args.threads:
        torch.set_num_threads(args.threads)

    from hivemind.compression import CompressionInfo, Float16Compression, Uniform8BitQuantization

    from spotrain.kernels.blockwise import dequantize, quantize
    from spotrain.kernels.codecs import BlockwiseCodec
    from spotrain.kernels.table import BLOCK_SIZES

    x = torch.randn(SIZE_BYTES // 4, generator=torch.Generator().manual_seed(0))
    info = CompressionInfo.from_tensor(x, key="bench")
    codecs = {
        "blockwise8": BlockwiseCodec(8), "blockwise4": BlockwiseCodec(4),
        "blockwise8 + error feedback": BlockwiseCodec(8, error_feedback=True),
        "blockwise4 + error feedback": BlockwiseCodec(4, error_feedback=True),
        REFERENCE_ROWS[8]: BlockwiseCodec(8), REFERENCE_ROWS[4]: BlockwiseCodec(4),
        "hivemind Uniform8BitQuantization": Uniform8BitQuantization(),
        "hivemind Float16Compression": Float16Compression(),
    }
    if not native.available():
        print("note: the fused C path is unavailable here; every blockwise row runs the torch reference",
              file=sys.stderr)
    # A process's first huge-page buffers come slowly (the kernel gathers free 2 MiB blocks) and
    # later ones fast; an agent compresses every epoch for hours, so measure the steady state.
    for _ in range(WARMUP_ROUNDS):
        codecs["blockwise8"].extract(codecs["blockwise8"].compress(x, info))
    rows: dict[str, dict] = {}
    out = torch.empty_like(x)
    ceilings_and_kernels = (
        ("tensor copy (torch.clone)", x.clone), ("tensor copy into preallocated (copy_)", lambda: out.copy_(x)),
        (KERNEL_ROWS[8], lambda: dequantize(quantize(x, 8, BLOCK_SIZES[8]))),
        (KERNEL_ROWS[4], lambda: dequantize(quantize(x, 4, BLOCK_SIZES[4]))))
    for name, run in ceilings_and_kernels:
        times = _times(run, args.repeats)
        rows[name] = {"gbps": SIZE_BYTES / min(times) / 1e9, "gbps_median": SIZE_BYTES / statistics.median(times) / 1e9}
    for name, codec in codecs.items():
        compress_times, extract_times = [], []
        with torch_reference_only(name in REFERENCE_ROWS.values()):
            for _ in range(args.repeats + 1):  # the first round warms allocator and caches
                started = time.perf_counter()
                message = codec.compress(x, info)
                compressed = time.perf_counter()
                decoded = codec.extract(message)
                compress_times.append(compressed - started)
                extract_times.append(time.perf_counter() - compressed)
        totals = [c + e for c, e in zip(compress_times[1:], extract_times[1:])]
        rows[name] = {
            "gbps": SIZE_BYTES / min(totals) / 1e9, "gbps_median": SIZE_BYTES / statistics.median(totals) / 1e9,
            "compress_gbps": SIZE_BYTES / min(compress_times[1:]) / 1e9,
            "decompress_gbps": SIZE_BYTES / min(extract_times[1:]) / 1e9,
            # with error feedback the output carries the last round's residual on purpose: no error figure
            "relative_error": None if "feedback" in name else float((decoded.float() - x).norm() / x.norm()),
            "wire_bytes_per_value": len(message.buffer) / x.numel(),
        }
    figures = _ratios(rows)
    figures.update({"benchmark": "kernels_throughput", "tensor_bytes": SIZE_BYTES, "threads": torch.get_num_threads(),
                    "repeats": args.repeats, "freed_memory": memory, "rows": rows})
    print(json.dumps(figures) if args.json else _table(figures))
    return 0


@contextlib.contextmanager
def torch_reference_only(active: bool):
    """Run the blockwise codecs on the torch reference path, as on a machine without a C compiler."""
    if not active:
        yield
        return
    saved = os.environ.get(native.DISABLE_ENV)
    os.environ[native.DISABLE_ENV] = "0"
    native.load.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del os.environ[native.DISABLE_ENV]
        else:
            os.environ[native.DISABLE_ENV] = saved
        native.load.cache_clear()


def _times(run: Callable[[], object], repeats: int) -> list[float]:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def _ratios(rows: dict[str, dict]) -> dict:
    uniform8 = rows["hivemind Uniform8BitQuantization"]
    ratios = {}
    for ours in ("blockwise8", "blockwise4", "blockwise8 + error feedback", "blockwise4 + error feedback"):
        row = rows[ours]
        reference = rows[REFERENCE_ROWS[8 if "8" in ours else 4]]
        ratios[ours] = {
            "x_uniform8_throughput": row["gbps"] / uniform8["gbps"],
            "x_torch_reference_throughput": row["gbps"] / reference["gbps"],
            "fraction_of_clone": row["gbps"] / rows["tensor copy (torch.clone)"]["gbps"],
            "fraction_of_copy_into_preallocated": row["gbps"] / rows["tensor copy into preallocated (copy_)"]["gbps"],
            "error_vs_uniform8": row["relative_error"] / uniform8["relative_error"] if row["relative_error"] else None,
        }
    copy = rows["tensor copy into preallocated (copy_)"]["gbps"]
    return {"ratios": ratios, "kernels_alone_fraction_of_copy": {name: rows[name]["gbps"] / copy
                                                                 for name in KERNEL_ROWS.values()}}


def _table(figures: dict) -> str:
    title = (f"kernels_throughput: 64 MiB fp32 tensor, {figures['threads']} torch threads, freed memory "
             f"{figures['freed_memory']}, best of {figures['repeats']} (median in brackets)")
    lines = [title, "",
             f"{'':<40}{'GB/s c+d':>16}{'compress':>10}{'decomp.':>9}{'rel. error':>12}{'bytes/value':>13}"]
    for name, row in figures["rows"].items():
        through = f"{row['gbps']:.2f} ({row['gbps_median']:.2f})"
        if "compress_gbps" not in row:
            lines.append(f"{name:<40}{through:>16}")
            continue
        error = "-" if row["relative_error"] is None else f"{row['relative_error']:.5f}"
        lines.append(f"{name:<40}{through:>16}{row['compress_gbps']:>10.2f}{row['decompress_gbps']:>9.2f}"
                     f"{error:>12}{row['wire_bytes_per_value']:>13.3f}")
    lines += ["", (f"{'ratios':<40}{'x Uniform8':>12}{'x torch ref.':>13}{'of clone':>10}{'of copy_':>10}"
                   f"{'error / Uniform8':>18}")]
    for name, ratio in figures["ratios"].items():
        lines.append(f"{name:<40}{ratio['x_uniform8_throughput']:>12.2f}{ratio['x_torch_reference_throughput']:>13.2f}"
                     f"{ratio['fraction_of_clone']:>10.2f}"
                     f"{ratio['fraction_of_copy_into_preallocated']:>10.2f}"
                     f"{'-' if ratio['error_vs_uniform8'] is None else format(ratio['error_vs_uniform8'], '.2f'):>18}")
    lines.append("")
    lines += [f"{name:<40}{fraction:.2f} of copy_"
              for name, fraction in figures["kernels_alone_fraction_of_copy"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
