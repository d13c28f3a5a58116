"""The SWARM benchmark's figures that need no cgroups: activation bytes, memory, loss.

- Activation bytes: a trainer and one stage server per stage on real hivemind P2P (127.0.0.1),
  microbatches of tiny_gpt_pipeline:task; every message is encoded once (the trainer relays stage
  outputs as they came), so the codec counter's sent bytes are all the bytes the pipeline put on
  the wire, per sample, with blockwise8 against none (fp32) in the same run.
- Memory: resident memory of a fresh process after building and stepping (Adam) the wide GPT
  whole (a data-parallel agent) against one of its 4 stages (a stage peer), and of a process
  that only imported torch, hivemind and the stage server (the fixed overhead).
- Loss: held-out loss after the same samples, data parallelism's model (the pipeline's stages
  composed in one process, one Adam step per `target_batch` samples on the mean gradient of its
  microbatches, as hivemind's Optimizer accumulates) against the same stages trained through stage
  servers with blockwise8 activations (one peer per stage, 2 microbatches in flight, each stage
  stepping once per `target_batch` samples), same seeds, data order, learning rate and number of
  optimizer steps. The trainer runs one step's microbatches per `train` call, so none is in
  flight across a step. `loss_factors` repeats it with each factor changed in turn (activations
  uncompressed, one microbatch in flight, a step per microbatch, microbatches in flight across
  steps).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import torch

MICROBATCH = 4
LOOPBACK = {"nat_port_map": False, "auto_nat": False, "use_relay": False}


async def _pipeline(codec: str, microbatches: int, seed: int, *, in_flight: int = 2, step_microbatches: int = 1,
                    flush: bool = True) -> tuple[list[torch.nn.Module], list[float]]:
    """One peer per stage; with `flush`, one `train` call per optimizer step's microbatches, else one
    for all of them (microbatches in flight across steps, as several trainers' are)."""
    from hivemind.p2p import P2P

    from spotrain.agents.pipeline.stage_server import StageServer
    from spotrain.agents.pipeline.trainer import PipelineTrainer
    from spotrain.examples.tiny_gpt_pipeline import task

    p2ps = await asyncio.gather(*(P2P.create(**LOOPBACK) for _ in range(task.num_stages)))
    servers = [StageServer(p2p, task, stage, cluster="bench", activations=codec,
                           step_samples=step_microbatches * MICROBATCH) for stage, p2p in enumerate(p2ps)]
    await asyncio.gather(*(server.start() for server in servers))
    maddrs = [m for server in servers for m in await server.p2p.get_visible_maddrs()]
    trainer_p2p = await P2P.create(initial_peers=maddrs, **LOOPBACK)
    trainer = PipelineTrainer(trainer_p2p, task, lambda stage: [servers[stage].p2p.peer_id], cluster="bench",
                              activations=codec, max_in_flight=in_flight)
    try:
        batches = task.batches(seed, MICROBATCH)
        per_call = step_microbatches if flush else microbatches
        for start in range(0, microbatches, per_call):
            stats = await trainer.train(batches, min(per_call, microbatches - start))
        if stats.completed != microbatches:
            raise RuntimeError(f"{stats.dropped} microbatches dropped")
        return [server.module for server in servers], stats.losses
    finally:
        for server in servers:
            await server.stop()
            await server.p2p.shutdown()
        await trainer_p2p.shutdown()


def activation_bytes(microbatches: int = 16) -> dict[str, float]:
    from spotrain.kernels import install_codecs, traffic

    install_codecs()
    per_sample = {}
    for codec in ("none", "blockwise8"):
        before = traffic.sent
        asyncio.run(_pipeline(codec, microbatches, seed=1))
        per_sample[codec] = (traffic.sent - before) / (microbatches * MICROBATCH)
    return {"bytes_per_sample_none": per_sample["none"], "bytes_per_sample_blockwise8": per_sample["blockwise8"],
            "ratio": per_sample["none"] / per_sample["blockwise8"]}


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    import hivemind
    from spotrain.agents.pipeline import stage_server
    torch.set_num_threads(1)
    what = sys.argv[1]
    if what != "overhead":
        from spotrain.examples import wide_gpt
        model = wide_gpt.task.build_model() if what == "whole" else wide_gpt.pipeline.build_stage(int(what))
        optimizer = torch.optim.Adam(model.parameters())
        params = sum(p.numel() for p in model.parameters())
        batch = next(wide_gpt.task.batches(0, 2))
        if what == "whole":
            loss = wide_gpt.task.loss(model, batch)
        else:
            stage = int(what)
            inputs = batch[:, :-1] if stage == 0 else torch.randn(2, 64, wide_gpt.WIDTH)
            output = model(inputs)
            loss = output.float().pow(2).mean()
        loss.backward()
        optimizer.step()
    else:
        params = 0
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "parameters": params}))
""")


def _probe(what: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, what], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def memory_per_stage() -> dict[str, object]:
    from spotrain.examples import wide_gpt

    overhead = _probe("overhead")["rss_mb"]
    whole = _probe("whole")
    stages = [_probe(str(stage)) for stage in range(wide_gpt.STAGES)]
    largest = max(stage["rss_mb"] for stage in stages)
    bound = whole["rss_mb"] / wide_gpt.STAGES + overhead
    return {"model": "spotrain.examples.wide_gpt", "stages": wide_gpt.STAGES, "overhead_mb": overhead,
            "whole_rss_mb": whole["rss_mb"], "whole_parameters": whole["parameters"],
            "stage_rss_mb": [s["rss_mb"] for s in stages], "stage_parameters": [s["parameters"] for s in stages],
            "largest_stage_vs_whole": largest / whole["rss_mb"],
            "bound_mb": bound, "largest_stage_within_bound": largest <= bound}


def _held_out_loss(modules: list[torch.nn.Module]) -> float:
    from spotrain.contracts.pipeline import pipeline_loss
    from spotrain.examples.tiny_gpt_pipeline import task

    batches = task.batches(999_999, 32)
    with torch.no_grad():
        return sum(float(pipeline_loss(task, modules, next(batches))) for _ in range(4)) / 4


def _data_parallel(microbatches: int, seed: int, step_microbatches: int) -> float:
    """The stages composed in one process; one Adam step per `step_microbatches` on their mean gradient."""
    from spotrain.contracts.pipeline import pipeline_loss
    from spotrain.examples.tiny_gpt_pipeline import task

    modules = [task.build_stage(stage) for stage in range(task.num_stages)]
    optimizer = task.make_optimizer(0, [p for m in modules for p in m.parameters()])
    batches = task.batches(seed, MICROBATCH)
    for start in range(0, microbatches, step_microbatches):
        count = min(step_microbatches, microbatches - start)
        for _ in range(count):
            (pipeline_loss(task, modules, next(batches)) * MICROBATCH).backward()
        for param in (p for m in modules for p in m.parameters()):
            if param.grad is not None:
                param.grad.div_(count * MICROBATCH)
        optimizer.step()
        optimizer.zero_grad()
    return _held_out_loss(modules)


def _swarm(codec: str, microbatches: int, seed: int, in_flight: int, step_microbatches: int,
           flush: bool = True) -> float:
    modules, _ = asyncio.run(_pipeline(codec, microbatches, seed, in_flight=in_flight,
                                       step_microbatches=step_microbatches, flush=flush))
    return _held_out_loss(modules)


def loss_against_data_parallel(samples: int, repeats: int, target_batch: int) -> dict[str, object]:
    from spotrain.kernels import install_codecs

    install_codecs()
    torch.set_num_threads(1)
    microbatches, step = samples // MICROBATCH, max(target_batch // MICROBATCH, 1)
    data_parallel, swarm = [], []
    for repeat in range(repeats):
        data_parallel.append(_data_parallel(microbatches, repeat, step))
        swarm.append(_swarm("blockwise8", microbatches, repeat, 2, step))
    dp_mean, swarm_mean = sum(data_parallel) / repeats, sum(swarm) / repeats
    return {"samples": microbatches * MICROBATCH, "repeats": repeats, "target_batch": step * MICROBATCH,
            "optimizer_steps": -(-microbatches // step), "data_parallel": data_parallel,
            "swarm": swarm, "swarm_vs_data_parallel": swarm_mean / dp_mean,
            "within_3_percent": abs(swarm_mean / dp_mean - 1) <= 0.03}


FACTOR_ROWS = [  # (activations, microbatches in flight, target batch in microbatches, flush at each step)
    ("none", 1, 1, True), ("blockwise8", 1, 1, True),  # a step per microbatch, one at a time
    ("none", 2, 1, False), ("blockwise8", 2, 1, False),  # a step per microbatch, two in flight across steps
    ("none", 2, 4, True), ("blockwise8", 2, 4, True),  # 4 microbatches per step, two in flight within a step
    ("blockwise8", 2, 4, False),  # ... and across steps
]


def loss_factors(samples: int, repeats: int) -> list[dict[str, object]]:
    """SWARM's held-out loss against data parallelism's at the same target batch, each factor in turn."""
    from spotrain.kernels import install_codecs

    install_codecs()
    torch.set_num_threads(1)
    microbatches = samples // MICROBATCH
    steps = sorted({row[2] for row in FACTOR_ROWS})
    baseline = {step: [_data_parallel(microbatches, seed, step) for seed in range(repeats)] for step in steps}
    rows = []
    for codec, in_flight, step, flush in FACTOR_ROWS:
        losses = [_swarm(codec, microbatches, seed, in_flight, step, flush) for seed in range(repeats)]
        ratios = [loss / dp for loss, dp in zip(losses, baseline[step], strict=True)]
        rows.append({"activations": codec, "in_flight": in_flight, "target_batch": step * MICROBATCH,
                     "flush_at_steps": flush, "swarm": losses, "data_parallel": baseline[step],
                     "swarm_vs_data_parallel": sum(losses) / sum(baseline[step]), "per_seed": ratios})
        print(f"  {codec:<11} in flight {in_flight}  target batch {step * MICROBATCH:>3}  flush {flush!s:<5}: "
              f"{rows[-1]['swarm_vs_data_parallel']:.4f} ({', '.join(f'{r:.4f}' for r in ratios)})",
              file=sys.stderr, flush=True)
    return rows
