"""Spot VMs on Compute Engine through google-cloud-compute's REST transport (imported lazily:
`pip install spotrain[gcp]`).

Credentials come from Application Default Credentials; `api_endpoint` points the clients
elsewhere (tests use a local fake). An instance's name and the insert's `requestId` are both
derived from the launch request id, so a re-issued request finds or re-joins the instance it
already made. Zone operations are waited on and their error codes become the typed errors of
providers.base. A preempted spot VM (termination action DELETE) vanishes from the instance
list; `compute.instances.preempted` operations tell a preemption from a deletion. A VM that
powered itself off (its agent's unit gave up: infra/spotrain-agent-failed.sh) stays TERMINATED
with a `compute.instances.guestTerminate` operation: its agent failed.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

from spotrain.contracts.live_peers import PEERS_ATTRIBUTE, peers_value
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.base import (
    SELF_SHUTDOWN_DETAIL,
    AuthError,
    CapacityError,
    Instance,
    LaunchRequest,
    Offer,
    ProviderError,
    QuotaError,
    SettingError,
)
from spotrain.providers.bootstrap import METADATA, infra_text, render_cloud_init
from spotrain.providers.gcp_prices import gpu_of, spot_price

NAME = "gcp"
SCOPES = ["https://www.googleapis.com/auth/compute"]
LABEL_CLUSTER, LABEL_ROLE, LABEL_REQUEST = "spotrain-cluster", "spotrain-role", "spotrain-request"
META_REQUEST, META_PRICE = "spotrain-request-id", "spotrain-price"
REQUEST_NAMESPACE = uuid.UUID("5f0c6f1e-52a4-4c59-9b3e-3d1f0c7a2b11")  # fixed: the same id gives the same UUID
CAPACITY_CODES = {"ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                  "RESOURCE_POOL_EXHAUSTED", "RESOURCE_NOT_FOUND_IN_ZONE"}
QUOTA_CODES = {"QUOTA_EXCEEDED", "quotaExceeded", "rateLimitExceeded"}
PREEMPTED_OPERATION = "compute.instances.preempted"
GUEST_SHUTDOWN_OPERATION = "compute.instances.guestTerminate"  # the guest OS powered the VM off
RUNNING_STATUSES = {"PROVISIONING", "STAGING", "RUNNING", "REPAIRING", "STOPPING", "SUSPENDING"}
OPERATION_WAIT_SECONDS = 300.0
CALL_TIMEOUT = 60.0


def instance_name(request_id: str) -> str:
    """GCE names: [a-z]([-a-z0-9]{0,61}[a-z0-9])?; one per request id."""
    return "sp-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


def request_uuid(request_id: str, verb: str) -> str:
    return str(uuid.uuid5(REQUEST_NAMESPACE, f"{verb}:{request_id}"))


def label_value(text: str) -> str:
    """Label values: [a-z0-9_-]{0,63}; longer or other text is hashed."""
    if re.fullmatch(r"[a-z0-9_-]{0,63}", text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def firewall_name(cluster: str) -> str:
    name = f"spotrain-{cluster}-swarm"
    return name if len(name) <= 63 else "spotrain-" + hashlib.sha256(cluster.encode()).hexdigest()[:24] + "-swarm"


def sdk_errors() -> tuple[type[Exception], ...]:
    """What the Compute client raises: API errors, auth errors, transport errors."""
    from google.api_core.exceptions import GoogleAPICallError
    from google.auth.exceptions import GoogleAuthError
    from requests.exceptions import RequestException

    return (GoogleAPICallError, GoogleAuthError, RequestException)


def not_found(error: Exception) -> bool:
    return getattr(error, "code", None) == 404


def typed_error(error: Exception, where: str) -> ProviderError:
    """google-api-core and google-auth errors as the typed errors of providers.base."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    if isinstance(error, ProviderError):
        return error
    if isinstance(error, (auth.DefaultCredentialsError, auth.RefreshError, api.Unauthorized)):
        return AuthError(f"gcp {where}: {error}")
    if isinstance(error, api.GoogleAPICallError):
        reasons = {e.get("reason", "") for e in (error.errors or []) if isinstance(e, dict)}
        if reasons & QUOTA_CODES or isinstance(error, api.TooManyRequests):
            return QuotaError(f"gcp {where}: {error.message}")
        if isinstance(error, api.Forbidden):
            return AuthError(f"gcp {where}: permission denied: {error.message}")
        setting = _setting_named(error.message or "")
        if setting is not None and isinstance(error, (api.NotFound, api.BadRequest)):
            return SettingError(f"gcp {where}: {error.code} {error.message}", setting)
        return ProviderError(f"gcp {where}: {error.code} {error.message}")
    return ProviderError(f"gcp {where}: {type(error).__name__}: {error}")


