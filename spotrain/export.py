"""`spotrain export`: the newest checkpoint's model weights, as a file plain torch loads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotrain.errors import SpotrainError

if TYPE_CHECKING:
    from spotrain.config import ClusterSpec
    from spotrain.stores import Trust

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    cluster: str
    epoch: int
    checkpoint_dir: str  # the store it was read from
    path: Path


def stored_cluster_spec(name: str) -> ClusterSpec:
    """The spec of the cluster's latest run, as the ledger keeps it (no user code)."""
    from spotrain.home import ledger_path
    from spotrain.ledger_file import opened_ledger
    from spotrain.spec_file import stored_spec

    with opened_ledger(ledger_path(name)) as ledger:
        run = ledger.current_run()
    if run is None:
        raise SpotrainError(f"cluster {name!r} has no run")
    return stored_spec(run.spec)


def newest_model(urls: tuple[str, ...], trust: Trust) -> tuple[int, Any, str] | None:
    """(epoch, model state, store) of the newest checkpoint that verifies in any store, among those
    `trust` believes (a manifest sealed by an admitted peer: spotrain.stores.seal). The checkpoint
    names the model's buffers ("constants"), the only tensors that may be infinite: a reader
    without the model could not tell them."""
    from spotrain.stores import ReplicatedStore, StoreError, decode_state, named_constants

    for store, manifest in ReplicatedStore.from_urls(urls, trust=trust).candidates():
        try:
            files = store.read(manifest)
            declared = decode_state({k: v for k, v in files.items() if k == "constants.pt"})
            constants = named_constants(declared.get("constants", ()))
            state = decode_state({k: v for k, v in files.items() if k == "model.pt"}, constants)
        except StoreError as error:
            log.warning("%s: skipping checkpoint %s: %s", store.url, manifest.name, error)
            continue
        if "model" in state:
            return manifest.epoch, state["model"], store.url
    return None


def export_model(cluster: str | None, out: Path) -> Exported:
    """Write the newest valid checkpoint's model state_dict to `out` (torch.load(out, weights_only=True))."""
    import torch

    from spotrain.access import checkpoint_trust
    from spotrain.geo import store_network
    from spotrain.home import cluster_dir, existing_cluster
    from spotrain.stores import StoreError

    name = existing_cluster(cluster)
    spec = stored_cluster_spec(name)
    urls = spec.checkpoint_stores()
    try:
        with store_network(spec, name) as reachable:
            if not reachable:
                raise SpotrainError(f"the emulated cloud of {name!r} is gone, and its buckets with it "
                                    f"(`spotrain down` removes them): export before down")
            found = newest_model(urls, checkpoint_trust(cluster_dir(name), name))
    except StoreError as error:
        raise SpotrainError(f"cannot read the checkpoint stores of {name!r}: {error}") from None
    if found is None:
        raise SpotrainError(f"no checkpoint of {name!r} in {', '.join(urls)} yet (workers write one every "
                            f"checkpoint.every_epochs epochs and when the run ends; only checkpoints "
                            f"signed by an admitted worker count)")
    epoch, model, url = found
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, out)
    except OSError as error:
        raise SpotrainError(f"{out}: cannot write: {error.strerror}") from None
    return Exported(name, epoch, url, out)
