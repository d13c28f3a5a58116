"""Spot instances on EC2 through boto3 (imported lazily: `pip install spotrain[aws]`).

Credentials come from boto3's standard chain and the endpoint from AWS_ENDPOINT_URL (tests
point it at moto's server). Each launch is one `run_instances` with spot market options and
`ClientToken` derived from the request id; before it, the cluster's instances are looked up by
the request-id tag, so a re-issued request returns the instance it already made. Cloud errors
become the typed errors of providers.base here; nothing above matches strings.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Set as AbstractSet
from datetime import datetime, timezone
from typing import Any

from spotrain.contracts.live_peers import EC2_TAG_VALUE_LIMIT, PEERS_TAG, peers_value
from spotrain.contracts.states import EndReason, InstanceState
from spotrain.providers.base import (
    SELF_SHUTDOWN_DETAIL,
    AuthError,
    CapacityError,
    Instance,
    LaunchRequest,
    Offer,
    PriceError,
    ProviderError,
    QuotaError,
    SettingError,
)
from spotrain.providers.bootstrap import METADATA, render_cloud_init

NAME = "aws"
TAG_CLUSTER, TAG_REQUEST = "spotrain:cluster", "spotrain:request-id"
TAG_ROLE, TAG_PRICE = "spotrain:role", "spotrain:price"
DEFAULT_IMAGE_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"

CAPACITY_CODES = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                  "InsufficientReservedInstanceCapacity", "Unsupported"}
QUOTA_CODES = {"MaxSpotInstanceCountExceeded", "InstanceLimitExceeded", "VcpuLimitExceeded"}
PRICE_CODES = {"SpotMaxPriceTooLow"}
AUTH_CODES = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "ExpiredToken", "SignatureDoesNotMatch",
              "RequestExpired", "AccessDenied", "OptInRequired"}
# codes that name a setting of the spec the account does not have: retrying the launch cannot help
SETTING_CODES = {"InvalidAMIID.NotFound": "image_id", "InvalidAMIID.Malformed": "image_id",
                 "InvalidAMIID.Unavailable": "image_id", "InvalidKeyPair.NotFound": "key_name",
                 "InvalidSubnetID.NotFound": "subnets", "InvalidSubnetID.Malformed": "subnets"}
# EC2 answers a missing instance profile with InvalidParameterValue naming it (moto: NoSuchEntity)
PROFILE_CODES = {"InvalidParameterValue", "NoSuchEntity"}
# spot request status codes that mean "the cloud took it back" (not a user's termination)
INTERRUPTED_STATUSES = {"instance-terminated-by-price", "instance-terminated-no-capacity",
                        "instance-terminated-capacity-oversubscribed", "instance-terminated-launch-group-constraint",
                        "marked-for-termination"}
SPOT_TERMINATION_REASON = "Server.SpotInstanceTermination"
USER_SHUTDOWN_REASON = "Client.UserInitiatedShutdown"
# the VM powered itself off: only infra/spotrain-agent-failed.sh does, once systemd gave up on the agent
SELF_SHUTDOWN_REASON = "Client.InstanceInitiatedShutdown"
GPU_BY_FAMILY = {"g4dn": "T4", "g5": "A10G", "g6": "L4", "p3": "V100", "p4d": "A100", "p5": "H100", "g4ad": "V520"}


def gpu_of(instance_type: str) -> str | None:
    return GPU_BY_FAMILY.get(instance_type.split(".", 1)[0])


def client_token(request_id: str) -> str:
    """EC2 takes up to 64 ASCII characters; longer request ids are hashed (still one token per id)."""
    if len(request_id) <= 64 and request_id.isascii():
        return request_id
    return hashlib.sha256(request_id.encode()).hexdigest()


def sdk_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises: service errors and client-side ones (credentials, connections)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def typed_error(error: Exception, where: str) -> ProviderError:
    """boto3's errors as the typed errors of providers.base."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return AuthError(f"aws: no usable credentials ({where})")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        text = error.response.get("Error", {}).get("Message", "")
        message = f"aws {where}: {code}: {text}"
        if code in SETTING_CODES:
            return SettingError(message, f"providers.aws.{SETTING_CODES[code]}")
        if code in PROFILE_CODES and "instance profile" in text.lower().replace("instanceprofile", "instance profile"):
            return SettingError(message, "providers.aws.iam_instance_profile")
        for codes, kind in ((CAPACITY_CODES, CapacityError), (QUOTA_CODES, QuotaError), (PRICE_CODES, PriceError),
                            (AUTH_CODES, AuthError)):
            if code in codes:
                return kind(message)
        return ProviderError(message)
    return ProviderError(f"aws {where}: {type(error).__name__}: {error}")


