"""The local GCE metadata server follows the protocol; the agent's GCE and AWS watchers use them."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import agent_config

from spotrain.agents.daemon import Agent
from spotrain.agents.metadata_watch import (
    GceMetadataClient,
    GceNoticeWatcher,
    ImdsV2Client,
    NoticeWatcher,
    make_watcher,
    watcher_settings,
)
from spotrain.contracts.agent_config import AgentConfig, AgentConfigError
from spotrain.providers.gce_metadata_server import GceMetadataServer, GceMetadataState
from spotrain.providers.imds_server import MetadataServer, MetadataState


@pytest.fixture
def gce_md():
    server = GceMetadataServer(GceMetadataState("sp-abc", "us-central1-a"))
    server.start_background()
    yield server
    server.shutdown()


def call(server, path, headers=None):
    request = urllib.request.Request(server.url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


GOOGLE = {"Metadata-Flavor": "Google"}


def test_the_flavor_header_is_required_and_proxies_are_refused(gce_md):
    path = "/computeMetadata/v1/instance/preempted"
    assert call(gce_md, path)[0] == 403
    assert call(gce_md, path, {"Metadata-Flavor": "google-ish"})[0] == 403
    assert call(gce_md, path, {**GOOGLE, "X-Forwarded-For": "1.2.3.4"})[0] == 403
    status, body, headers = call(gce_md, path, GOOGLE)
    assert (status, body, headers["Metadata-Flavor"]) == (200, "FALSE", "Google") and headers["ETag"]
    assert call(gce_md, "/computeMetadata/v1/instance/nothing-here", GOOGLE)[0] == 404
    assert call(gce_md, "/latest/meta-data/instance-id", GOOGLE)[0] == 404


def test_wait_for_change_hangs_until_the_value_changes(gce_md):
    path = "/computeMetadata/v1/instance/preempted"
    etag = call(gce_md, path, GOOGLE)[2]["ETag"]
    threading.Timer(0.3, gce_md.state.preempt).start()
    started = time.monotonic()
    status, body, headers = call(gce_md, path + "?wait_for_change=true&timeout_sec=20", GOOGLE)
    assert (status, body) == (200, "TRUE") and headers["ETag"] != etag
    assert 0.2 < time.monotonic() - started < 15
    # a stale last_etag answers at once; timeout_sec bounds the wait when nothing changes
    assert call(gce_md, f"{path}?wait_for_change=true&last_etag={etag}", GOOGLE)[1] == "TRUE"
    status, body, _ = call(gce_md, path + "?wait_for_change=true&timeout_sec=1", GOOGLE)
    assert (status, body) == (200, "TRUE")


def test_client_retries_503_and_reads_the_instance_name(gce_md):
    gce_md.state.fail_next(2)
    client = GceMetadataClient(gce_md.url, backoff=0.01)
    assert client.instance_id() == "sp-abc"
    gce_md.state.fail_next(5)
    with pytest.raises(urllib.error.HTTPError):
        GceMetadataClient(gce_md.url, retries=2, backoff=0.01).preempted()


def watch(watcher_cls, client, **options):
    seen, advisories, done = [], [], threading.Event()
    watcher = watcher_cls(client, lambda n: (seen.append(n), done.set()),
                          on_advisory=advisories.append, **options)
    watcher.start()
    return watcher, seen, advisories, done


def test_gce_watcher_reports_a_preemption_once(gce_md):
    watcher, seen, advisories, done = watch(GceNoticeWatcher, GceMetadataClient(gce_md.url), wait_seconds=5)
    time.sleep(0.3)
    gce_md.state.maintenance("MIGRATE_ON_HOST_MAINTENANCE")  # advisory only, read between hanging GETs
    time.sleep(0.2)
    assert not seen
    gce_md.state.preempt()
    assert done.wait(10)
    watcher.stop()
    assert [n.action for n in seen] == ["preempted"]
    assert [a.action for a in advisories] in ([], ["migrate_on_host_maintenance"])


def test_gce_watcher_treats_terminate_on_maintenance_as_a_notice(gce_md):
    gce_md.state.maintenance("TERMINATE_ON_HOST_MAINTENANCE")
    _, seen, _, done = watch(GceNoticeWatcher, GceMetadataClient(gce_md.url), wait_seconds=1)
    assert done.wait(10)
    assert seen[0].action == "maintenance"


def test_gce_watcher_reports_a_vanished_metadata_service():
    server = GceMetadataServer(GceMetadataState("x", "us-central1-a"))
    url = server.url
    server.server_close()
    client = GceMetadataClient(url, timeout=0.2, retries=1, backoff=0.01)
    _, seen, _, done = watch(GceNoticeWatcher, client, lost_after_failures=2)
    assert done.wait(10)
    assert seen == [None]


def test_aws_watcher_passes_on_a_rebalance_recommendation_then_the_notice():
    server = MetadataServer(MetadataState("i-abc", "us-east-1a"))
    server.start_background()
    try:
        _, seen, advisories, done = watch(NoticeWatcher, ImdsV2Client(server.url), poll_seconds=0.05)
        server.state.post_rebalance(time.time())
        deadline = time.time() + 5
        while not advisories and time.time() < deadline:
            time.sleep(0.05)
        assert [a.action for a in advisories] == ["rebalance"] and not seen
        server.state.post_notice(time.time() + 120)
        assert done.wait(5)
        assert seen[0].action == "terminate" and len(advisories) == 1
    finally:
        server.shutdown()


def test_the_agent_picks_its_watcher_and_instance_id_from_config_or_environment(gce_md):
    config = agent_config(metadata={"kind": "gce", "url": gce_md.url})
    assert watcher_settings(config, environ={}) == ("gce", gce_md.url)
    assert watcher_settings(config, environ={"SPOTRAIN_METADATA_KIND": "aws-imdsv2",
                                             "SPOTRAIN_METADATA_URL": "http://x"}) == ("aws-imdsv2", "http://x")
    assert watcher_settings(agent_config(), environ={}) is None
    with pytest.raises(ValueError, match="unknown metadata kind 'azure'"):
        watcher_settings(agent_config(), environ={"SPOTRAIN_METADATA_KIND": "azure", "SPOTRAIN_METADATA_URL": "http://x"})
    with pytest.raises(AgentConfigError, match="metadata.kind"):
        AgentConfig.from_json(json.dumps({**config.wire(), "metadata": {"kind": "azure", "url": "http://x"}}))
    assert isinstance(make_watcher("gce", gce_md.url, print), GceNoticeWatcher)
    assert isinstance(make_watcher("aws-imdsv2", gce_md.url, print), NoticeWatcher)
    agent = Agent(config)  # no instance_id in user-data: GCE's metadata names it
    assert agent.instance_id == "sp-abc"
