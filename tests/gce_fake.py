"""A small stateful Compute Engine REST fake for the real google-cloud-compute client.

No official emulator exists, so this serves the subset spotrain uses, shaped like the v1 API:
instances insert/get/list/delete/setMetadata (labels, metadata with its fingerprint, `filter`,
`requestId` idempotency), zone and global operations (get, list, wait), firewalls get/insert, serial port 1 output
(getSerialPortOutput: what a VM printed, from a byte offset), and an OAuth token
endpoint that checks the service-account JWT the real google-auth library signs. Compute calls
need a bearer token it issued (401 otherwise). Errors use the API's JSON error shape.

Test controls: `inject(zone, code)` makes the next inserts in a zone fail in their operation
(ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED), `absent` holds images and service-account e-mails
the project does not have (inserts naming one are refused as the API refuses them),
`preempt(zone, name)` plays a spot preemption
(status TERMINATED plus a `compute.instances.preempted` operation; deleted shortly after when
the instance asked for instanceTerminationAction=DELETE), `power_off(zone, name)` plays the guest
OS shutting the VM down (TERMINATED and kept, a `compute.instances.guestTerminate` operation),
`print_to_console(zone, name, text)`
appends to a VM's serial port output (a booted VM starts with one line of its own).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from spotrain.providers.background_http import POLL_SECONDS  # a shutdown() that waits 50 ms, not 0.5 s

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
TERM_RE = re.compile(r'^\s*([A-Za-z][A-Za-z0-9_.-]*)\s*(=|!=)\s*("([^"]*)"|([^\s()"]+))\s*$')
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
ERROR_STATUS = {"ZONE_RESOURCE_POOL_EXHAUSTED": 503, "QUOTA_EXCEEDED": 403}


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def body(self) -> dict:
        return {"error": {"code": self.status, "message": self.message,
                          "errors": [{"message": self.message, "domain": "global", "reason": self.reason}]}}


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """`a = "x" AND (b != y)` -> [(a, =, x), (b, !=, y)]; anything else is a 400, like the API."""
    terms = []
    for part in re.split(r"\)\s*(?:AND\s*)?\(|\s+AND\s+", text.strip()):
        match = TERM_RE.match(part.strip().strip("()"))
        if not match:
            raise ApiError(400, "invalid",
                           f"Invalid value for field 'filter': '{text}'. Invalid list filter expression.")
        terms.append((match[1], match[2], match[4] if match[4] is not None else match[5]))
    return terms


def field_value(resource: dict, path: str) -> str | None:
    value: object = resource
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return None if isinstance(value, (dict, list)) else str(value)


def matches(resource: dict, terms: list[tuple[str, str, str]]) -> bool:
    for path, op, wanted in terms:
        value = field_value(resource, path)
        equal = value is not None and (value == wanted or value.rsplit("/", 1)[-1] == wanted)
        if equal != (op == "="):
            return False
    return True


class GceState:
    def __init__(self, project: str, zones: list[str], base_url: str = "", op_seconds: float = 0.3,
                 delete_after_preempt: float = 1.0):
        self.project, self.zones = project, set(zones)
        self.base_url = base_url
        self.op_seconds, self.delete_after_preempt = op_seconds, delete_after_preempt
        self.lock = threading.Condition()
        self.instances: dict[str, dict[str, dict]] = {zone: {} for zone in zones}
        self.operations: dict[str, dict[str, dict]] = {zone: {} for zone in zones}
        self.operations["global"] = {}
        self.firewalls: dict[str, dict] = {}
        self.consoles: dict[tuple[str, str], str] = {}  # (zone, name) -> serial port 1 output
        self.request_ids: dict[str, tuple[str, str]] = {}  # requestId -> (scope, operation name)
        self.faults: dict[str, list[str]] = {}
        self.absent: set[str] = set()  # images and service accounts that do not exist
        self.tokens: set[str] = set()
        self.service_accounts: dict[str, object] = {}  # client e-mail -> RSA public key
        self.ids = itertools.count(4_000_000_000_000_000_000)
        self.timers: list[threading.Timer] = []

    # -- controls used by tests ------------------------------------------------------------
    def inject(self, zone: str, code: str, times: int = 1) -> None:
        with self.lock:
            self.faults.setdefault(zone, []).extend([code] * times)

    def preempt(self, zone: str, name: str) -> None:
        with self.lock:
            instance = self.instances[zone][name]
            instance["status"] = "TERMINATED"
            instance["lastStopTimestamp"] = rfc3339(time.time())
            self._operation(zone, "compute.instances.preempted", instance, done=True, user="system")
            if instance.get("scheduling", {}).get("instanceTerminationAction") == "DELETE":
                self._later(self.delete_after_preempt, lambda: self.instances[zone].pop(name, None))

    def power_off(self, zone: str, name: str) -> None:
        """The guest OS powered the VM off: TERMINATED (stopped: kept, its disk still billed) with a
        system `compute.instances.guestTerminate` operation, whatever its termination action."""
        with self.lock:
            instance = self.instances[zone][name]
            instance["status"] = "TERMINATED"
            instance["lastStopTimestamp"] = rfc3339(time.time())
            self._operation(zone, "compute.instances.guestTerminate", instance, done=True, user="system")

    def print_to_console(self, zone: str, name: str, text: str) -> None:
        with self.lock:
            self.consoles[(zone, name)] = self.consoles.get((zone, name), "") + text

    def live_instances(self) -> list[dict]:
        """Every instance that is not TERMINATED, in any zone: what costs money."""
        with self.lock:
            return [dict(i) for zone in self.instances.values() for i in zone.values() if i["status"] != "TERMINATED"]

    def all_instances(self) -> list[dict]:
        with self.lock:
            return [dict(i) for zone in self.instances.values() for i in zone.values()]

    def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()

    # -- internals ---------------------------------------------------------------------------
    def _later(self, seconds: float, action) -> None:
        def run() -> None:
            with self.lock:
                action()
                self.lock.notify_all()

        timer = threading.Timer(seconds, run)
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def link(self, *parts: str) -> str:
        return f"{self.base_url}/compute/v1/projects/{self.project}/" + "/".join(parts)

    def _operation(self, scope: str, kind: str, target: dict, done: bool, user: str = "spotrain@fake",
                   error: str | None = None) -> dict:
        now = time.time()
        name = f"operation-{int(now * 1000)}-{secrets.token_hex(6)}"
        where = ("global",) if scope == "global" else ("zones", scope)
        op = {
            "kind": "compute#operation", "id": str(next(self.ids)), "name": name, "operationType": kind,
            "targetLink": target.get("selfLink", ""), "targetId": target.get("id", ""),
            "status": "DONE" if done else "RUNNING", "progress": 100 if done else 0, "user": user,
            "insertTime": rfc3339(now), "startTime": rfc3339(now), "selfLink": self.link(*where, "operations", name),
        }
        if scope != "global":
            op["zone"] = self.link("zones", scope)
        if done:
            op["endTime"] = rfc3339(now)
        if error:
            op["error"] = {"errors": [{"code": error, "message": f"{error}: the fake says so in {scope}"}]}
            op["httpErrorStatusCode"] = ERROR_STATUS.get(error, 400)
            op["httpErrorMessage"] = "SERVICE UNAVAILABLE" if op["httpErrorStatusCode"] == 503 else "FORBIDDEN"
        self.operations[scope][name] = op
        return op

    def _finish(self, scope: str, op: dict, then=None) -> None:
        def done() -> None:
            if then is not None:
                then()
            op.update(status="DONE", progress=100, endTime=rfc3339(time.time()))

        self._later(self.op_seconds, done)

    def _zone(self, zone: str) -> None:
        if zone not in self.zones:
            raise ApiError(404, "notFound", f"The resource 'projects/{self.project}/zones/{zone}' was not found")

    def _idempotent(self, request_id: str | None, scope: str) -> dict | None:
        if request_id is None:
            return None
        try:
            if uuid.UUID(request_id).int == 0:
                raise ValueError
        except ValueError:
            raise ApiError(400, "invalid", "Invalid value for field 'requestId': must be a non-zero UUID") from None
        seen = self.request_ids.get(request_id)
        return self.operations[seen[0]][seen[1]] if seen else None

    # -- API ---------------------------------------------------------------------------------
    def insert_instance(self, zone: str, body: dict, request_id: str | None) -> dict:
        self._zone(zone)
        if (op := self._idempotent(request_id, zone)) is not None:
            return op  # the same request again: its operation, nothing new
        name = body.get("name", "")
        if not NAME_RE.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
        if name in self.instances[zone]:
            raise ApiError(409, "alreadyExists",
                           f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists")
        for key, value in (body.get("labels") or {}).items():
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.labels': '{key}={value}'")
        machine = body.get("machineType", "")
        if not re.search(rf"zones/{re.escape(zone)}/machineTypes/[a-z0-9-]+$", machine):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.machineType': '{machine}'")
        if not body.get("disks"):
            raise ApiError(400, "required", "Required field 'resource.disks' not specified")
        self._check_references(body)
        fault = self.faults.get(zone, []).pop(0) if self.faults.get(zone) else None
        instance = dict(body)
        instance.update(
            kind="compute#instance", id=str(next(self.ids)), zone=self.link("zones", zone),
            machineType=self.link("zones", zone, "machineTypes", machine.rsplit("/", 1)[-1]),
            status="PROVISIONING", creationTimestamp=rfc3339(time.time()),
            selfLink=self.link("zones", zone, "instances", name),
        )
        instance["metadata"] = dict(instance.get("metadata") or {}, kind="compute#metadata",
                                    fingerprint=_fingerprint())
        for index, nic in enumerate(instance.get("networkInterfaces") or [{}]):
            nic["networkIP"] = f"10.128.0.{len(self.instances[zone]) + 2}"
            for config in nic.get("accessConfigs", []):
                config["natIP"] = f"203.0.113.{(int(instance['id']) + index) % 250 + 1}"
        op = self._operation(zone, "insert", instance, done=fault is not None, error=fault)
        if request_id:
            self.request_ids[request_id] = (zone, op["name"])
        if fault is None:
            self.instances[zone][name] = instance
            self._finish(zone, op, then=lambda: self._boot(zone, instance))
        return op

    def _check_references(self, body: dict) -> None:
        """An image or service account that does not exist: the API's own answers."""
        for disk in body.get("disks", []):
            image = (disk.get("initializeParams") or {}).get("sourceImage", "")
            if image in self.absent:
                raise ApiError(404, "notFound", f"The resource '{image}' was not found")
        for index, account in enumerate(body.get("serviceAccounts") or []):
            if account.get("email") in self.absent:
                raise ApiError(400, "invalid", f"Invalid value for field 'resource.serviceAccounts[{index}].email': "
                                               f"'{account['email']}'. The service account does not exist.")

    def _boot(self, zone: str, instance: dict) -> None:
        instance.update(status="RUNNING", lastStartTimestamp=rfc3339(time.time()))
        self.consoles[(zone, instance["name"])] = f"fake-gce: {instance['name']} booted\n"

    def serial_port_output(self, zone: str, name: str, port: int, start: int) -> dict:
        """Like getSerialPortOutput: the output from byte `start` on, and where the next read starts."""
        instance = self.get_instance(zone, name)
        if port != 1:
            raise ApiError(400, "invalid", f"Invalid value for field 'port': '{port}'")
        contents = self.consoles.get((zone, name), "")
        return {"kind": "compute#serialPortOutput", "contents": contents[start:], "start": str(start),
                "next": str(len(contents)), "selfLink": instance["selfLink"] + "/serialPort"}

    def get_instance(self, zone: str, name: str) -> dict:
        self._zone(zone)
        if name not in self.instances[zone]:
            raise ApiError(404, "notFound", f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' "
                                            "was not found")
        return self.instances[zone][name]

    def set_metadata(self, zone: str, name: str, body: dict, request_id: str | None) -> dict:
        """Like instances.setMetadata: every item replaced, only with the fingerprint of what is replaced."""
        if (op := self._idempotent(request_id, zone)) is not None:
            return op
        instance = self.get_instance(zone, name)
        if body.get("fingerprint") != instance["metadata"]["fingerprint"]:
            raise ApiError(412, "conditionNotMet", "Supplied fingerprint does not match current metadata "
                                                   "fingerprint.")
        instance["metadata"] = {"kind": "compute#metadata", "items": body.get("items") or [],
                                "fingerprint": _fingerprint()}
        op = self._operation(zone, "setMetadata", instance, done=False)
        self._finish(zone, op)
        return op

    def delete_instance(self, zone: str, name: str, request_id: str | None) -> dict:
        if (op := self._idempotent(request_id, zone)) is not None:
            return op
        instance = self.get_instance(zone, name)
        op = self._operation(zone, "delete", instance, done=False)
        if request_id:
            self.request_ids[request_id] = (zone, op["name"])
        if instance["status"] != "TERMINATED":
            instance["status"] = "STOPPING"
        self._finish(zone, op, then=lambda: self.instances[zone].pop(name, None))
        return op

    def insert_firewall(self, body: dict, request_id: str | None) -> dict:
        if (op := self._idempotent(request_id, "global")) is not None:
            return op
        name = body.get("name", "")
        if not NAME_RE.match(name):
            raise ApiError(400, "invalid", f"Invalid value for field 'resource.name': '{name}'")
        if name in self.firewalls:
            raise ApiError(409, "alreadyExists", f"The resource 'projects/{self.project}/global/firewalls/{name}' "
                                                 "already exists")
        firewall = dict(body, kind="compute#firewall", id=str(next(self.ids)),
                        selfLink=self.link("global", "firewalls", name), creationTimestamp=rfc3339(time.time()))
        self.firewalls[name] = firewall
        op = self._operation("global", "insert", firewall, done=False)
        if request_id:
            self.request_ids[request_id] = ("global", op["name"])
        self._finish("global", op)
        return op

    def get_operation(self, scope: str, name: str) -> dict:
        if scope != "global":
            self._zone(scope)
        if name not in self.operations[scope]:
            raise ApiError(404, "notFound", f"The resource '{name}' was not found")
        return self.operations[scope][name]

    def wait_operation(self, scope: str, name: str, limit: float = 10.0) -> dict:
        """Like operations.wait: back when DONE, or after a while (then the caller waits again)."""
        deadline = time.time() + limit
        op = self.get_operation(scope, name)
        while op["status"] != "DONE" and time.time() < deadline:
            self.lock.wait(timeout=max(0.0, deadline - time.time()))
        return op