def region_of(zone: str) -> str:
    return zone.rstrip("abcdefghijklmnopqrstuvwxyz")


class AwsProvider:
    name = NAME
    # EC2 bills a spot instance until it is terminated; shutting-down takes up to about two minutes
    termination_lag_seconds = 120.0

    def __init__(self, config, session: Any = None):
        self.config = config  # spotrain.config.AwsProvider
        self._session = session
        self._clients: dict[str, Any] = {}
        self._regions_by_instance: dict[str, str] = {}
        self._groups: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # -- clients ---------------------------------------------------------------------------
    def session(self):
        if self._session is None:
            try:
                import boto3
            except ImportError:
                raise ProviderError("aws: boto3 is not installed; pip install 'spotrain[aws]'") from None
            self._session = boto3.Session()
        return self._session

    def ec2(self, region: str):
        with self._lock:
            if region not in self._clients:
                from botocore.config import Config

                config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30)
                self._clients[region] = self.session().client("ec2", region_name=region, config=config)
            return self._clients[region]

    def check_credentials(self) -> None:
        """Fail before any launch: credentials missing from the chain, or refused by STS."""
        if self.session().get_credentials() is None:
            raise AuthError("aws: no credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                            "~/.aws/credentials or an instance role)")
        try:
            self.session().client("sts", region_name=self.config.regions[0]).get_caller_identity()
        except sdk_errors() as error:
            raise AuthError(f"aws: credentials refused: {typed_error(error, 'sts')}") from None

    # -- offers ----------------------------------------------------------------------------
    def zones(self, region: str) -> list[str]:
        response = self.ec2(region).describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]},
                     {"Name": "zone-type", "Values": ["availability-zone"]}])
        names = [zone["ZoneName"] for zone in response["AvailabilityZones"]]
        wanted = self.config.zones
        return [name for name in names if wanted is None or name in wanted]

    def offers(self) -> list[Offer]:
        """One offer per (zone, instance type): the newest spot price, capped by max_price_usd_per_hour."""
        offers = []
        for region in self.config.regions:
            try:
                zones = set(self.zones(region))
                latest: dict[tuple[str, str], tuple[float, float]] = {}
                pages = self.ec2(region).get_paginator("describe_spot_price_history").paginate(
                    InstanceTypes=list(self.config.instance_types), ProductDescriptions=["Linux/UNIX"],
                    StartTime=datetime.now(timezone.utc))
                for page in pages:
                    for entry in page["SpotPriceHistory"]:
                        key = (entry["AvailabilityZone"], entry["InstanceType"])
                        stamp = entry["Timestamp"].timestamp()
                        if key[0] in zones and (key not in latest or stamp > latest[key][0]):
                            latest[key] = (stamp, float(entry["SpotPrice"]))
            except sdk_errors() as error:
                raise typed_error(error, f"prices in {region}") from None
            cap = self.config.max_price_usd_per_hour
            for (zone, instance_type), (_, price) in sorted(latest.items()):
                if cap is None or price <= cap:
                    offers.append(Offer(NAME, f"{NAME}:{zone}", instance_type, gpu_of(instance_type), price))
        return offers

    # -- launch ----------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> Instance:
        zone = request.offer.location.split(":", 1)[1]
        region = region_of(zone)
        ec2 = self.ec2(region)
        try:
            existing = self._described(region, [{"Name": f"tag:{TAG_CLUSTER}", "Values": [request.cluster]},
                                                {"Name": f"tag:{TAG_REQUEST}", "Values": [request.request_id]}])
            if existing:
                return self._instance(region, existing[0])
            group = self._security_group(region, request.cluster, zone)
            response = ec2.run_instances(**self._run_arguments(request, zone, group))
        except sdk_errors() as error:
            raise typed_error(error, f"launch in {zone}") from None
        return self._instance(region, response["Instances"][0])

    def _run_arguments(self, request: LaunchRequest, zone: str, group: str) -> dict:
        config = self.config
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if config.max_price_usd_per_hour is not None:
            spot["MaxPrice"] = f"{config.max_price_usd_per_hour:.5f}"
        tags = [{"Key": TAG_CLUSTER, "Value": request.cluster}, {"Key": TAG_ROLE, "Value": "worker"},
                {"Key": TAG_REQUEST, "Value": request.request_id},
                {"Key": TAG_PRICE, "Value": repr(request.offer.spot_usd_per_hour)}]
        user_data = render_cloud_init(
            request.user_data.for_vm(location=request.offer.location, metadata=METADATA[NAME], host="0.0.0.0",
                                     port=config.swarm_port),
            NAME, config.worker_image)
        arguments: dict[str, Any] = {
            "ImageId": config.image_id or self._default_image(region_of(zone)),
            "InstanceType": request.offer.instance_type, "MinCount": 1, "MaxCount": 1,
            "ClientToken": client_token(request.request_id),
            "Placement": {"AvailabilityZone": zone}, "SecurityGroupIds": [group], "UserData": user_data,
            "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": spot},
            # a VM whose agent failed powers itself off: terminated, it bills nothing more (a one-time
            # spot instance cannot stop anyway; said here so it never depends on a default)
            "InstanceInitiatedShutdownBehavior": "terminate",
            # IMDSv2 only; tags visible, so the agent reads the live peers (PEERS_TAG) there
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "InstanceMetadataTags": "enabled"},
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                                  for kind in ("instance", "volume", "spot-instances-request")],
        }
        if zone in config.subnets:
            arguments["SubnetId"] = config.subnets[zone]
        if config.key_name:
            arguments["KeyName"] = config.key_name
        if config.iam_instance_profile:
            arguments["IamInstanceProfile"] = {"Name": config.iam_instance_profile}
        return arguments

    def _default_image(self, region: str) -> str:
        try:
            ssm = self.session().client("ssm", region_name=region)
            return ssm.get_parameter(Name=DEFAULT_IMAGE_PARAMETER)["Parameter"]["Value"]
        except sdk_errors() as error:
            raise ProviderError(f"aws: no image_id set and the default image lookup failed in {region}: "
                                f"{typed_error(error, 'ssm')}; set providers.aws.image_id") from None

    def _security_group(self, region: str, cluster: str, zone: str) -> str:
        """The cluster's group: the swarm port open to members of the group and to the controller only."""
        key = (region, cluster)
        if key in self._groups:
            return self._groups[key]
        ec2 = self.ec2(region)
        vpc = self._vpc(region, zone)
        name = f"spotrain-{cluster}"
        found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                      {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
        if found:
            group = found[0]["GroupId"]
        else:
            group = ec2.create_security_group(
                GroupName=name, Description=f"spotrain cluster {cluster}: swarm port", VpcId=vpc,
                TagSpecifications=[{"ResourceType": "security-group",
                                    "Tags": [{"Key": TAG_CLUSTER, "Value": cluster}]}],
            )["GroupId"]
            port = self.config.swarm_port
            rules = [{"IpProtocol": protocol, "FromPort": port, "ToPort": port,
                      "UserIdGroupPairs": [{"GroupId": group}],
                      **({"IpRanges": [{"CidrIp": self.config.controller_cidr, "Description": "controller"}]}
                         if self.config.controller_cidr else {})}
                     for protocol in ("tcp", "udp")]
            ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=rules)
        self._groups[key] = group
        return group

    def _vpc(self, region: str, zone: str) -> str:
        ec2 = self.ec2(region)
        if zone in self.config.subnets:
            subnets = ec2.describe_subnets(SubnetIds=[self.config.subnets[zone]])["Subnets"]
            return subnets[0]["VpcId"]
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ProviderError(f"aws: {region} has no default VPC; set providers.aws.subnets")
        return vpcs[0]["VpcId"]

    # -- list and terminate ------------------------------------------------------------------
    def _described(self, region: str, filters: list[dict]) -> list[dict]:
        found = []
        for page in self.ec2(region).get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                found += reservation["Instances"]
        return found

    def list_instances(self, cluster: str) -> list[Instance]:
        instances = []
        for region in self.config.regions:
            try:
                described = self._described(region, [{"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}])
                interrupted = self._interrupted_requests(region, described)
            except sdk_errors() as error:
                raise typed_error(error, f"list in {region}") from None
            instances += [self._instance(region, d, interrupted) for d in described]
        return instances

    def _interrupted_requests(self, region: str, described: list[dict]) -> set[str]:
        """Spot request ids of ended instances whose request status says the cloud took them back."""
        settled = {SPOT_TERMINATION_REASON, USER_SHUTDOWN_REASON, SELF_SHUTDOWN_REASON}  # the reason already tells
        ids = [d["SpotInstanceRequestId"] for d in described
               if d.get("SpotInstanceRequestId") and d["State"]["Name"] not in ("pending", "running")
               and d.get("StateReason", {}).get("Code") not in settled]
        if not ids:
            return set()
        requests = self.ec2(region).describe_spot_instance_requests(SpotInstanceRequestIds=ids)
        return {r["SpotInstanceRequestId"] for r in requests["SpotInstanceRequests"]
                if r.get("Status", {}).get("Code") in INTERRUPTED_STATUSES}

    def _instance(self, region: str, described: dict, interrupted: AbstractSet[str] = frozenset()) -> Instance:
        tags = {tag["Key"]: tag["Value"] for tag in described.get("Tags", [])}
        state = described["State"]["Name"]
        reason = described.get("StateReason", {}).get("Code", "")
        preempted = reason == SPOT_TERMINATION_REASON or described.get("SpotInstanceRequestId") in interrupted
        if state in ("pending", "running") or (state in ("shutting-down", "stopping") and not preempted):
            status, end_reason, detail = InstanceState.RUNNING, None, ""  # still there, still billed
        elif preempted:  # after the two-minute interruption notice
            status, end_reason, detail = InstanceState.PREEMPTED, EndReason.SPOT_PREEMPTION, ""
        elif reason == USER_SHUTDOWN_REASON:
            status, end_reason, detail = InstanceState.TERMINATED, EndReason.TERMINATED_BY_REQUEST, ""
        elif reason == SELF_SHUTDOWN_REASON:  # its console says why (spotrain.logs.AGENT_FAILED_MARKER)
            status, end_reason, detail = InstanceState.TERMINATED, EndReason.AGENT_FAILED, SELF_SHUTDOWN_DETAIL
        else:
            status, end_reason, detail = InstanceState.TERMINATED, EndReason.ENDED_BY_PROVIDER, reason or state
        self._regions_by_instance[described["InstanceId"]] = region
        return Instance(
            instance_id=described["InstanceId"], request_id=tags.get(TAG_REQUEST, described.get("ClientToken", "")),
            cluster=tags.get(TAG_CLUSTER, ""), location=f"{NAME}:{described['Placement']['AvailabilityZone']}",
            price_usd_per_hour=float(tags.get(TAG_PRICE, "0") or 0), state=status,
            launched_at=described["LaunchTime"].timestamp(), ended_at=None, end_reason=end_reason,
            end_detail=detail, addresses=self._addresses(described) if status == InstanceState.RUNNING else (),
        )

    def _addresses(self, described: dict) -> tuple[str, ...]:
        """Where the agent listens: the private IP (peers in the VPC), then the public one (everyone else)."""
        ips = [described.get("PrivateIpAddress"), described.get("PublicIpAddress")]
        return tuple(f"/ip4/{ip}/tcp/{self.config.swarm_port}" for ip in ips if ip)

    def publish_peers(self, cluster: str, peers: list[str]) -> None:
        """The `spotrain:peers` tag on each running instance (its IMDS shows it), rewritten when it changes."""
        value = peers_value(peers, EC2_TAG_VALUE_LIMIT)
        for region in self.config.regions:
            try:
                stale = [d["InstanceId"] for d in self._described(region, [
                    {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]}])
                    if {t["Key"]: t["Value"] for t in d.get("Tags", [])}.get(PEERS_TAG) != value]
                if stale:
                    self.ec2(region).create_tags(Resources=stale, Tags=[{"Key": PEERS_TAG, "Value": value}])
            except sdk_errors() as error:
                raise typed_error(error, f"publish peers in {region}") from None

    def console_output(self, instance_id: str, location: str) -> str:
        """The instance's serial console as EC2 keeps it (boot, cloud-init, the agent); "" when gone."""
        from botocore.exceptions import ClientError

        ec2 = self.ec2(region_of(location.split(":", 1)[1]))
        try:
            try:
                response = ec2.get_console_output(InstanceId=instance_id, Latest=True)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") != "UnsupportedOperation":
                    raise
                response = ec2.get_console_output(InstanceId=instance_id)  # Xen types: the buffered output
        except sdk_errors() as error:
            if isinstance(error, ClientError) and error.response.get("Error", {}).get("Code", "").startswith(
                    "InvalidInstanceID"):
                return ""
            raise typed_error(error, f"console output of {instance_id}") from None
        return response.get("Output") or ""

    def terminate(self, instance_id: str) -> None:
        """Idempotent: an instance that is gone, or unknown here, is left alone."""
        from botocore.exceptions import BotoCoreError, ClientError

        known = self._regions_by_instance.get(instance_id)
        for region in [known] if known else list(self.config.regions):
            try:
                self.ec2(region).terminate_instances(InstanceIds=[instance_id])
                return
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
                    continue
                raise typed_error(error, f"terminate {instance_id}") from None
            except BotoCoreError as error:
                raise typed_error(error, f"terminate {instance_id}") from None
