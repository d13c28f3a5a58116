"""Checks that keep non-finite values out of the swarm."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient is finite: one max-abs pass, NaN and Inf propagate through it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))
