"""GPU check, for a session that has a CUDA machine: the agent's device path end to end.

What it checks, each a line (and one JSON object with --json):
1. device: `choose_device()` picks CUDA; `SPOTRAIN_DEVICE=cpu` still forces the CPU;
2. training: tiny_gpt on the GPU through the agent's own step pieces (model on the device,
   batches moved by `to_device`, bfloat16 autocast), loss falling over --steps steps, parameters
   and optimizer state on the GPU;
3. hivemind: one agent's SwarmOptimizer (a real DHT, alone) steps CUDA parameters through an epoch;
4. codecs: blockwise8/4 encode a CUDA tensor (Triton when installed), payload decoded on the CPU
   within the codec's error bound, and the encode time against the CPU encoding of the same
   tensor measured in the same run (a ratio; > 1 means the GPU path is faster).

    .venv/bin/python benchmarks/gpu_check.py [--steps 30] [--json]
Exit code 0 when every check passed, 1 otherwise, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from spotrain.progress_bars import StepBars


def check_device() -> dict:
    from spotrain.agents.device import DEVICE_ENV, choose_device

    auto = choose_device("auto")
    os.environ[DEVICE_ENV] = "cpu"
    forced = choose_device()
    del os.environ[DEVICE_ENV]
    return {"ok": auto.type == "cuda" and forced.type == "cpu", "auto": str(auto), "forced": str(forced)}


def check_training(steps: int) -> dict:
    from spotrain.agents.device import autocast, choose_device, to_device
    from spotrain.examples.tiny_gpt import task as make_task

    task = make_task() if callable(make_task) else make_task
    device = choose_device("auto")
    model = task.build_model().to(device)
    optimizer = task.make_optimizer(model.parameters())
    batches = task.batches(0, 16)
    losses = []
    for _ in range(steps):
        with autocast(device, "bfloat16"):
            loss = task.loss(model, to_device(next(batches), device)).float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    # Adam's step counts are CPU scalars by design; its moments must be on the GPU
    state_devices = {t.device.type for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0}
    params_devices = {p.device.type for p in model.parameters()}
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return {"ok": last < first and params_devices == {"cuda"} and state_devices == {"cuda"},
            "loss_first5": first, "loss_last5": last, "parameters_on": sorted(params_devices),
            "optimizer_state_on": sorted(state_devices)}


def check_hivemind() -> dict:
    import hivemind

    from spotrain.agents import egress
    from spotrain.kernels import SwarmOptimizer, install_codecs, optimizer_options

    install_codecs()
    egress.install()
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    model = torch.nn.Linear(256, 256).cuda()
    optimizer = SwarmOptimizer(dht=dht, run_id="gpu-check", params=model.parameters(),
                               optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), batch_size_per_step=8,
                               target_batch_size=32, **optimizer_options("blockwise8", "none"),
                               matchmaking_time=1.0, averaging_timeout=10.0, verbose=False)
    try:
        for _ in range(12):
            loss = model(torch.randn(8, 256, device="cuda")).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        epoch = optimizer.local_epoch
    finally:
        optimizer.shutdown()
        dht.shutdown()
    return {"ok": epoch >= 1 and next(model.parameters()).device.type == "cuda", "epochs": epoch}


def check_codecs() -> dict:
    from hivemind.compression import CompressionInfo

    from spotrain.kernels import accelerated, get_codec

    results: dict = {"triton": accelerated.available()}
    ok = True
    tensor = torch.randn(16 * 1024 * 1024, device="cuda")
    for name, levels in (("blockwise8", 127), ("blockwise4", 7)):
        codec = get_codec(name)
        info = CompressionInfo.from_tensor(tensor, key=name)
        timings = {}
        for where, source in (("cuda", tensor), ("cpu", tensor.cpu())):
            codec.compress(source, info)  # warm up (Triton compiles on first use)
            torch.cuda.synchronize()
            started = time.perf_counter()
            message = codec.compress(source, info)
            torch.cuda.synchronize()
            timings[where] = time.perf_counter() - started
        decoded = codec.extract(message)
        error = float((decoded - tensor.cpu()).abs().max())
        bound = float(tensor.abs().max()) / levels * 1.01
        ok = ok and decoded.device.type == "cpu" and error <= bound
        results[name] = {"max_error": error, "bound": bound,
                         "gpu_over_cpu_speed": timings["cpu"] / timings["cuda"]}
    results["ok"] = ok
    return results


CHECKS = {"device": "choose_device() and SPOTRAIN_DEVICE=cpu", "training": "tiny_gpt steps on the GPU",
          "hivemind": "an epoch of SwarmOptimizer on CUDA parameters",
          "codecs": "blockwise8/4 on a CUDA tensor, against the CPU"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine", file=sys.stderr)
        return 2
    checks = {}
    steps = (("device", check_device), ("training", lambda: check_training(args.steps)),
             ("hivemind", check_hivemind), ("codecs", check_codecs))
    with StepBars(len(steps)) as bars:
        for name, check in steps:
            bars.start(f"{name}: {CHECKS[name]}")
            try:
                checks[name] = check()
            except Exception as error:  # one failing check must not hide the others
                checks[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    if not args.json:  # after the bars: stdout is the checks' lines alone
        for name, result in checks.items():
            print(f"{name}: {json.dumps(result)}", flush=True)
    if args.json:
        print(json.dumps({"gpu": torch.cuda.get_device_name(0), **checks}))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
