"""The controller's loop: observe providers, the swarm and the ledger; reconcile; apply.

Run by APScheduler every tick. Launch requests are written to the ledger before the provider
is called, so a controller killed mid-launch re-issues the same request id on restart and the
provider's idempotency makes sure nothing is launched twice.
"""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from spotrain.agent_failure import agent_failure
from spotrain.budget import BudgetGuard
from spotrain.config import ClusterSpec
from spotrain.contracts.agent_config import (
    AdmissionSettings,
    AgentConfig,
    CheckpointSettings,
    CompressionSettings,
    PipelineSettings,
    TrainingSettings,
)
from spotrain.contracts.records import AgentStatus
from spotrain.contracts.stage_records import StageRecord, latest_records, stage_summary
from spotrain.contracts.states import LIVE_STATES, AgentState, EndReason, InstanceState, LaunchReason
from spotrain.controller import (
    AssignDuty,
    Desired,
    EndRun,
    Launch,
    Observed,
    ObservedInstance,
    Terminate,
    reconcile,
)
from spotrain.egress import (
    EGRESS_WINDOW_SECONDS,
    EgressReading,
    PathPrice,
    egress_readings,
    emulated_cloud_prices,
    peer_instances,
)
from spotrain.fleet_roles import ROLES_EVENT, swarm_labels
from spotrain.ledger import Ledger, Run
from spotrain.offenders import REVOKE_AFTER_OFFENCES, instances_to_revoke
from spotrain.policies import PlacementPolicy, get_policy
from spotrain.progress_bounds import ProgressBounds, plausible_rate
from spotrain.providers.base import (
    AuthError,
    CapacityError,
    Instance,
    LaunchRequest,
    Offer,
    PeerPublisher,
    PriceError,
    Provider,
    ProviderError,
    QuotaError,
    SettingError,
)
from spotrain.stage_fleet import StageFleet, peers_per_stage
from spotrain.swarm import Swarm
from spotrain.swarm_peers import PUBLISHED_PEERS_META, bootstrap_peers, live_peers
from spotrain.throughput import TaskProfile

if TYPE_CHECKING:
    from spotrain.access import ClusterAccess

if TYPE_CHECKING:  # shipping imports the stores (and torch): `down` and `status` need neither
    from spotrain.shipping import Shipment

STATUS_FRESH_SECONDS = 20.0
MAX_TICK_FAILURES = 10
MAX_OFFERS_PER_TICK = 8


@dataclass(frozen=True)
class LoopSettings:
    tick_seconds: float = 2.0
    end_at: float | None = None
    target_epoch: int | None = None
    checkpoint_store: str = "checkpoints"  # the store of every domain when the spec names none
    settle_timeout_seconds: float = 60.0