def _fingerprint() -> str:
    return base64.b64encode(secrets.token_bytes(8)).decode()


def _page(items: list[dict], query: dict, kind: str) -> dict:
    start = int(query.get("pageToken", ["0"])[0] or 0)
    size = int(query.get("maxResults", ["500"])[0])
    page = {"kind": kind, "items": items[start:start + size]}
    if start + size < len(items):
        page["nextPageToken"] = str(start + size)
    return page


class _Handler(BaseHTTPRequestHandler):
    server: GceFakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        body = self._body()
        try:
            self.server.requests.append((method, url.path, query))
            if url.path == "/token" and method == "POST":
                return self._reply(200, self.server.issue_token(body))
            if not self.server.authorized(self.headers.get("Authorization", "")):
                raise ApiError(401, "authError", "Request is missing required authentication credential.")
            prefix = f"/compute/v1/projects/{state.project}/"
            if not url.path.startswith(prefix):
                raise ApiError(404, "notFound", f"The resource '{url.path}' was not found")
            parts = url.path[len(prefix):].split("/")
            request_id = query.get("requestId", [None])[0]
            with state.lock:
                result = self._route(method, parts, query, body, request_id)
                state.lock.notify_all()
            self._reply(200, result)
        except ApiError as error:
            self._reply(error.status, error.body())

    def _route(self, method: str, parts: list[str], query: dict, body: bytes, request_id: str | None) -> dict:
        state = self.server.state
        terms = parse_filter(query["filter"][0]) if query.get("filter") else []
        match method, parts:
            case "GET", ["zones", zone, "instances"]:
                state._zone(zone)
                items = [i for i in state.instances[zone].values() if matches(i, terms)]
                return _page(sorted(items, key=lambda i: i["name"]), query, "compute#instanceList")
            case "POST", ["zones", zone, "instances"]:
                return state.insert_instance(zone, json.loads(body or b"{}"), request_id)
            case "GET", ["zones", zone, "instances", name]:
                return state.get_instance(zone, name)
            case "GET", ["zones", zone, "instances", name, "serialPort"]:
                return state.serial_port_output(zone, name, int(query.get("port", ["1"])[0]),
                                                int(query.get("start", ["0"])[0]))
            case "POST", ["zones", zone, "instances", name, "setMetadata"]:
                return state.set_metadata(zone, name, json.loads(body or b"{}"), request_id)
            case "DELETE", ["zones", zone, "instances", name]:
                return state.delete_instance(zone, name, request_id)
            case "GET", ["zones", zone, "operations"]:
                state._zone(zone)
                items = [o for o in state.operations[zone].values() if matches(o, terms)]
                return _page(items, query, "compute#operationList")
            case "GET", ["zones", zone, "operations", name]:
                return state.get_operation(zone, name)
            case "POST", ["zones", zone, "operations", name, "wait"]:
                return state.wait_operation(zone, name)
            case "GET", ["global", "operations", name]:
                return state.get_operation("global", name)
            case "POST", ["global", "operations", name, "wait"]:
                return state.wait_operation("global", name)
            case "GET", ["global", "firewalls", name]:
                if name not in state.firewalls:
                    raise ApiError(404, "notFound", f"The resource 'projects/{state.project}/global/firewalls/{name}' "
                                                    "was not found")
                return state.firewalls[name]
            case "POST", ["global", "firewalls"]:
                return state.insert_firewall(json.loads(body or b"{}"), request_id)
        raise ApiError(404, "notFound", f"The resource '{'/'.join(parts)}' was not found")


class GceFakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, project: str, zones: list[str], **options):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = GceState(project, zones, base_url=self.url, **options)
        self.requests: list[tuple[str, str, dict]] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def register_service_account(self, email: str, public_key) -> None:
        self.state.service_accounts[email] = public_key

    def verified_claims(self, jwt: str) -> dict | None:
        """The claims of an unexpired RS256 JWT signed by a registered service account, else None."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            header_b64, claims_b64, signature_b64 = jwt.split(".")
            claims = json.loads(_b64(claims_b64))
            key = self.state.service_accounts[claims["iss"]]
            key.verify(_b64(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, KeyError, InvalidSignature):
            return None
        return claims if claims.get("exp", 0) > time.time() else None

    def authorized(self, header: str) -> bool:
        """An access token we issued, or a self-signed service-account JWT (what google-auth sends by default)."""
        token = header.removeprefix("Bearer ")
        if not header.startswith("Bearer ") or not token:
            return False
        if token in self.state.tokens:
            return True
        claims = self.verified_claims(token)
        return claims is not None and bool(claims.get("scope") or claims.get("aud"))

    def issue_token(self, body: bytes) -> dict:
        """OAuth 2.0 JWT-bearer grant: the assertion must be signed by a registered key, for our token URI."""
        form = parse_qs(body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or "assertion" not in form:
            raise ApiError(400, "invalid_grant", "unsupported grant")
        claims = self.verified_claims(form["assertion"][0])
        # google-auth signs for Google's token audience whatever the key file's token_uri says
        if claims is None or claims.get("aud") not in (f"{self.url}/token", GOOGLE_TOKEN_AUDIENCE):
            raise ApiError(400, "invalid_grant",
                           "Invalid JWT: unknown issuer, bad signature, wrong audience or expired")
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.state.tokens.add(token)
        return {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    def start_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(POLL_SECONDS,), name="gce-fake", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.state.stop()
        self.shutdown()
        self.server_close()


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def service_account_file(path, server: GceFakeServer, project: str) -> str:
    """A service-account key file whose token_uri is the fake's; registers its public key there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = f"spotrain-test@{project}.iam.gserviceaccount.com"
    server.register_service_account(email, key.public_key())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": project, "private_key_id": secrets.token_hex(20),
            "private_key": pem, "client_email": email, "client_id": "1", "token_uri": f"{server.url}/token"}
    path.write_text(json.dumps(info))
    return str(path)
