"""What the CLI's launch, down and status do: open the cluster's state, drive or stop it."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

from spotrain.config import ClusterSpec, stored_spec
from spotrain.contracts.states import LIVE_STATES, InstanceState
from spotrain.control_loop import ControlLoop, LoopSettings
from spotrain.errors import ControllerRunning, SpotrainError
from spotrain.home import cluster_dir, existing_cluster, ledger_path
from spotrain.ledger import Ledger
from spotrain.provider_factory import make_provider
from spotrain.swarm import NoSwarm


@contextmanager
def controller_lock(name: str) -> Iterator[None]:
    """Held for a controller's lifetime; the kernel drops it when the process dies, even by SIGKILL.

    A POSIX record lock (lockf), not flock: hivemind forks helper processes, and an flock would
    be shared with them and outlive the controller."""
    path = cluster_dir(name) / "controller.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            raise ControllerRunning(f"a controller (pid {pid}) already drives cluster {name!r}; "
                                    f"`spotrain down {name}` stops it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def controller_pid(name: str) -> int | None:
    """The pid of the live controller of `name`, or None."""
    path = cluster_dir(name) / "controller.lock"
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.lockf(handle, fcntl.LOCK_UN)
    return None


def checkpoint_store(spec: ClusterSpec) -> str:
    return spec.checkpoint.stores[0] if spec.checkpoint.stores else str(cluster_dir(spec.name) / "checkpoints")


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


def launch(spec: ClusterSpec, *, duration: float | None, target_epoch: int | None, tick_seconds: float,
           say: Callable[[str], None]) -> str:
    """Drive the cluster until its run ends; returns why it ended."""
    from apscheduler.schedulers.background import BackgroundScheduler

    from spotrain.swarm_peers import PUBLISHED_PEERS_META, swarm_options
    from spotrain.swarm_view import SwarmView

    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # a long final tick is expected, not news
    provider = checked_provider(spec)
    with controller_lock(spec.name):
        ledger = Ledger.create(ledger_path(spec.name))
        now = time.time()
        run = ledger.open_run(spec.budget.total_usd, spec.model_dump(mode="json"), now)
        end_key = f"run-{run.id}-end-at"
        if duration is not None:
            ledger.set_meta(end_key, now + duration)
        end_at = cast("float | None", ledger.meta(end_key))  # a restarted controller keeps the first one's deadline
        running = [i for i in provider.list_instances(spec.name) if i.state == InstanceState.RUNNING]
        if running:
            say(f"adopting {len(running)} running instance(s) of {spec.name}")
        swarm = SwarmView(spec.name, **swarm_options(spec.providers.enabled(), spec.controller.reachable, running,
                                                     ledger.meta(PUBLISHED_PEERS_META)))
        settings = LoopSettings(tick_seconds=tick_seconds, end_at=end_at,
                                target_epoch=target_epoch or spec.training.target_epoch,
                                checkpoint_store=checkpoint_store(spec))
        loop = ControlLoop(spec, ledger, run, provider, swarm, settings, say=say)

        def request_stop(*_: object) -> None:
            loop.stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        scheduler = BackgroundScheduler()
        scheduler.add_job(loop.safe_tick, "interval", seconds=tick_seconds, max_instances=1, coalesce=True,
                          next_run_time=datetime.now(timezone.utc))
        scheduler.start()
        try:
            while not loop.ended.wait(0.5):
                pass
        finally:
            scheduler.shutdown(wait=True)
            swarm.shutdown()
            ledger.close()
        return loop.end_reason or "ended"


def launch_detached(config_path: Path, args: list[str], name: str) -> int:
    """Start `spotrain launch` for this spec as a background process; returns its pid."""
    log = cluster_dir(name) / "controller.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "spotrain", "launch", str(config_path), *args],
                                   stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    return process.pid


def down(name: str | None, say: Callable[[str], None], wait_seconds: float = 180.0) -> str:
    """Stop the controller if one runs (it ends the run itself), else end the run here."""
    name = existing_cluster(name)
    pid = controller_pid(name)
    if pid:
        say(f"stopping the controller (pid {pid}); it drains and terminates every worker")
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + wait_seconds
        while controller_pid(name) and time.time() < deadline:
            time.sleep(0.5)
        if controller_pid(name):
            raise SpotrainError(f"the controller (pid {pid}) of {name!r} did not stop within {wait_seconds:.0f}s")
    with controller_lock(name):
        ledger = Ledger.open_existing(ledger_path(name))
        try:
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
        finally:
            ledger.close()
    return name


def status(name: str | None) -> dict:
    from spotrain.report import build_report
    from spotrain.status_view import live_figures

    name = existing_cluster(name)
    ledger = Ledger.open_existing(ledger_path(name))
    try:
        run = ledger.current_run()
        if run is None:
            raise SpotrainError(f"cluster {name!r} has no run")
        report = build_report(ledger, run, name)
        latest: dict[str, dict] = {}
        for metric in ledger.metrics(run.id):
            latest[metric["instance_id"]] = dict(metric)
        workers = []
        for row in ledger.instances(states=LIVE_STATES, run_id=run.id):
            m = latest.get(row.instance_id or "", {})
            workers.append({"instance_id": row.instance_id, "location": row.location, "state": row.state,
                            "price_usd_per_hour": row.price_usd_per_hour, "agent_state": m.get("state"),
                            "epoch": m.get("epoch"), "samples_per_second": m.get("samples_per_second"),
                            "loss": m.get("loss")})
        pid = controller_pid(name)
        return {"cluster": name, "run": run.id, "state": report["state"], "controller_pid": pid,
                "budget_usd": run.budget_usd, "spent_usd": report["spent_usd"], "epoch": report["epochs"],
                "samples": report["samples"], "workers": workers,
                **live_figures(ledger, run, report, workers)}
    finally:
        ledger.close()
