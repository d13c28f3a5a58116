"""What the CLI's launch, down and status do: open the cluster's state, drive or stop it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from spotrain.config import ClusterSpec
from spotrain.contracts.log_noise import leaving
from spotrain.contracts.states import AgentState, InstanceState
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.controller_process import (
    controller_lock,
    controller_pid,
    lock_holder,
    lock_path,
    lock_refusal,
    stop_on_signals,
    tell_parent_ready,
)
from spotrain.errors import ControllerRunning, SpotrainError
from spotrain.home import cluster_dir, existing_cluster, ledger_path
from spotrain.ledger import Ledger, Run
from spotrain.ledger_file import opened_ledger
from spotrain.provider_factory import make_provider
from spotrain.spec_file import stored_spec
from spotrain.swarm import NoSwarm

if TYPE_CHECKING:
    from spotrain.metrics import MetricsEndpoint
    from spotrain.providers.multi import MultiProvider
    from spotrain.swarm_view import SwarmView


def checked_provider(spec: ClusterSpec):
    """The spec's provider, once every location is served and every enabled cloud's credentials work:
    before anything is launched."""
    from spotrain.plan import check_launchable
    from spotrain.providers.base import AuthError

    check_launchable(spec)
    provider = make_provider(spec)
    try:
        provider.check_credentials()
    except AuthError as error:
        raise SpotrainError(str(error)) from None  # names the provider: "aws: no credentials found ..."
    return provider


@dataclass(frozen=True)
class RunEnd:
    reason: str  # why the run ended, as the ledger records it
    failed: bool  # on something no retry fixes (ControlLoop.failed): `spotrain launch` exits non-zero


def launch(spec: ClusterSpec, *, duration: float | None, target_epoch: int | None, tick_seconds: float,
           say: Callable[[str], None], started: Callable[[], None] = lambda: None) -> RunEnd:
    """Drive the cluster until its run ends; returns how it ended. `started` is called once the
    checks passed and the run is opened (the controller's log file is written from then on)."""
    from spotrain.access import ClusterAccess
    from spotrain.shipping import ship_spec
    from spotrain.swarm_peers import PUBLISHED_PEERS_META, swarm_options
    from spotrain.swarm_view import SwarmView

    provider = checked_provider(spec)
    shipment = ship_spec(spec, say)  # before the ledger: a spec whose VMs cannot get the code writes nothing
    stop = threading.Event()
    if controller_pid(spec.name):  # told before the port is tried: a live controller holds the port too
        raise ControllerRunning(lock_refusal(spec.name))
    # the metrics port is taken before the lock file and the ledger are: a busy port writes nothing
    with (metrics_endpoint(spec) as endpoint, controller_lock(spec.name),
          opened_ledger(ledger_path(spec.name), create=True) as ledger, stop_on_signals(stop)):
        run = ledger.open_run(spec.budget.total_usd, spec.model_dump(mode="json"), time.time())
        end_at = run_end(ledger, run, duration)
        tell_parent_ready()  # before the DHT forks: its process must not inherit the pipe
        started()
        record_plan(ledger, run, spec, provider, say)
        running = [i for i in provider.list_instances(spec.name) if i.state == InstanceState.RUNNING]
        if running:
            say(f"adopting {len(running)} running instance(s) of {spec.name}")
        access = ClusterAccess(cluster_dir(spec.name), spec.name)  # the cluster key: who may join the swarm
        swarm = SwarmView(spec.name, access, **swarm_options(spec.providers.on_this_host(), spec.controller.reachable,
                                                             running, ledger.meta(PUBLISHED_PEERS_META)))
        try:
            settings = LoopSettings(tick_seconds=tick_seconds, end_at=end_at,
                                    target_epoch=target_epoch or spec.training.target_epoch,
                                    checkpoint_store=spec.default_checkpoint_store())
            loop = ControlLoop(spec, ledger, run, provider, swarm, settings, say=say, access=access)
            loop.shipment = shipment
            if endpoint is not None:
                endpoint.serve(loop)
                say(f"metrics for Prometheus at http://{spec.controller.metrics_host}:{endpoint.port}/metrics")
            return _drive(loop, swarm, tick_seconds, stop)
        finally:
            leaving()  # hivemind's asyncio tasks that stop unfinished with the DHT are not news now
            swarm.shutdown()


def record_plan(ledger: Ledger, run: Run, spec: ClusterSpec, provider: MultiProvider,
                say: Callable[[str], None]) -> None:
    """Keep what `spotrain plan` gives for this spec now (the same offers and planner) with a new
    run, for the report's planned-against-actual rows; a relaunched controller keeps the first."""
    from spotrain import plan as planning
    from spotrain.providers.base import ProviderError

    key = planning.plan_meta_key(run.id)
    if ledger.meta(key) is not None:
        return
    try:
        figures = planning.plan(spec, planning.offers_for(spec, provider, say))
    except (SpotrainError, ProviderError) as error:  # the run goes on; its report says "not recorded"
        say(f"plan not recorded for the report: {error}")
        return
    ledger.set_meta(key, {name: figures[name] for name in planning.PLANNED_FIGURES})


@contextmanager
def metrics_endpoint(spec: ClusterSpec) -> Iterator[MetricsEndpoint | None]:
    """The Prometheus endpoint the spec asks for (`controller.metrics_port`) while the run lasts; None without."""
    if spec.controller.metrics_port is None:
        yield None
        return
    from spotrain.metrics import MetricsEndpoint

    endpoint = MetricsEndpoint(str(spec.controller.metrics_host), spec.controller.metrics_port)
    try:
        yield endpoint
    finally:
        endpoint.close()


def run_end(ledger: Ledger, run: Run, duration: float | None) -> float | None:
    """When the run ends by --duration: counted from the run's start in the ledger, so a relaunched
    controller keeps the first one's end; a relaunch without --duration keeps the recorded end."""
    key = f"run-{run.id}-end-at"
    if duration is not None:
        ledger.set_meta(key, run.started_at + duration)
    end_at = ledger.meta(key)
    return float(end_at) if isinstance(end_at, (int, float)) else None


def _drive(loop: ControlLoop, swarm: SwarmView, tick_seconds: float, stop: threading.Event) -> RunEnd:
    """Tick until the run ends; a stop signal ends it as `down` does, and so does losing the DHT."""
    from apscheduler.schedulers.background import BackgroundScheduler

    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # a long final tick is expected, not news
    loop.stop_requested = stop.is_set()  # a signal while the DHT was starting
    scheduler = BackgroundScheduler()
    scheduler.add_job(loop.safe_tick, "interval", seconds=tick_seconds, max_instances=1, coalesce=True,
                      next_run_time=datetime.now(timezone.utc))
    scheduler.start()
    swarm_lost = False
    try:
        while not loop.ended.wait(0.5):
            loop.stop_requested = loop.stop_requested or stop.is_set()
            if not loop.stop_requested and not swarm.alive():
                swarm_lost = True
                break
    finally:
        scheduler.shutdown(wait=True)  # every call a tick makes into the DHT times out: this returns
    if swarm_lost and not loop.ended.is_set():
        loop.say("the controller's DHT process died: ending the run, as `spotrain down` would")
        loop.finish("the controller's DHT process died")
        return RunEnd("the controller's DHT process died", failed=True)
    return RunEnd(loop.end_reason or "ended", loop.failed)


def down(name: str | None, say: Callable[[str], None], wait_seconds: float = 180.0) -> str:
    """Stop the controller if one runs (it ends the run itself), else end the run here."""
    name = existing_cluster(name)
    pid = _verified_controller(name)
    if pid:
        say(f"stopping the controller (pid {pid}); it drains and terminates every worker")
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait_seconds
        while controller_pid(name) and time.time() < deadline:
            time.sleep(0.5)
        if controller_pid(name):
            raise SpotrainError(f"the controller (pid {pid}) of {name!r} did not stop within {wait_seconds:.0f}s")
    with _lock_for_down(name, say), opened_ledger(ledger_path(name)) as ledger:
        run = ledger.current_run()
        if run is None:
            return name
        spec = stored_spec(run.spec)  # never the task's code: down must work when it is gone
        provider = make_provider(spec)
        loop = ControlLoop(spec, ledger, run, provider, NoSwarm(), LoopSettings(), say=say)
        if run.ended_at is None or any(i.state == InstanceState.RUNNING for i in provider.list_instances(name)):
            loop.finish("down")
        left = [i.instance_id for i in provider.list_instances(name) if i.state == InstanceState.RUNNING]
        if left:
            raise SpotrainError(f"instances still running after down: {', '.join(left)}")
        provider.release_cluster(name)  # the emulated cloud: namespaces, links, cgroups, buckets
    return name


def _verified_controller(name: str, settle_seconds: float = 3.0) -> int | None:
    """The controller's pid, waiting out the moment between a controller taking the lock and
    writing its record; None when the lock is free or its holder never proves to be the controller."""
    deadline = time.monotonic() + settle_seconds
    while True:
        held, pid = lock_holder(name)
        if pid or not held or time.monotonic() >= deadline:
            return pid
        time.sleep(0.1)


@contextmanager
def _lock_for_down(name: str, say: Callable[[str], None]) -> Iterator[None]:
    """The cluster's lock, so no controller starts while `down` ends the run. A holder that is not a
    verified controller is never signalled: after a short wait, `down` goes on without the lock."""
    held = ExitStack()
    try:
        held.enter_context(controller_lock(name, wait_seconds=10.0))
    except ControllerRunning:
        say(f"{lock_path(name)} is held by a process that is not a verified controller: not signalling it; "
            f"ending the run through the provider")
    with held:
        yield


def status(name: str | None) -> dict:
    from spotrain.report import build_report
    from spotrain.status_fleet import workers_of
    from spotrain.status_view import live_figures

    name = existing_cluster(name)
    with opened_ledger(ledger_path(name)) as ledger:
        run = ledger.current_run()
        if run is None:
            raise SpotrainError(f"cluster {name!r} has no run")
        report = build_report(ledger, run, name)
        workers = workers_of(ledger, run)
        pid = controller_pid(name)
        # the epoch the live workers train at (after a rollback to the store, that one), else the highest seen
        training = [w["epoch"] for w in workers if w["agent_state"] == AgentState.TRAINING and w["epoch"] is not None]
        return {"cluster": name, "run": run.id, "state": report["state"], "controller_pid": pid,
                "budget_usd": run.budget_usd, "spent_usd": report["spent_usd"],
                "epoch": max(training, default=report["epochs"]),
                "samples": report["samples"], "workers": workers,
                **live_figures(ledger, run, report, workers, driven=pid is not None)}
