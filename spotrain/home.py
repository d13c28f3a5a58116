"""Where spotrain keeps its state: $SPOTRAIN_HOME (default ~/.spotrain)."""

from __future__ import annotations

import os
from pathlib import Path

from spotrain.errors import ClusterNotFound, SpotrainError


def home() -> Path:
    return Path(os.environ.get("SPOTRAIN_HOME") or Path.home() / ".spotrain")


def clusters_dir() -> Path:
    return home() / "clusters"


def cluster_dir(name: str) -> Path:
    return clusters_dir() / name


def ledger_path(name: str) -> Path:
    return cluster_dir(name) / "ledger.db"


def local_cloud_dir() -> Path:
    return home() / "local-cloud"


def cluster_names() -> list[str]:
    """Every cluster with a ledger, sorted."""
    return sorted(p.parent.name for p in clusters_dir().glob("*/ledger.db"))


def existing_cluster(name: str | None) -> str:
    """The cluster to act on: the one named, or the only one there is."""
    names = cluster_names()
    if name is not None:
        if name not in names:
            raise ClusterNotFound(f"no cluster named {name!r} under {clusters_dir()}")
        return name
    if len(names) == 1:
        return names[0]
    if not names:
        raise ClusterNotFound(f"no clusters under {clusters_dir()}")
    raise SpotrainError(f"several clusters ({', '.join(names)}): name one")
