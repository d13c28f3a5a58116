"""The spotrain CLI with a provider that hangs once a cloud accepted a launch: a controller for a test
to SIGKILL between a launch request and its response, before the ledger hears of the instance.

    python tests/hang_after_launch.py MARKER_DIR launch SPEC [options]

After each accepted launch it writes MARKER_DIR/<request-id>.launched, then sleeps until killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from spotrain import cluster_ops
from spotrain.cli import main
from spotrain.config import ClusterSpec
from spotrain.providers.base import Instance, LaunchRequest, Offer
from spotrain.providers.multi import MultiProvider


class HangAfterLaunch:
    """`inner` in all but one thing: a launch it accepted never returns."""

    def __init__(self, inner: MultiProvider, markers: Path):
        self.inner, self.markers = inner, markers
        self.name, self.termination_lag_seconds = inner.name, inner.termination_lag_seconds
        self.providers = inner.providers  # each cloud's own, for `launch` to price its plan as `plan` does

    def launch(self, request: LaunchRequest) -> Instance:
        self.inner.launch(request)
        self.markers.mkdir(parents=True, exist_ok=True)
        (self.markers / f"{request.request_id}.launched").write_text(str(os.getpid()))
        while True:  # until the test kills this process
            time.sleep(3600)

    def check_credentials(self) -> None:
        self.inner.check_credentials()

    def offers(self) -> list[Offer]:
        return self.inner.offers()

    def list_instances(self, cluster: str) -> list[Instance]:
        return self.inner.list_instances(cluster)

    def terminate(self, instance_id: str) -> None:
        self.inner.terminate(instance_id)


if __name__ == "__main__":
    markers = Path(sys.argv.pop(1))
    make_provider = cluster_ops.make_provider

    def make_hanging_provider(spec: ClusterSpec) -> HangAfterLaunch:
        return HangAfterLaunch(make_provider(spec), markers)

    cluster_ops.make_provider = make_hanging_provider
    main()
