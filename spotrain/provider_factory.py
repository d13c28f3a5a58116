"""Builds the provider a spec enables: one object over every enabled provider."""

from __future__ import annotations

from spotrain.config import ClusterSpec
from spotrain.home import local_cloud_dir
from spotrain.providers.base import Provider
from spotrain.providers.multi import MultiProvider


def make_provider(spec: ClusterSpec) -> MultiProvider:
    providers: list[Provider] = []
    enabled = spec.providers.enabled()
    if "local" in enabled:
        from spotrain.providers.local import LocalProvider

        code_dir = spec.training.code_dir  # the agents run in their VM folders: import the task from here
        providers.append(LocalProvider(spec.providers.local, local_cloud_dir(),
                                       python_path=(code_dir,) if code_dir else ()))
    if "aws" in enabled:
        from spotrain.providers.aws import AwsProvider

        providers.append(AwsProvider(spec.providers.aws))
    if "gcp" in enabled:
        from spotrain.providers.gcp import GcpProvider

        providers.append(GcpProvider(spec.providers.gcp))
    return MultiProvider(providers)
