"""`spotrain init`: a folder holding a task of one's own and a spec that trains it locally as is."""

from __future__ import annotations

import re
from pathlib import Path

from spotrain.config import CLUSTER_NAME_PATTERN
from spotrain.errors import SpotrainError

TASK_MODULE = "my_task"
SPEC_FILE = "spotrain.yaml"

TASK_TEXT = '''"""A TrainingTask of your own: every spotrain worker imports this module and calls the four
methods of `task`. Replace the model, the data, the loss and the optimizer with yours.

This skeleton fits an MLP to a fixed random "teacher" function: it needs no download, and two
local workers bring its loss from about 0.43 to about 0.2 in a minute of CPU time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

INPUTS = 16


class Task:
    def build_model(self) -> nn.Module:
        """The model every worker starts from. Seed it: the workers must start from the same weights."""
        torch.manual_seed(0)
        width = 512
        return nn.Sequential(nn.Linear(INPUTS, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                             nn.Linear(width, 1))

    def batches(self, worker_seed: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches of `batch_size` samples. Each worker gets its own `worker_seed`: use it to
        read a different part of your data (or shuffle it differently) on each worker.

        Each worker runs in its own working directory (a local VM's folder, a cloud VM's), not in
        this folder: a relative path such as open("data.csv") is not found there. Name your files
        relative to this module instead: Path(__file__).parent / "data.csv" (from pathlib)."""
        teacher = torch.Generator().manual_seed(1234)  # the same function to learn on every worker
        weights = torch.randn(INPUTS, 1, generator=teacher)
        samples = torch.Generator().manual_seed(worker_seed)
        while True:
            x = torch.randn(batch_size, INPUTS, generator=samples)
            yield x, torch.sin(x @ weights / 2)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A scalar tensor to minimize on one batch; the worker calls backward() on it."""
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """Built once per worker around the model's parameters; the swarm averages what it does.
        It steps once per global epoch (target_batch_size samples), so few steps are taken: at
        lr=3e-3 the first one overshot (loss 0.43 -> 1.24) and the loss swung for five more epochs."""
        return torch.optim.Adam(params, lr=1e-3)


# The spec names this object: `training.task: {module}:task`.
task = Task()
'''

SPEC_TEXT = """# A spot cluster on this machine training the task in {module}.py (every key, with what it means:
# `spotrain schema`, the spec's JSON schema; the README's "Train your own model").
#   spotrain launch {spec} --duration 120   # train for two minutes, then print the report
#   spotrain export {name} model.pt   # the newest weights, for torch.load("model.pt", weights_only=True)
name: {name}
budget: {{total_usd: 0.20}}
training:
  task: {module}:task          # module:attribute, imported from code_dir (default: this folder)
  # samples the swarm gathers per global epoch (one optimizer step): pick it so that an epoch takes
  # a few seconds of the swarm's compute, since the workers average once per epoch
  target_batch_size: 32768
  batch_size: 256              # samples per local step
  delayed_updates: false       # one machine's wire is fast: no need to hide it behind the next epoch
placement:
  workers: 2
checkpoint: {{every_epochs: 2, replicas: 1}}   # written under $SPOTRAIN_HOME/clusters/{name}/checkpoints
providers:
  local:
    time_compression: 10       # a trace hour of spot preemptions passes in six wall minutes
"""


def cluster_name_for(folder: Path) -> str:
    """A valid cluster name from the folder's name ("My Model" -> "my-model")."""
    name = re.sub(r"[^a-z0-9-]+", "-", folder.resolve().name.lower()).strip("-")[:63]
    return name if re.match(CLUSTER_NAME_PATTERN, name) else "my-model"


def write_skeleton(folder: Path, name: str | None = None) -> list[Path]:
    """Write the task module and the spec into `folder`; never overwrites a file."""
    name = name or cluster_name_for(folder)
    if not re.match(CLUSTER_NAME_PATTERN, name):
        raise SpotrainError(f"--name: {name!r} is not a cluster name (lower-case letters, digits, '-')")
    task_path, spec_path = folder / f"{TASK_MODULE}.py", folder / SPEC_FILE
    existing = [str(p) for p in (task_path, spec_path) if p.exists()]
    if existing:
        raise SpotrainError(f"{', '.join(existing)} already exist(s): init writes into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    task_path.write_text(TASK_TEXT.replace("{module}", TASK_MODULE))
    spec_path.write_text(SPEC_TEXT.format(module=TASK_MODULE, name=name, spec=SPEC_FILE))
    return [task_path, spec_path]
