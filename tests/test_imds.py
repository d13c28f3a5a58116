"""The local metadata server follows IMDSv2 exactly; the agent's client and watcher use it."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from spotrain.agents.metadata_watch import ImdsV2Client, NoticeWatcher
from spotrain.providers.imds_server import MetadataServer, MetadataState


@pytest.fixture
def server():
    server = MetadataServer(MetadataState("i-abc", "zone-a"))
    server.start_background()
    yield server
    server.shutdown()


def call(server, method, path, headers=None):
    request = urllib.request.Request(server.url + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def token(server, ttl="60"):
    status, body = call(server, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    assert status == 200
    return body


def test_token_needs_a_valid_ttl_header(server):
    assert call(server, "PUT", "/latest/api/token")[0] == 400
    assert call(server, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "0"})[0] == 400
    assert call(server, "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "21601"})[0] == 400
    assert call(server, "PUT", "/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "1.2.3.4"})[0] == 403
    assert len(token(server)) > 20


def test_get_needs_a_valid_token(server):
    path = "/latest/meta-data/instance-id"
    assert call(server, "GET", path)[0] == 401
    assert call(server, "GET", path, {"X-aws-ec2-metadata-token": "forged"})[0] == 401
    assert call(server, "GET", path, {"X-aws-ec2-metadata-token": token(server)}) == (200, "i-abc")


def test_expired_token_is_refused(server):
    short = token(server, ttl="1")
    time.sleep(1.2)
    assert call(server, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": short})[0] == 401


def test_instance_action_is_404_until_a_notice(server):
    headers = {"X-aws-ec2-metadata-token": token(server)}
    assert call(server, "GET", "/latest/meta-data/spot/instance-action", headers)[0] == 404
    server.state.post_notice(terminate_at=1767225600.0)  # 2026-01-01T00:00:00Z
    status, body = call(server, "GET", "/latest/meta-data/spot/instance-action", headers)
    assert status == 200
    assert json.loads(body) == {"action": "terminate", "time": "2026-01-01T00:00:00Z"}


def test_client_refreshes_a_revoked_token(server):
    client = ImdsV2Client(server.url)
    assert client.get("instance-id") == "i-abc"
    client._token = "stale"
    assert client.get("placement/availability-zone") == "zone-a"
    assert client.spot_notice() is None


def test_watcher_reports_the_notice_once(server):
    seen = []
    done = threading.Event()
    watcher = NoticeWatcher(ImdsV2Client(server.url), lambda n: (seen.append(n), done.set()), poll_seconds=0.05)
    watcher.start()
    time.sleep(0.2)
    assert not seen
    server.state.post_notice(time.time() + 10)
    assert done.wait(5)
    assert seen[0].action == "terminate"


def test_watcher_reports_a_vanished_metadata_service():
    server = MetadataServer(MetadataState("i-x", "z"))
    url = server.url
    server.server_close()  # nothing listens there any more
    seen = []
    done = threading.Event()
    NoticeWatcher(ImdsV2Client(url, timeout=0.2), lambda n: (seen.append(n), done.set()),
                  poll_seconds=0.02, lost_after_failures=3).start()
    assert done.wait(5)
    assert seen == [None]
