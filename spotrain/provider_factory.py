"""Builds the provider a spec enables."""

from __future__ import annotations

from spotrain.config import ClusterSpec
from spotrain.home import local_cloud_dir


def make_provider(spec: ClusterSpec):
    from spotrain.providers.local import LocalProvider

    return LocalProvider(spec.providers.local, local_cloud_dir())
