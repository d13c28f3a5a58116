"""Cloud fixtures: moto's EC2 server, the GCE fake, an EC2 fault-injecting proxy, and helpers
that play the cloud's part (spot preemptions) in tests. Import the fixtures into a test module."""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gce_fake import GceFakeServer, service_account_file

from spotrain.providers.background_http import POLL_SECONDS

PROJECT = "spotrain-test"
# The SDKs' credential chains would probe the link-local metadata address: keep them on loopback
# or off, for this process and every CLI subprocess a test starts.
SAFE_ENVIRONMENT = {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                    "AWS_EC2_METADATA_DISABLED": "true"}


def pytest_configure(config) -> None:
    os.environ.update(SAFE_ENVIRONMENT)
GCE_ZONES = ["us-central1-a", "us-central1-b"]
AWS_REGION = "us-east-1"
AWS_IMAGE = "ami-03cf127a"  # one of moto's built-in images
MOTO_ACCOUNT = "123456789012"


@pytest.fixture(scope="session")
def moto_url():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def aws_environment(endpoint: str) -> dict[str, str]:
    """Fake credentials and the endpoint; no shared files, no instance-metadata lookups."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": AWS_REGION, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


@pytest.fixture
def aws(moto_url, monkeypatch):
    """A clean moto account, reached through AWS_ENDPOINT_URL like any boto3 user would."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=10).close()
    for key, value in aws_environment(moto_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return moto_url


def preempt_aws(instance_id: str, region: str = AWS_REGION) -> None:
    """What EC2 does to a spot instance it reclaims: terminated, reason Server.SpotInstanceTermination."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    instance = ec2_backends[MOTO_ACCOUNT][region].get_instance(instance_id)
    instance.terminate()
    instance.state_reason = StateReason("Server.SpotInstanceTermination: Spot instance termination",
                                        "Server.SpotInstanceTermination")


def power_off_aws(instance_id: str, region: str = AWS_REGION) -> None:
    """What EC2 does to an instance whose OS shut down (InstanceInitiatedShutdownBehavior terminate):
    terminated, reason Client.InstanceInitiatedShutdown (moto plays only the user's termination)."""
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.instances import StateReason

    instance = ec2_backends[MOTO_ACCOUNT][region].get_instance(instance_id)
    instance.terminate()
    instance.state_reason = StateReason("Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                                        "Client.InstanceInitiatedShutdown")


def aws_instances(region: str = AWS_REGION) -> list[dict]:
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    return [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]


def gce_environment(key_file: str) -> dict[str, str]:
    return {"GOOGLE_APPLICATION_CREDENTIALS": key_file, "NO_GCE_CHECK": "true", "GOOGLE_CLOUD_PROJECT": PROJECT}


@pytest.fixture
def gce(tmp_path, monkeypatch):
    """The GCE fake, and Application Default Credentials (a service-account key it trusts)."""
    server = GceFakeServer(PROJECT, GCE_ZONES, op_seconds=0.2, delete_after_preempt=1.0)
    server.start_background()
    key_file = service_account_file(tmp_path / "gcp-key.json", server, PROJECT)
    for key, value in gce_environment(key_file).items():
        monkeypatch.setenv(key, value)
    yield server
    server.close()


class Ec2FaultProxy(ThreadingHTTPServer):
    """Forwards boto3's EC2 calls to moto, except RunInstances in a zone told to fail: those get
    the EC2 error document (code, HTTP status) that EC2 itself answers with."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.faults: dict[str, tuple[str, int]] = {}  # zone -> (error code, HTTP status)
        self.hits: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: Ec2FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        zone = form.get("Placement.AvailabilityZone", [""])[0]
        if form.get("Action") == ["RunInstances"] and zone in self.server.faults:
            code, status = self.server.faults[zone]
            self.server.hits.append(code)
            document = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                        f"<Message>{code} (injected in {zone})</Message></Error></Errors>"
                        f"<RequestID>fault-{len(self.server.hits)}</RequestID></Response>").encode()
            return self._send(status, document, {"Content-Type": "text/xml;charset=UTF-8"})
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        request = urllib.request.Request(self.server.upstream + self.path, data=body or None, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                self._send(response.status, response.read(), dict(response.headers))
        except urllib.error.HTTPError as error:
            self._send(error.code, error.read(), dict(error.headers))

    def do_POST(self) -> None:
        self._forward("POST")

    def do_GET(self) -> None:
        self._forward("GET")


@pytest.fixture
def ec2_faults(aws, monkeypatch):
    proxy = Ec2FaultProxy(aws)
    thread = threading.Thread(target=proxy.serve_forever, args=(POLL_SECONDS,), daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.shutdown()
    proxy.server_close()
