"""`spotrain export`: the newest checkpoint's model weights, as a file plain torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spotrain.errors import SpotrainError


@dataclass(frozen=True)
class Exported:
    cluster: str
    epoch: int
    checkpoint_dir: Path
    path: Path


def checkpoint_dir(name: str) -> Path:
    """Where the cluster's latest run keeps its checkpoints, read from the stored spec (no user code)."""
    from spotrain.cluster_ops import checkpoint_store
    from spotrain.config import stored_spec
    from spotrain.home import ledger_path
    from spotrain.ledger import Ledger

    ledger = Ledger.open_existing(ledger_path(name))
    try:
        run = ledger.current_run()
    finally:
        ledger.close()
    if run is None:
        raise SpotrainError(f"cluster {name!r} has no run")
    return Path(checkpoint_store(stored_spec(run.spec)).removeprefix("file://"))


def export_model(cluster: str | None, out: Path) -> Exported:
    """Write the newest valid checkpoint's model state_dict to `out` (torch.load(out, weights_only=True))."""
    import torch

    from spotrain.agents.checkpoints import LocalDirStore
    from spotrain.home import existing_cluster

    name = existing_cluster(cluster)
    folder = checkpoint_dir(name)
    checkpoint = LocalDirStore(folder).load_newest()
    if checkpoint is None:
        raise SpotrainError(f"no checkpoint of {name!r} in {folder} yet (workers write one every "
                            f"checkpoint.every_epochs epochs and when the run ends)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint["model"], out)
    except OSError as error:
        raise SpotrainError(f"{out}: cannot write: {error.strerror}") from None
    return Exported(name, int(checkpoint["epoch"]), folder, out)
