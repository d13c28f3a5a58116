"""The controller's side of the emulated multi-region cloud (`providers.local.network: namespaces`).

The controller runs behind the cloud's NAT, in the cloud's controller namespace, as it would on
a laptop: `spotrain launch` builds the cloud (or finds it complete) and then re-executes itself
there with `nsenter --net`. exec keeps the process, so its pid, its start time (the lock record
`down` verifies) and a detached launch's ready pipe carry over; `status` and `down` keep working
from the host, which shares the controller's processes and files, only not its network. Host
commands that read the buckets (`report`, `export`, `status`) reach them from that namespace
too, for the duration of the read (`store_network`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from spotrain.config import ClusterSpec
from spotrain.errors import SpotrainError

if TYPE_CHECKING:
    from spotrain.providers.local import LocalProvider


def _local(spec: ClusterSpec) -> LocalProvider:
    from spotrain.home import local_cloud_dir
    from spotrain.providers.local import LocalProvider

    return LocalProvider(spec.providers.local, local_cloud_dir())


def run_controller_behind_nat(spec: ClusterSpec, say: Callable[[str], None]) -> None:
    """Build the spec's emulated cloud and re-execute this command in its controller namespace.
    Returns only when there is nothing to do: no emulated cloud, or already inside."""
    from spotrain.controller_process import controller_pid
    from spotrain.providers.base import AuthError
    from spotrain.providers.geo_buckets import EMULATED_CREDENTIALS
    from spotrain.providers.geo_network import in_namespace, same_namespace

    if not spec.providers.emulated_cloud():
        return
    provider = _local(spec)
    cloud = provider.cloud(spec.name)
    if same_namespace(cloud.plan.controller):
        return
    try:
        provider.check_credentials()
    except AuthError as error:
        raise SpotrainError(str(error)) from None
    pid = controller_pid(spec.name)
    if pid:
        raise SpotrainError(f"a controller (pid {pid}) already drives cluster {spec.name!r}")
    from spotrain.contracts.states import InstanceState

    running = {i.instance_id for i in provider.list_instances(spec.name) if i.state == InstanceState.RUNNING}
    if cloud.ensure(running):
        say(f"emulated cloud {cloud.plan.cloud}: {len(cloud.plan.regions)} region(s), "
            f"{cloud.plan.between_regions_mbit:g} Mbit/s between, {cloud.plan.within_region_mbit:g} within; "
            f"the controller behind NAT")
    sys.stdout.flush()
    sys.stderr.flush()
    argv = in_namespace(cloud.plan.controller, [sys.executable, "-m", "spotrain", *sys.argv[1:]])
    os.execvpe(argv[0], argv, dict(os.environ, **EMULATED_CREDENTIALS))


@contextmanager
def store_network(spec: ClusterSpec, cluster: str) -> Iterator[bool]:
    """This thread in the emulated cloud's controller namespace while the block reads its buckets.
    Yields whether the stores can be reached: always for other specs; for an emulated cloud, not
    once it is gone (its buckets went with it, and its addresses lead nowhere from here)."""
    if not spec.providers.emulated_cloud():
        yield True
        return
    from spotrain.providers.geo_buckets import EMULATED_CREDENTIALS
    from spotrain.providers.geo_network import entered, namespace_exists, same_namespace

    namespace = _local(spec).cloud(cluster).plan.controller
    if os.geteuid() != 0 or not namespace_exists(namespace):
        yield False
        return
    for key, value in EMULATED_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    if same_namespace(namespace):
        yield True
        return
    with entered(namespace):
        yield True
