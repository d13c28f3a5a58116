"""The local metadata servers (IMDSv2 and GCE) under malformed requests: every request gets an HTTP
answer or a closed connection, a bad Content-Length is a 400 at once (never a traceback or a thread
left reading), and the server keeps answering; expired IMDSv2 tokens are pruned."""

from __future__ import annotations

import socket
import threading
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotrain.providers.background_http import MAX_BODY_BYTES
from spotrain.providers.gce_metadata_server import GceMetadataServer, GceMetadataState
from spotrain.providers.imds_server import MAX_LIVE_TOKENS, MetadataServer, MetadataState

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
STATUSES = {200, 400, 401, 403, 404, 405, 501, 503, 505}


@pytest.fixture(params=["imds", "gce"])
def server(request):
    server = (MetadataServer(MetadataState("i-abc", "zone-a")) if request.param == "imds"
              else GceMetadataServer(GceMetadataState("vm-1", "us-central1-a")))
    server.start_background()
    yield server
    server.shutdown()
    server.server_close()


def exchange(server, raw: bytes, close_write: bool = True) -> bytes:
    """Send `raw` as it is; what the server answers until it closes or goes quiet."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(raw)
        if close_write:  # the client has nothing more to say: a short body is short for good
            conn.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def statuses(answer: bytes) -> list[int]:
    return [int(line.split()[1]) for line in answer.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def still_answers(server) -> None:
    path = "/latest/api/token" if isinstance(server, MetadataServer) else "/computeMetadata/v1/instance/preempted"
    headers = ({"X-aws-ec2-metadata-token-ttl-seconds": "60"} if isinstance(server, MetadataServer)
               else {"Metadata-Flavor": "Google"})
    request = urllib.request.Request(server.url + path, method="PUT" if "token" in path else "GET", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", "0x10", "", "99999999999999999999", str(MAX_BODY_BYTES + 1)])
@pytest.mark.parametrize("method", ["PUT", "GET", "POST"])
def test_a_bad_content_length_is_a_400_at_once(server, method, length):
    raw = (f"{method} /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n"
           f"Metadata-Flavor: Google\r\nContent-Length: {length}\r\n\r\n").encode()
    # the write side stays open: a server that waited for the body would hold this connection until our timeout
    assert statuses(exchange(server, raw, close_write=False)) == [400]
    still_answers(server)


def test_a_body_cut_short_is_a_400(server):
    raw = b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort"
    assert statuses(exchange(server, raw)) == [400]


methods = st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"]) | st.text(max_size=8)
paths = (st.sampled_from(["/latest/api/token", "/latest/meta-data/instance-id", "/latest/meta-data/../../etc",
                          "/computeMetadata/v1/instance/preempted?wait_for_change=true&timeout_sec=nan",
                          "/computeMetadata/v1/instance/name?timeout_sec=-5&wait_for_change=true", "*", ""])
         | st.text(max_size=30))
header_values = (st.sampled_from(["-1", "0", "5", "abc", " +7 ", "1e3", "99999999999999999999", "Google", "chunked"])
                 | st.text(max_size=12))
header_names = st.sampled_from(["Content-Length", "X-aws-ec2-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token",
                                "Metadata-Flavor", "Transfer-Encoding", "X-Forwarded-For"]) | st.text(max_size=10)


@FUZZ
@given(method=methods, path=paths, headers=st.lists(st.tuples(header_names, header_values), max_size=5),
       body=st.binary(max_size=64), version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/9.9", ""]))
def test_every_request_gets_an_answer_or_a_closed_connection(server, method, path, headers, body, version):
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode("utf-8", "surrogatepass") + b"\r\n" + body
    answer = exchange(server, raw)
    assert set(statuses(answer)) <= STATUSES, answer[:200]
    for name, value in headers:
        if name == "Content-Length" and value in ("-1", "abc", "1e3", "99999999999999999999"):
            assert 200 not in statuses(answer)
    still_answers(server)


def test_no_request_leaves_a_thread_behind(server):
    before = threading.active_count()
    for length in ("-1", "abc", "100"):
        raw = f"PUT /latest/api/token HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode()
        for _ in range(20):
            exchange(server, raw)
    # each handler thread ends with its connection; give the last ones their moment to return
    deadline = threading.Event()
    for _ in range(50):
        if threading.active_count() <= before:
            break
        deadline.wait(0.1)
    assert threading.active_count() <= before


def test_expired_tokens_are_pruned_and_live_ones_are_bounded():
    now = [0.0]
    state = MetadataState("i-abc", "zone-a", clock=lambda: now[0])
    first = state.issue_token(1)
    for _ in range(5):
        state.issue_token(1)
    assert state.live_tokens() == 6
    now[0] = 2.0  # all six expired
    second = state.issue_token(60)
    assert state.live_tokens() == 1 and not state.token_valid(first) and state.token_valid(second)
    for _ in range(MAX_LIVE_TOKENS + 10):
        state.issue_token(60)
    assert state.live_tokens() == MAX_LIVE_TOKENS
