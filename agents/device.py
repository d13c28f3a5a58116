"""Where the agent trains: the VM's accelerator when it has one, else the CPU.

`SPOTRAIN_DEVICE` overrides the choice (`cpu`, `cuda`, `cuda:1`; `auto` or unset: CUDA when
torch sees a GPU). The model, every batch and so the optimizer's state live on that device;
hivemind keeps its averaging buffers on the CPU and the codecs move tensors to where they encode
them (spotrain.kernels.codecs). A task may opt into mixed precision (`TrainingTask.mixed_precision`,
`"bfloat16"`): the forward and the loss then run under autocast, on CUDA only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

DEVICE_ENV = "SPOTRAIN_DEVICE"
PRECISIONS = {"bfloat16": torch.bfloat16}


def choose_device(requested: str | None = None,
                  cuda_available: Callable[[], bool] = torch.cuda.is_available) -> torch.device:
    """The device to train on; a named device torch cannot use is a ValueError naming it."""
    name = (requested if requested is not None else os.environ.get(DEVICE_ENV, "auto")).strip() or "auto"
    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{DEVICE_ENV}={name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not cuda_available():
        raise ValueError(f"{DEVICE_ENV}={name!r}: this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={name!r}: spotrain trains on cpu or cuda")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch with every tensor in it (nested in tuples, lists and dicts) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def task_precision(task: object) -> str | None:
    """The task's `mixed_precision` (None when it has none); anything else is a ValueError naming it."""
    precision = getattr(task, "mixed_precision", None)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"TrainingTask.mixed_precision {precision!r}: expected None or one of {sorted(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager[Any]:
    """The forward's precision: autocast on CUDA when the task asks for it, else nothing changes."""
    if precision is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=PRECISIONS[precision])


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


__all__ = ["DEVICE_ENV", "autocast", "choose_device", "describe", "task_precision", "to_device"]
