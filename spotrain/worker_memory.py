"""What training a task takes of one worker's memory, for `training.memory_per_worker_gb`.

A data-parallel worker trains the whole model, a SWARM stage peer one stage: each holds, per
parameter, its fp32 weight, gradient and Adam's two moments (`BYTES_PER_PARAMETER`). Activations
and the process itself come on top (benchmarks/swarm_rebalance.py measures that overhead), so the
figure is a floor: a spec whose floor exceeds the budget cannot train. Parameters are counted on
torch's meta device, so checking a model too large for this machine allocates nothing.
"""

from __future__ import annotations

BYTES_PER_PARAMETER = 16  # weight, gradient, Adam's exp_avg and exp_avg_sq, fp32 each


def training_bytes(task: str, pipeline: bool) -> tuple[int, int]:
    """(bytes, parameters) of what one worker trains: the whole model, or a pipeline's largest stage."""
    import torch

    from spotrain.contracts.task import load_pipeline_task, load_task

    with torch.device("meta"):
        if pipeline:
            stages = load_pipeline_task(task)
            parameters = max(sum(p.numel() for p in stages.build_stage(i).parameters())
                             for i in range(stages.num_stages))
        else:
            parameters = sum(p.numel() for p in load_task(task).build_model().parameters())
    return parameters * BYTES_PER_PARAMETER, parameters


def memory_refusal(task: str, pipeline: bool, gigabytes: float) -> str | None:
    """Why a worker with `gigabytes` of memory cannot train `task`, or None when it fits."""
    needed, parameters = training_bytes(task, pipeline)
    if needed <= gigabytes * 1e9:
        return None
    what = "its largest stage" if pipeline else "the whole model"
    hint = "" if pipeline else "; training.mode: swarm splits it over stage peers"
    return (f"training.memory_per_worker_gb: {what} of {task} needs {needed / 1e9:.2f} GB to train "
            f"({parameters:,} parameters x {BYTES_PER_PARAMETER} bytes), more than {gigabytes:g}{hint}")
