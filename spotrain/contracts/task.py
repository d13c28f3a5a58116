"""The TrainingTask contract: what a user's `training.task` must provide (a PipelineTask in swarm mode)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from spotrain.contracts.pipeline import PipelineTask


class TaskImportError(ValueError):
    """`training.task` names nothing importable, or not a TrainingTask."""


class TrainingTask(Protocol):
    """A model, its data, its loss and its optimizer, as every worker builds them."""

    def build_model(self) -> torch.nn.Module: ...

    def batches(self, worker_seed: int, batch_size: int) -> Iterator[Any]: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer: ...

    # Optional: `mixed_precision = "bfloat16"` runs the forward and the loss under autocast on a
    # GPU (the agent trains on the VM's GPU when it has one; batches are moved there for you).


@dataclass(frozen=True)
class SimpleTask:
    """A TrainingTask assembled from four callables."""

    build_model: Callable[[], torch.nn.Module]
    batches: Callable[[int, int], Iterator[Any]]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    make_optimizer: Callable[[Any], torch.optim.Optimizer]
    mixed_precision: str | None = None  # "bfloat16": autocast on CUDA


_REQUIRED = ("build_model", "batches", "loss", "make_optimizer")


def load_task(reference: str) -> TrainingTask:
    """Import "module:attr"; a callable attribute is called to build the task."""
    target = _import_attr(reference)
    task: TrainingTask = target() if callable(target) and not _is_task(target) else target
    missing = [name for name in _REQUIRED if not callable(getattr(task, name, None))]
    if missing:
        raise TaskImportError(f"{reference} is not a TrainingTask (missing {', '.join(missing)})")
    return task


def _import_attr(reference: str) -> Any:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise TaskImportError(f"expected 'module:attr', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure of user code at import time is a bad spec
        raise TaskImportError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise TaskImportError(f"module {module_name!r} has no attribute {attr!r}") from None


def _is_task(obj: object) -> bool:
    return all(callable(getattr(obj, name, None)) for name in _REQUIRED)


def load_pipeline_task(reference: str) -> PipelineTask:
    """Import "module:attr" naming a PipelineTask (`training.mode: swarm`); a callable one is called."""
    from spotrain.contracts.pipeline import PipelineTask

    target = _import_attr(reference)
    task = target if isinstance(target, PipelineTask) or not callable(target) else target()
    if not isinstance(task, PipelineTask):
        raise TaskImportError(f"{reference} is not a PipelineTask (training.mode swarm needs one)")
    return task