class ControlLoop:
    def __init__(self, spec: ClusterSpec, ledger: Ledger, run: Run, provider: Provider, swarm: Swarm,
                 settings: LoopSettings, say: Callable[[str], None] = print, clock: Callable[[], float] = time.time,
                 policy: PlacementPolicy | None = None, access: ClusterAccess | None = None):
        self.spec, self.ledger, self.run, self.provider, self.swarm = spec, ledger, run, provider, swarm
        self.access = access  # None: no admission (the simulator, `down`)
        self.admission_record: dict | None = None  # the newest signed admission, handed to new VMs
        self._admission_issued = 0.0
        self.settings, self.say, self.clock = settings, say, clock
        self._policy = policy  # built on first use: its task profile imports the task, which `down` must not
        self.guard = BudgetGuard(spec.budget.total_usd, settings.tick_seconds, provider.termination_lag_seconds,
                                 spec.budget.max_hourly_usd)
        self.offers = spec.usable_offers(provider.offers())
        self.stores = spec.store_placement(settings.checkpoint_store)
        self.shipment: Shipment | None = None  # cloud VMs' build and code (spotrain/shipping.py); set by launch
        self.failed_at: dict[str, tuple[float, int]] = {}  # last capacity/quota/price refusal, refusals in a row
        self.samples_by_instance: dict[str, int] = {}
        for m in ledger.metrics(run.id):
            self.samples_by_instance[m["instance_id"]] = max(self.samples_by_instance.get(m["instance_id"], 0),
                                                             m["samples"])
        self.stop_requested = False
        self.ended = threading.Event()
        self.end_reason: str | None = None
        # the run ends on something no retry fixes (its agents kept failing, a launch refused for
        # good): `spotrain launch` exits non-zero; told apart here, not by the reason's text
        self.failed = False
        self.duty: tuple[str, ...] = ()
        self.statuses: dict[str, AgentStatus] = {}
        self.max_epoch = max((m["epoch"] for m in ledger.metrics(run.id)), default=0)
        # what the ledger, the progress line and the end conditions believe of the agents' claims
        self.bounds = ProgressBounds(spec.training.target_batch_size, self._plausible_rate, self.max_epoch or None,
                                     self.samples_by_instance)
        self._last_line = 0.0
        self.failures = 0
        self.refused_this_tick = False
        self.failed_agent: Instance | None = None  # an instance whose provider gave up on its agent
        self.roles: dict[str, str] = {}  # swarm mode: instance id -> the role its user-data named
        self.stages: list[dict[str, Any]] = []  # swarm mode: the stages as the newest stage records show them
        self.stage_records: tuple[StageRecord, ...] = ()  # swarm mode: each stage peer's newest trusted record
        self.role_labels: dict[str, str] = {}  # swarm mode: the roles last written to the ledger (fleet_roles)
        self.seen: dict[str, Instance] = {}  # the provider's instances at the last look, by request id
        # USD/GB per path; None: the market's (spotrain.egress); the emulated cloud's as the catalog regions it names
        self.egress_price: PathPrice | None = emulated_cloud_prices(priced) if (
            priced := spec.providers.egress_priced_as()) else None
        self.peers_seen: dict[str, str] = {}  # peer id -> instance id, from every status record read
        self.upcoming: tuple[str, ...] = ()  # request ids this tick launches, admitted before the first boots
        self.last_observed: Observed | None = None  # what the last tick saw (the metrics endpoint reads it)
        self.last_tick_at: float | None = None

    @functools.cached_property
    def profile(self) -> TaskProfile:
        """The task as planning sees it, built once: counting its parameters may build its model."""
        return self.spec.task_profile()

    @property
    def policy(self) -> PlacementPolicy:
        if self._policy is None:
            self._policy = get_policy(self.spec.placement.policy, self.profile)
        return self._policy

    # -- observe -------------------------------------------------------------------------
    def sync_instances(self, now: float, reissue: bool = True) -> dict[str, Instance]:
        """Bring the ledger in line with what the provider reports; adopt what we did not know.

        A request in the ledger that the provider never saw is re-issued with its request id
        (the controller died between the two), or, when ending, marked failed."""
        seen = {i.request_id: i for i in self.provider.list_instances(self.spec.name)}
        self.seen = seen
        known = {row.request_id for row in self.ledger.instances()}
        for request, found in seen.items():
            if request not in known and found.state == InstanceState.RUNNING:
                self.ledger.record_request(self.run.id, request, found.location.split(":", 1)[0], found.location,
                                           found.price_usd_per_hour, found.launched_at, reason=LaunchReason.ADOPTED)
        for row in self.ledger.instances(states=LIVE_STATES):
            instance = seen.get(row.request_id)
            if instance is None:
                if row.state == InstanceState.REQUESTED and reissue:
                    offer = self._offer_of(row.location, row.instance_type, row.market)
                    self._launch(row.request_id, offer, row.reason, reissue=True, location=row.location)
                elif row.state == InstanceState.REQUESTED:
                    self.ledger.mark_ended(row.request_id, InstanceState.FAILED, now, EndReason.NEVER_LAUNCHED,
                                           self.run.id)
                else:
                    self.ledger.mark_ended(row.request_id, InstanceState.TERMINATED, now, EndReason.VANISHED,
                                           self.run.id)
                continue
            if row.state == InstanceState.REQUESTED:
                self.ledger.mark_running(row.request_id, instance.instance_id, instance.launched_at)
            if instance.state != InstanceState.RUNNING:
                reason = instance.end_reason or EndReason.ENDED_BY_PROVIDER
                self.ledger.mark_ended(row.request_id, instance.state, instance.ended_at or now, reason, self.run.id,
                                       instance.end_detail)
                self.say(f"{instance.instance_id} in {instance.location}: {instance.state} ({reason})")
                if reason == EndReason.AGENT_FAILED:
                    self.failed_agent = instance
        return seen

    def observe(self, now: float) -> Observed:
        self.sync_instances(now)
        try:
            launched = {r.instance_id: r.launched_at for r in self.ledger.instances(run_id=self.run.id)
                        if r.instance_id and r.launched_at is not None}
            self.statuses = self.bounds.bound(self.swarm.statuses(), launched, now)
            self._observe_stages(now)
        except Exception as error:  # the DHT is best effort; the ledger and provider are the truth
            self.say(f"swarm read failed: {type(error).__name__}: {error}")
        self.ledger.charge(self.run.id, now, egress=self._egress_readings())
        for status in self.statuses.values():  # a restarted controller learns the roles it had named
            if status.role:
                self.roles.setdefault(status.instance_id, status.role)
        ours = {row.instance_id for row in self.ledger.instances(states=(InstanceState.RUNNING,))}
        fresh = [s for s in self.statuses.values() if s.instance_id in ours and now - s.time < STATUS_FRESH_SECONDS]
        self.ledger.record_metrics(self.run.id, now, [s.to_record() for s in fresh])
        self.max_epoch = max([self.max_epoch] + [s.epoch for s in fresh])
        run_rows = self.ledger.instances(run_id=self.run.id)
        run_instances = {row.instance_id for row in run_rows}
        for s in self.statuses.values():  # an ended agent's last record counts too: its samples were trained
            if s.instance_id in run_instances:
                self.samples_by_instance[s.instance_id] = max(self.samples_by_instance.get(s.instance_id, 0),
                                                              s.samples)
        rows = self.ledger.instances(states=LIVE_STATES)
        preemptions: dict[str, int] = {}
        hours: dict[str, float] = {}
        for row in run_rows:
            if row.state == InstanceState.PREEMPTED:
                preemptions[row.location] = preemptions.get(row.location, 0) + 1
            if row.launched_at is not None:
                end = row.ended_at if row.ended_at is not None else now
                hours[row.location] = hours.get(row.location, 0.0) + max(0.0, end - row.launched_at) / 3600.0
        return Observed(
            instances=tuple(
                ObservedInstance(r.request_id, r.instance_id, r.location, r.price_usd_per_hour, r.state,
                                 self.statuses[r.instance_id].state if r.instance_id in self.statuses else None,
                                 r.gpu, r.gpu_count, r.market, self.roles.get(r.instance_id or ""), r.reason)
                for r in rows),
            spent_usd=self.ledger.spent(self.run.id), global_epoch=self.max_epoch, preemptions=preemptions,
            launches=self.ledger.launch_count(), duty=self.duty,
            samples=float(sum(self.samples_by_instance.values())),
            samples_per_second=sum(s.samples_per_second for s in fresh if s.state == AgentState.TRAINING),
            hours_observed=hours, failed_at=dict(self.failed_at),
            egress_usd_per_hour=self.ledger.egress_usd_per_hour(self.run.id, now, EGRESS_WINDOW_SECONDS,
                                                                self.settings.tick_seconds),
            stage_records=self.stage_records,
        )

    def _egress_readings(self) -> list[EgressReading]:
        """The egress counters of this run's agents (an ended agent's last record too), priced per path."""
        location_of = {row.instance_id: row.location for row in self.ledger.instances(run_id=self.run.id)
                       if row.instance_id}
        self.peers_seen.update(peer_instances(self.statuses.values()))  # a gone peer's bytes keep their path
        return egress_readings(self.statuses.values(), location_of, self.egress_price, self.peers_seen)

    def _plausible_rate(self, instance_id: str) -> float:
        """samples/s an agent on this instance may claim (progress_bounds)."""
        row = next((r for r in self.ledger.instances(run_id=self.run.id) if r.instance_id == instance_id), None)
        return plausible_rate(self.profile.rate(row.gpu, row.gpu_count) if row is not None else 0.0)

    def desired(self) -> Desired:
        return Desired(
            cluster=self.spec.name, workers=self.spec.placement.workers, backups=self.spec.placement.backups,
            offers=self.offers,
            guard=self.guard, checkpoint_replicas=self.spec.checkpoint.replicas,
            checkpoint_store_of=self.stores.write_store,
            end_at=self.settings.end_at, target_epoch=self.settings.target_epoch,
            target_samples=self.spec.training.target_samples,
            deadline=(self.run.started_at + self.spec.budget.deadline_hours * 3600.0
                      if self.spec.budget.deadline_hours else None),
            stop_requested=self.stop_requested,
            initial_fleet_launched=bool(self.ledger.instances(run_id=self.run.id)),
            allowed=tuple(self.spec.allowed_locations()),
            stages=self.spec.training.pipeline.stages if self.spec.training.mode == "swarm" else 0,
        )

    # -- act -----------------------------------------------------------------------------
    def safe_tick(self) -> None:
        """One tick; an error is reported and retried next tick, and ends the run when it persists."""
        try:
            self.tick()
            self.failures = 0
        except Exception as error:
            self.failures += 1
            self.say(f"tick failed ({self.failures}/{MAX_TICK_FAILURES}): {type(error).__name__}: {error}")
            if self.failures >= MAX_TICK_FAILURES:
                self.finish(f"controller error: {type(error).__name__}: {error}")

    def tick(self) -> None:
        if self.ended.is_set():
            return
        now = self.clock()
        for _ in range(MAX_OFFERS_PER_TICK):  # a refused launch moves on to the next offer at once
            self.refused_this_tick = False
            observed = self._reconcile_and_apply(now)
            if not self.refused_this_tick or self.end_reason is not None:
                break
        self.last_observed, self.last_tick_at = observed, now
        if self.end_reason is not None:
            self.finish(self.end_reason)
        else:
            self._publish_admission()  # instances that ended are revoked: the record leaves them out
            self._share_peers(observed)
            self._progress_line(now, observed)

    def _publish_admission(self) -> None:
        """Sign the live instances' peers and publish them (spotrain/access.py)."""
        publish = getattr(self.swarm, "publish_admission", None)
        if self.access is None or publish is None:
            return
        live = {row.request_id: row.instance_id for row in self.ledger.instances(states=LIVE_STATES)}
        live.update({request_id: None for request_id in self.upcoming if request_id not in live})
        issued = self._admission_issued = max(self.clock(), self._admission_issued + 0.001)  # newer each time
        admission = self.access.admission(live, issued, self.settings.tick_seconds)
        self.admission_record = self.access.sign_admission(admission)
        try:
            publish(self.admission_record, admission.expires)
        except Exception as error:  # the gates keep the last record; the next tick publishes again
            self.say(f"admission record not stored: {type(error).__name__}: {error}")

    def _share_peers(self, observed: Observed) -> None:
        """Tell the VMs where the live swarm is (an agent restarted at any time bootstraps from it), keep it
        for a restarted controller, and reach running agents this peer does not hear from."""
        running = {i.instance_id for i in observed.instances if i.state == InstanceState.RUNNING and i.instance_id}
        peers = live_peers(self.swarm.addresses(), self.statuses.values(), running)
        if isinstance(self.provider, PeerPublisher):
            try:
                self.provider.publish_peers(self.spec.name, peers)
            except ProviderError as error:
                self.say(f"live peers not published: {error}")
        if peers != self.ledger.meta(PUBLISHED_PEERS_META):
            self.ledger.set_meta(PUBLISHED_PEERS_META, peers)
        unheard = running - set(self.statuses)
        join = getattr(self.swarm, "join", None)
        if unheard and join is not None:  # a controller that started alone, or a client nobody dials
            instances = [i for i in self.seen.values() if i.instance_id in unheard]
            try:
                join(bootstrap_peers(instances, peers))
            except Exception as error:  # the DHT is best effort
                self.say(f"joining agents failed: {type(error).__name__}: {error}")

    def _reconcile_and_apply(self, now: float) -> Observed:
        observed = self.observe(now)
        self._revoke_offenders()
        if self.failed_agent is not None:  # a task that crashes its agents would crash every replacement too
            self.end_reason = agent_failure(self.provider, self.failed_agent, self.spec.name, self.say)
            self.failed = True
            return observed
        refused_before = set(self.failed_at)
        actions = reconcile(observed, self.desired(), now, self.policy)
        self._admit_upcoming([a.request_id for a in actions if isinstance(a, Launch)])
        for action in actions:
            if isinstance(action, Launch) and self.end_reason is not None:
                continue  # a launch refused for good ends the run: launch nothing more
            if isinstance(action, Launch):
                refused_in_this_pass = action.offer.location in self.failed_at and (
                    action.offer.location not in refused_before or self.failed_at[action.offer.location][0] == now)
                if refused_in_this_pass and action.offer.market == "spot":
                    continue  # the same place just said no: the next pass plans elsewhere
                self._explain_stage_action(action, now)
                self._launch(action.request_id, action.offer, action.reason)
            elif isinstance(action, Terminate):
                if action.reason in (EndReason.RETIRED, EndReason.SURPLUS_STAGE_PEER):
                    self.say(f"retiring {action.instance_id}: {action.reason}")
                self._explain_stage_action(action, now)
                self.provider.terminate(action.instance_id)
            elif isinstance(action, AssignDuty):
                self._assign_duty(action.instance_ids)
            elif isinstance(action, EndRun):
                self.end_reason = action.reason
        self.upcoming = ()
        return observed

    def _explain_stage_action(self, action: Launch | Terminate, now: float) -> None:
        """Swarm mode: a launch for stages under two peers, or the retirement of a surplus stage
        peer, goes to the ledger (event `stage peers`) with the peers per stage it was decided on."""
        if action.reason not in (LaunchReason.STAGE_PEERS, EndReason.SURPLUS_STAGE_PEER):
            return
        draining = {i for i, status in self.statuses.items() if status.state == AgentState.DRAINING}
        serving = {row.instance_id for row in self.ledger.instances(states=(InstanceState.RUNNING,))
                   if row.instance_id and row.instance_id not in draining}
        fleet = StageFleet(self.spec.training.pipeline.stages, serving, 0, len(serving), 0)
        counts = {str(stage): count for stage, count in enumerate(peers_per_stage(self.stage_records, fleet))}
        detail = {"action": "launch" if isinstance(action, Launch) else "retire",
                  "instance_id": action.instance_id if isinstance(action, Terminate) else None,
                  "peers_per_stage": counts}
        self.ledger.event(self.run.id, "stage peers", now, json.dumps(detail), request_id=action.request_id)
        if isinstance(action, Launch):
            self.say(f"stage peers {counts}: launching {action.request_id} (a stage has fewer than two)")

    def _admit_upcoming(self, request_ids: list[str]) -> None:
        """Every VM this tick launches is admitted before the first of them boots: a VM's user-data
        record then lists the VMs launched after it in the same tick, so it does not refuse them
        until it reads a newer record."""
        if self.access is None or len(request_ids) < 2:
            return
        for request_id in request_ids:
            self.access.identity_for(request_id)
        self.upcoming = tuple(request_ids)
        self._publish_admission()

    def _revoke_offenders(self) -> None:
        """An instance whose parts a majority of its peers kept dropping (spotrain.offenders) is left
        out of the next admission record, so every peer refuses it, and is terminated: a
        replacement with a fresh identity takes its place."""
        if self.access is None:
            return
        for instance_id in instances_to_revoke(self.statuses):
            if instance_id in self.access.revoked():
                continue
            self.access.revoke(instance_id)
            self.say(f"revoked {instance_id}: most of its peers dropped its averaging parts in "
                     f"{REVOKE_AFTER_OFFENCES} or more rounds (non-finite or implausibly large); terminating it")
            try:
                self.provider.terminate(instance_id)
            except ProviderError as error:
                self.say(f"terminating revoked {instance_id} failed: {error}")

    def _offer_of(self, location: str, instance_type: str | None, market: str) -> Offer | None:
        return next((o for o in self.offers if o.location == location and o.market == market
                     and (instance_type is None or o.instance_type == instance_type)), None)

    def _launch(self, request_id: str, offer: Offer | None, reason: LaunchReason, reissue: bool = False,
                location: str = "") -> None:
        now = self.clock()
        if offer is None:
            self.ledger.mark_ended(request_id, InstanceState.FAILED, now, EndReason.NO_OFFER, self.run.id, location)
            return
        if not reissue:
            self.ledger.record_request(self.run.id, request_id, offer.provider, offer.location,
                                       offer.spot_usd_per_hour, now, reason, offer.instance_type, offer.gpu,
                                       offer.gpu_count, offer.market)
        identity = self.access.identity_for(request_id) if self.access is not None else None
        self._publish_admission()  # publish first, launch second: the VM is admitted before it can talk
        config = self.agent_config(offer.location, identity)
        try:
            instance = self.provider.launch(LaunchRequest(request_id, self.spec.name, offer, config))
        except ProviderError as error:
            if isinstance(error, (CapacityError, QuotaError, PriceError)) and offer.market == "spot":
                in_a_row = self.failed_at.get(offer.location, (now, 0))[1] + 1
                self.failed_at[offer.location] = (now, in_a_row)  # the planner moves on to the next offer
                self.refused_this_tick = True
            self.ledger.mark_ended(request_id, InstanceState.FAILED, now, EndReason.LAUNCH_FAILED, self.run.id,
                                   f"{type(error).__name__}: {error}")
            if isinstance(error, (SettingError, AuthError)):  # no retry can fix it: end the run with one line
                self.end_reason = f"launch refused in {offer.location}, no retry can fix it: {error}"
                self.failed = True
                return
            self.say(f"launch in {offer.location} failed ({type(error).__name__}: {error}); trying other offers")
            return
        self.ledger.mark_running(request_id, instance.instance_id, instance.launched_at)
        if self.access is not None:
            self.access.launched(request_id)
        if config.pipeline is not None:
            self.roles[instance.instance_id] = config.pipeline.role
        self.failed_at.pop(offer.location, None)
        self.say(f"launched {instance.instance_id} in {offer.location} at ${offer.spot_usd_per_hour:.3f}/h "
                 f"({offer.market}, {reason})")

    def _assign_duty(self, instance_ids: tuple[str, ...]) -> None:
        if instance_ids != self.duty:
            self.say(f"checkpoint duty: {', '.join(instance_ids)}")
            self.ledger.event(self.run.id, "duty", self.clock(), ",".join(instance_ids))
        self.duty = instance_ids
        try:
            self.swarm.assign_duty(instance_ids)
        except Exception as error:
            self.say(f"duty record not stored: {type(error).__name__}: {error}")

    def agent_config(self, location: str | None = None, identity: bytes | None = None) -> AgentConfig:
        """What a new agent at `location` needs to join: it writes its failure domain's store and
        restores from every store, nearest first. Its one secret is `identity`, the libp2p identity
        generated for that VM alone (spotrain/access.py). Its provider adds what only it knows
        (`AgentConfig.for_vm`)."""
        from spotrain.kernels import codec_table_fingerprint

        training = self.spec.training
        swarm_mode = training.mode == "swarm"
        agent_peers = [a for s in self.statuses.values() if s.state == AgentState.TRAINING for a in s.addresses][:4]
        return AgentConfig(
            cluster=self.spec.name,
            initial_peers=tuple(self.swarm.addresses() + agent_peers),
            task=training.task,
            training=TrainingSettings(
                batch_size=training.batch_size, target_batch_size=training.target_batch_size,
                compression=CompressionSettings(
                    gradients=training.compression.gradients, state=training.compression.state,
                    activations=training.compression.activations if swarm_mode else None),
                matchmaking_time=training.matchmaking_time, averaging_timeout=training.averaging_timeout,
                delayed_updates=training.delayed_updates,
            ),
            checkpoint=CheckpointSettings(store=self.stores.write_store(location),
                                          restore=self.stores.restore_order(location),
                                          every_epochs=self.spec.checkpoint.every_epochs),
            torch_threads=1,
            mode=training.mode,
            pipeline=self._pipeline_settings(location),
            admission=self._admission_settings(identity),
            codec_table=codec_table_fingerprint(training.compression.gradients, training.compression.state,
                                                training.compression.activations if swarm_mode else None),
            code=self.shipment.code_for(location) if self.shipment else None,
        )

    def _admission_settings(self, identity: bytes | None) -> AdmissionSettings | None:
        if self.access is None or identity is None or self.admission_record is None:
            return None
        return AdmissionSettings(cluster_key=self.access.public_key, record=self.admission_record,
                                 identity=SecretStr(base64.b64encode(identity).decode()))

    def _pipeline_settings(self, location: str | None) -> PipelineSettings | None:
        """Swarm mode: a trainer while fewer than `training.pipeline.trainers` live (draining ones do
        not count), else a stage peer, which picks its stage itself from the stage records, spreading
        each stage over the failure domains (`location`'s, named in its records)."""
        pipeline = self.spec.training.pipeline
        if self.spec.training.mode != "swarm":
            return None
        rows = self.ledger.instances(states=LIVE_STATES, run_id=self.run.id)
        live = {row.instance_id for row in rows if row.instance_id}
        trainers = [i for i in live if self.roles.get(i) == "trainer"
                    and not (i in self.statuses and self.statuses[i].state == AgentState.DRAINING)]
        return PipelineSettings(role="trainer" if len(trainers) < pipeline.trainers else "stage",
                                stages=pipeline.stages, max_in_flight=pipeline.max_in_flight,
                                rebalance=pipeline.rebalance, rebalance_seconds=pipeline.rebalance_seconds,
                                domain=self.stores.domain_of(location) if location else None)

    def _observe_stages(self, now: float) -> None:
        """Swarm mode: each stage peer's newest record, believed only from the peer its instance's
        signed status record announced (a peer cannot fill or empty a stage in another's name); each
        live stage peer's stage, samples/s and failure domain (the ledger's instance, not the record)
        are summed per stage and kept in the ledger when they change (`report` reads the newest)."""
        if self.spec.training.mode != "swarm":
            return
        self.peers_seen.update(peer_instances(self.statuses.values()))
        self.stage_records = tuple(r for r in latest_records(self.swarm.stage_records(), now)
                                   if self.peers_seen.get(r.peer_id) == r.instance_id)
        rows = self.ledger.instances(states=LIVE_STATES, run_id=self.run.id)
        domains = {row.instance_id: self.stores.domain_of(row.location) for row in rows if row.instance_id}
        # a VM that ended serves nothing, though its record lingers in the DHT for STAGE_TTL_SECONDS
        stages = stage_summary([r for r in self.stage_records if r.instance_id in domains], now, domains)
        if stages and stages != self.stages:
            self.ledger.event(self.run.id, "stages", now, json.dumps(stages))
        self.stages = stages
        self._record_roles(now, [row.instance_id for row in rows if row.instance_id])

    def _record_roles(self, now: float, live: list[str]) -> None:
        """Swarm mode: each live VM's role (trainer, stage N) in the ledger when it changes, for `status`."""
        labels = swarm_labels(live, self.roles, self.stage_records)
        if labels != self.role_labels:
            self.ledger.event(self.run.id, ROLES_EVENT, now, json.dumps(labels, sort_keys=True))
        self.role_labels = labels

    def finish(self, reason: str) -> None:
        """Terminate everything (agents holding duty write a final checkpoint), settle, close the run."""
        self.say(f"ending the run: {reason}")
        deadline = self.clock() + self.provider.termination_lag_seconds + self.settings.settle_timeout_seconds
        while True:
            live = [i for i in self.provider.list_instances(self.spec.name) if i.state == InstanceState.RUNNING]
            for instance in live:
                self.provider.terminate(instance.instance_id)
            if not live or self.clock() > deadline:
                break
            time.sleep(0.5)
        now = self.clock()
        self.sync_instances(now, reissue=False)
        self.ledger.charge(self.run.id, now, egress=self._egress_readings())
        self.ledger.end_run(self.run.id, reason, now)
        self.ended.set()

    def _progress_line(self, now: float, observed: Observed) -> None:
        if now - self._last_line < 5.0:
            return
        self._last_line = now
        # the ledger after this tick's launches (`observed` is from before them): a VM asked for and
        # not yet running is starting too
        live = self.ledger.instances(states=LIVE_STATES)
        agent_state = {i: s.state for i, s in self.statuses.items()}
        draining = [r for r in live if agent_state.get(r.instance_id or "") == AgentState.DRAINING]
        starting = [r for r in live
                    if agent_state.get(r.instance_id or "") not in (AgentState.TRAINING, AgentState.DRAINING)]
        ours = {r.instance_id for r in live if r.state == InstanceState.RUNNING}
        training = [s for s in self.statuses.values() if s.state == AgentState.TRAINING and s.instance_id in ours
                    and now - s.time < STATUS_FRESH_SECONDS]
        rate = sum(s.samples_per_second for s in training)
        losses = [s.loss for s in training if s.loss is not None]
        loss = f"{sum(losses) / len(losses):.3f}" if losses else "-"
        wanted = self.spec.placement.workers + self.spec.placement.backups
        # the epoch the swarm trains at now (after a whole-fleet loss: the store's), not the highest seen
        epoch = max((s.epoch for s in training), default=observed.global_epoch)
        self.say(f"workers {len(training)}/{wanted}"  # agents that train, not VMs that merely run
                 + (f" (+{len(starting)} starting)" if starting else "")
                 + (f" (+{len(draining)} draining)" if draining else "") + "  "
                 f"epoch {epoch}  loss {loss}  {rate:.0f} samples/s  "
                 f"spent ${observed.spent_usd:.4f} of ${self.spec.budget.total_usd:.2f}")