def _setting_named(message: str) -> str | None:
    """The spec key behind an API answer that a resource the request names does not exist."""
    if "serviceAccounts" in message or "service account" in message.lower():
        return "providers.gcp.service_account"
    if "/images/" in message or "sourceImage" in message:
        return "providers.gcp.image"
    if "/networks/" in message or "networkInterfaces" in message:
        return "providers.gcp.network"
    return None


def operation_error(operation: Any, where: str) -> ProviderError | None:
    errors = list(operation.error.errors) if operation.error else []
    if not errors:
        return None
    codes = {e.code for e in errors}
    message = f"gcp {where}: " + "; ".join(f"{e.code}: {e.message}" for e in errors)
    if codes & CAPACITY_CODES:
        return CapacityError(message)
    if codes & QUOTA_CODES:
        return QuotaError(message)
    return ProviderError(message)


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else time.time()


class GcpProvider:
    name = NAME
    # a spot VM stops being billed when it reaches TERMINATED; deleting one takes up to ~90 s
    termination_lag_seconds = 90.0

    def __init__(self, config, credentials: Any = None):
        self.config = config  # spotrain.config.GcpProvider
        self._credentials = credentials
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._firewalls: set[str] = set()
        self._zone_of: dict[str, str] = {}
        self._seen: dict[str, Instance] = {}  # name -> last view: a preempted VM is deleted, its record stays here

    # -- clients ---------------------------------------------------------------------------
    def compute(self):
        try:
            from google.cloud import compute_v1
        except ImportError:
            raise ProviderError("gcp: google-cloud-compute is not installed; pip install 'spotrain[gcp]'") from None
        return compute_v1

    def credentials(self):
        if self._credentials is None:
            import google.auth
            import google.auth.exceptions

            try:
                self._credentials, _ = google.auth.default(scopes=SCOPES)
            except google.auth.exceptions.DefaultCredentialsError as error:
                raise AuthError("gcp: no credentials found (GOOGLE_APPLICATION_CREDENTIALS, "
                                f"`gcloud auth application-default login`, or a VM service account): {error}") from None
        return self._credentials

    def client(self, kind: str):
        with self._lock:
            if kind not in self._clients:
                from google.api_core.client_options import ClientOptions

                options = ClientOptions(api_endpoint=self.config.api_endpoint) if self.config.api_endpoint else None
                cls = getattr(self.compute(), kind)
                self._clients[kind] = cls(transport="rest", credentials=self.credentials(), client_options=options)
            return self._clients[kind]

    def check_credentials(self) -> None:
        """Fail before any launch: no Application Default Credentials, or a token they cannot get."""
        from google.auth.transport.requests import Request

        credentials = self.credentials()
        try:
            credentials.refresh(Request())
        except sdk_errors() as error:
            raise AuthError(f"gcp: credentials refused: {error}") from None

    # -- offers ----------------------------------------------------------------------------
    def offers(self) -> list[Offer]:
        prices = self.config.spot_prices_usd_per_hour
        return [Offer(NAME, f"{NAME}:{zone}", machine, gpu_of(machine), spot_price(machine, prices) or 0.0)
                for zone in self.config.zones for machine in self.config.machine_types]

    # -- launch ----------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> Instance:
        zone = request.offer.location.split(":", 1)[1]
        name = instance_name(request.request_id)
        compute = self.compute()
        instances = self.client("InstancesClient")
        try:
            self._ensure_firewall(request.cluster)
            try:
                return self._instance(zone, instances.get(project=self.config.project, zone=zone, instance=name,
                                                          timeout=CALL_TIMEOUT))
            except sdk_errors() as error:
                if not not_found(error):
                    raise
            insert = compute.InsertInstanceRequest(project=self.config.project, zone=zone,
                                                   instance_resource=self._resource(request, zone, name),
                                                   request_id=request_uuid(request.request_id, "insert"))
            try:
                operation = instances.insert_unary(request=insert, timeout=CALL_TIMEOUT)
            except sdk_errors() as error:
                if getattr(error, "code", None) != 409:  # already exists: a re-issue after a lost response
                    raise
                operation = None
            if operation is not None:
                failed = operation_error(self._wait(zone, operation), f"launch in {zone}")
                if failed is not None:
                    raise failed
            described = instances.get(project=self.config.project, zone=zone, instance=name, timeout=CALL_TIMEOUT)
        except sdk_errors() as error:
            raise typed_error(error, f"launch in {zone}") from None
        return self._instance(zone, described)

    def _wait(self, zone: str, operation: Any) -> Any:
        """Zone operations: wait (the API returns after at most ~2 min even when not done) until DONE."""
        operations = self.client("ZoneOperationsClient")
        done = self.compute().Operation.Status.DONE
        deadline = time.time() + OPERATION_WAIT_SECONDS
        while operation.status != done:
            if time.time() > deadline:
                raise ProviderError(f"gcp: operation {operation.name} in {zone} not done after "
                                    f"{OPERATION_WAIT_SECONDS:.0f}s")
            operation = operations.wait(project=self.config.project, zone=zone, operation=operation.name,
                                        timeout=CALL_TIMEOUT * 3)
        return operation

    def _resource(self, request: LaunchRequest, zone: str, name: str) -> Any:
        compute, config = self.compute(), self.config
        user_data = render_cloud_init(
            request.user_data.for_vm(location=request.offer.location, instance_id=name, metadata=METADATA[NAME],
                                     host="0.0.0.0", port=config.swarm_port),
            NAME, config.worker_image)
        metadata = {"user-data": user_data, "startup-script": infra_text("gce-startup.sh"),
                    META_REQUEST: request.request_id, META_PRICE: repr(request.offer.spot_usd_per_hour)}
        resource = compute.Instance(
            name=name, machine_type=f"zones/{zone}/machineTypes/{request.offer.instance_type}",
            labels={LABEL_CLUSTER: label_value(request.cluster), LABEL_ROLE: "worker",
                    LABEL_REQUEST: label_value(request.request_id)},
            tags=compute.Tags(items=[firewall_name(request.cluster)]),
            scheduling=compute.Scheduling(provisioning_model="SPOT", instance_termination_action="DELETE",
                                          automatic_restart=False, on_host_maintenance="TERMINATE"),
            metadata=compute.Metadata(items=[compute.Items(key=k, value=v) for k, v in metadata.items()]),
            disks=[compute.AttachedDisk(boot=True, auto_delete=True,
                                        initialize_params=compute.AttachedDiskInitializeParams(
                                            source_image=config.image, disk_size_gb=100))],
            network_interfaces=[compute.NetworkInterface(network=config.network, access_configs=[
                compute.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")])],
        )
        if config.service_account:
            resource.service_accounts = [compute.ServiceAccount(
                email=config.service_account, scopes=["https://www.googleapis.com/auth/cloud-platform"])]
        return resource

    def _ensure_firewall(self, cluster: str) -> None:
        """The swarm port, open to the cluster's own VMs (by network tag) and to the controller only."""
        name = firewall_name(cluster)
        if name in self._firewalls:
            return
        compute, firewalls = self.compute(), self.client("FirewallsClient")
        try:
            firewalls.get(project=self.config.project, firewall=name, timeout=CALL_TIMEOUT)
        except sdk_errors() as error:
            if not not_found(error):
                raise
            port = str(self.config.swarm_port)
            rule = compute.Firewall(
                name=name, network=self.config.network, direction="INGRESS",
                allowed=[compute.Allowed(I_p_protocol=p, ports=[port]) for p in ("tcp", "udp")],
                source_tags=[name], target_tags=[name],
                source_ranges=[self.config.controller_cidr] if self.config.controller_cidr else [],
            )
            insert = compute.InsertFirewallRequest(project=self.config.project, firewall_resource=rule,
                                                   request_id=request_uuid(cluster, "firewall"))
            try:
                operation = firewalls.insert_unary(request=insert, timeout=CALL_TIMEOUT)
                self.client("GlobalOperationsClient").wait(project=self.config.project, operation=operation.name,
                                                           timeout=CALL_TIMEOUT * 3)
            except sdk_errors() as insert_error:
                if getattr(insert_error, "code", None) != 409:
                    raise
        self._firewalls.add(name)

    # -- list and terminate ------------------------------------------------------------------
    def list_instances(self, cluster: str) -> list[Instance]:
        compute, instances = self.compute(), self.client("InstancesClient")
        found: dict[str, Instance] = {}
        try:
            for zone in self.config.zones:
                listing = compute.ListInstancesRequest(project=self.config.project, zone=zone,
                                                       filter=f'labels.{LABEL_CLUSTER} = "{label_value(cluster)}"')
                described_now = list(instances.list(request=listing, timeout=CALL_TIMEOUT))
                # operations after instances: a VM seen stopped already has its preemption operation
                preempted = self._operation_targets(zone, PREEMPTED_OPERATION)
                stopped = [d for d in described_now if d.status == "TERMINATED" and d.name not in preempted]
                # asked only while a stopped VM is listed: the controller deletes it once it has seen it
                powered_off = self._operation_targets(zone, GUEST_SHUTDOWN_OPERATION) if stopped else {}
                for described in described_now:
                    found[described.name] = self._instance(zone, described, preempted, powered_off)
                for name, seen in list(self._seen.items()):  # deleted after a preemption: known only from here
                    if name in preempted and name not in found and seen.cluster == cluster:
                        found[name] = replace(seen, state=InstanceState.PREEMPTED, ended_at=preempted[name],
                                              end_reason=EndReason.SPOT_PREEMPTION)
        except sdk_errors() as error:
            raise typed_error(error, "list") from None
        return list(found.values())

    def _operation_targets(self, zone: str, kind: str) -> dict[str, float]:
        """The instances a zone's operations of this type acted on, and when each ended."""
        listing = self.compute().ListZoneOperationsRequest(project=self.config.project, zone=zone,
                                                           filter=f'operationType = "{kind}"')
        operations = self.client("ZoneOperationsClient").list(request=listing, timeout=CALL_TIMEOUT)
        return {op.target_link.rsplit("/", 1)[-1]: _timestamp(op.end_time or op.insert_time) for op in operations}

    def _instance(self, zone: str, described: Any, preempted: dict[str, float] | None = None,
                  powered_off: dict[str, float] | None = None) -> Instance:
        metadata = {item.key: item.value for item in described.metadata.items}
        status, name = described.status, described.name
        preempted, powered_off = preempted or {}, powered_off or {}
        detail = ""
        if name in preempted and status not in ("PROVISIONING", "STAGING", "RUNNING"):
            state, ended_at, reason = InstanceState.PREEMPTED, preempted[name], EndReason.SPOT_PREEMPTION
        elif status in RUNNING_STATUSES:
            state, ended_at, reason = InstanceState.RUNNING, None, None  # still there, still billed
        elif name in powered_off and status == "TERMINATED":  # its console says why (spotrain.logs)
            state, ended_at, reason = InstanceState.TERMINATED, powered_off[name], EndReason.AGENT_FAILED
            detail = SELF_SHUTDOWN_DETAIL
        else:
            state, ended_at, reason = InstanceState.TERMINATED, None, EndReason.ENDED_BY_PROVIDER
            detail = status.lower()
        instance = Instance(
            instance_id=described.name, request_id=metadata.get(META_REQUEST, ""),
            cluster=described.labels.get(LABEL_CLUSTER, ""), location=f"{NAME}:{zone}",
            price_usd_per_hour=float(metadata.get(META_PRICE, "0") or 0), state=state,
            launched_at=_timestamp(described.creation_timestamp), ended_at=ended_at, end_reason=reason,
            end_detail=detail,
            addresses=self._addresses(described) if state == InstanceState.RUNNING else (),
        )
        self._zone_of[described.name] = zone
        self._seen[described.name] = instance
        return instance

    def _addresses(self, described: Any) -> tuple[str, ...]:
        """Where the agent listens: internal IPs (peers in the network), then external NAT IPs (everyone else)."""
        nics = list(described.network_interfaces)
        ips = [nic.network_i_p for nic in nics] + [c.nat_i_p for nic in nics for c in nic.access_configs]
        return tuple(f"/ip4/{ip}/tcp/{self.config.swarm_port}" for ip in ips if ip)

    def publish_peers(self, cluster: str, peers: list[str]) -> None:
        """The `spotrain-peers` metadata attribute of each running instance (its metadata server shows
        it), rewritten when it changes. setMetadata replaces every item and takes the fingerprint of
        what it replaces: a VM whose metadata changed since it was read is retried at the next tick."""
        compute, instances = self.compute(), self.client("InstancesClient")
        value = peers_value(peers)
        try:
            for zone in self.config.zones:
                listing = compute.ListInstancesRequest(project=self.config.project, zone=zone,
                                                       filter=f'labels.{LABEL_CLUSTER} = "{label_value(cluster)}"')
                for described in instances.list(request=listing, timeout=CALL_TIMEOUT):
                    if described.status in RUNNING_STATUSES and described.status != "STOPPING":
                        self._set_peers(zone, described, value)
        except sdk_errors() as error:
            raise typed_error(error, "publish peers") from None

    def _set_peers(self, zone: str, described: Any, value: str) -> None:
        compute = self.compute()
        items = {item.key: item.value for item in described.metadata.items}
        if items.get(PEERS_ATTRIBUTE) == value:
            return
        items[PEERS_ATTRIBUTE] = value
        metadata = compute.Metadata(fingerprint=described.metadata.fingerprint,
                                    items=[compute.Items(key=k, value=v) for k, v in items.items()])
        try:
            operation = self.client("InstancesClient").set_metadata_unary(
                project=self.config.project, zone=zone, instance=described.name, metadata_resource=metadata,
                timeout=CALL_TIMEOUT)
        except sdk_errors() as error:
            if getattr(error, "code", None) in (404, 412):  # gone, or changed since listed: the next tick
                return
            raise
        failed = operation_error(self._wait(zone, operation), f"publish peers on {described.name}")
        if failed is not None:
            raise failed

    def console_output(self, instance_id: str, location: str) -> str:
        """Serial port 1 (boot, the startup script, the agent's unit); "" once the VM is deleted."""
        read = self.compute().GetSerialPortOutputInstanceRequest(
            project=self.config.project, zone=location.split(":", 1)[1], instance=instance_id, port=1)
        try:
            output = self.client("InstancesClient").get_serial_port_output(request=read, timeout=CALL_TIMEOUT)
        except sdk_errors() as error:
            if not_found(error):
                return ""  # a preempted spot VM is deleted, its console with it
            raise typed_error(error, f"console output of {instance_id}") from None
        return output.contents

    def terminate(self, instance_id: str) -> None:
        """Idempotent: deleting what is already gone (or not ours to know) is a no-op."""
        instances = self.client("InstancesClient")
        known = self._zone_of.get(instance_id)
        for zone in [known] if known else list(self.config.zones):
            delete = self.compute().DeleteInstanceRequest(project=self.config.project, zone=zone, instance=instance_id,
                                                          request_id=request_uuid(instance_id, "delete"))
            try:
                instances.delete_unary(request=delete, timeout=CALL_TIMEOUT)
                return
            except sdk_errors() as error:
                if not_found(error):
                    continue
                raise typed_error(error, f"terminate {instance_id}") from None
