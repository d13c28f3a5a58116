"""A stranger to a running local cluster, run as its own process by test_attacks.py:

    python tests/chaos/stranger.py HOME CLUSTER OUT.json AVERAGE_SECONDS

It knows every address (it reads every swarm-addresses.json and peers file under HOME; addresses
are not secrets, so it is given them even where the folder is closed to it) and every instance id,
and it holds its own libp2p identity and RSA key: the same spotrain and hivemind the agents run,
nothing the controller issued. It tries, in order, and writes what it got to OUT.json:
- which files under HOME another local user could read (mode bits along the whole path);
- DHT reads of every record the cluster keeps (status, duty, admission, hivemind's progress and
  averager keys), and DHT stores of forged ones (a draining status with a future time, epoch 10^6,
  a foreign codec table, an empty duty list, its own duty and admission records);
- direct calls to every agent's averagers (join a gradient averaging group, download the state);
- AVERAGE_SECONDS of a real hivemind Optimizer on the cluster's run_id whose every gradient is NaN.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from spotrain.contracts.admission import admission_key, sign_record
from spotrain.contracts.records import AgentStatus, duty_key, status_key
from spotrain.contracts.states import AgentState
from spotrain.examples import tiny_gpt
from spotrain.kernels import SwarmOptimizer, install_codecs, optimizer_options

CALL_TIMEOUT = 20.0


def world_readable(home: Path) -> list[str]:
    """Files under `home` that a user other than the owner (and not in its group) could read."""
    found = []
    for folder, dirs, files in os.walk(home):
        path = Path(folder)
        if not all(_other_may(p, stat.S_IXOTH) for p in [path, *path.relative_to(home).parents]
                   if (home / p).is_dir()):
            dirs[:] = []
            continue
        found += [str((path / f).relative_to(home)) for f in files if _other_may(path / f, stat.S_IROTH)]
    return sorted(found)


def _other_may(path: Path, bit: int) -> bool:
    try:
        return bool(os.stat(path).st_mode & bit)
    except OSError:
        return False


def known_addresses(home: Path) -> list[str]:
    addresses: set[str] = set()
    for path in [*home.rglob("swarm-addresses.json"), *home.rglob("peers")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        try:
            addresses.update(json.loads(text))
        except ValueError:
            addresses.update(text.split())
    return sorted(a for a in addresses if "/p2p/" in a)


def forged_status(instance_id: str, **changes: Any) -> dict[str, Any]:
    fields = dict(instance_id=instance_id, state=AgentState.TRAINING, epoch=10**6, samples=10**12,
                  samples_per_second=1e6, loss=0.1, bytes_sent=0, bytes_received=0, checkpoint_epoch=10**6,
                  addresses=(), time=time.time() + 3600)
    return AgentStatus(**{**fields, **changes}).to_record()


def dht_attack(dht: hivemind.DHT, cluster: str, instances: list[str], marker: bytes,
               key: RSAPrivateKey) -> dict[str, Any]:
    keys = [status_key(cluster), duty_key(cluster), admission_key(cluster), f"{cluster}_progress",
            f"{cluster}_grad_averager.all_averagers", f"{cluster}_state_averager.all_averagers"]
    got = {k: _value(dht.get(k, latest=True, return_future=True).result(CALL_TIMEOUT)) for k in keys}
    later = get_dht_time() + 600
    stores = []
    for instance in instances:
        stores.append(("draining " + instance, status_key(cluster),
                       forged_status(instance, state=AgentState.DRAINING, epoch=3), instance.encode() + marker))
        stores.append(("epoch " + instance, status_key(cluster), forged_status(instance), instance.encode() + marker))
    stores.append(("codec table", status_key(cluster), forged_status("i-stranger", codec_table="evil"),
                   b"i-stranger" + marker))
    stores.append(("empty duty", duty_key(cluster), [], None))
    body = {"cluster": cluster, "holders": [], "issued": time.time(), "expires": time.time() + 600}
    stores.append(("own duty", duty_key(cluster), sign_record("duty", body, key._private_key), marker))
    stores.append(("own admission", admission_key(cluster),
                   sign_record("admission", {"cluster": cluster, "peers": {}}, key._private_key), marker))
    stored = {}
    for what, dht_key, value, subkey in stores:
        future = dht.store(dht_key, value, later, subkey=subkey, return_future=True)
        stored[what] = bool(future.result(CALL_TIMEOUT))
    return {"got": got, "stored": stored}


def _value(found: Any) -> Any:
    if found is None:
        return None
    value = found.value
    return sorted(map(repr, value)) if isinstance(value, dict) else repr(value)[:200]


async def _rpc(optimizer: SwarmOptimizer, peers: list[str], dht: hivemind.DHT) -> dict[str, Any]:
    """Call every agent's averagers directly: join a gradient group, download the training state."""
    p2p = await dht.replicate_p2p()
    results: dict[str, Any] = {}
    for peer in peers:
        peer_id = PeerID.from_base58(peer)
        grad, state = optimizer.grad_averager, optimizer.state_averager
        join = grad.get_stub(p2p, peer_id, namespace=grad.prefix)
        download = state.get_stub(p2p, peer_id, namespace=state.prefix)
        gather = grad.serializer.dumps([1.0, grad.mode.value, grad.serializer.dumps(None)])
        request = averaging_pb2.JoinRequest(schema_hash=grad.schema_hash, expiration=get_dht_time() + 30,
                                            client_mode=False, gather=gather,
                                            group_key=f"{grad.prefix}.0b{grad.get_group_bits()}")
        results[peer] = {"join": await _collect(join.rpc_join_group(request)),
                         "download": await _collect(download.rpc_download_state(averaging_pb2.DownloadRequest()))}
    return results


async def _collect(call: Any) -> str:
    try:
        answers = [message async for message in await asyncio.wait_for(call, CALL_TIMEOUT)]
    except Exception as error:  # the gate's refusal reaches the caller as an error
        return f"refused: {type(error).__name__}"
    return f"answered {len(answers)} message(s)" if answers else "nothing"


def average_nan(optimizer: SwarmOptimizer, model: torch.nn.Module, seconds: float) -> dict[str, Any]:
    """Step with NaN gradients; what the stranger saw of the swarm meanwhile."""
    steps, peers_seen, deadline = 0, 0, time.time() + seconds
    while time.time() < deadline:
        for parameter in model.parameters():
            parameter.grad = torch.full_like(parameter, math.nan)
        optimizer.step()
        steps += 1
        peers_seen = max(peers_seen, optimizer.tracker.global_progress.num_peers)
        time.sleep(0.05)
    return {"steps": steps, "max_peers_seen": peers_seen, "local_epoch": optimizer.local_epoch,
            "global_epoch": optimizer.tracker.global_epoch}


def main(home: Path, cluster: str, out: Path, average_seconds: float) -> int:
    started = time.time()
    install_codecs()
    report: dict[str, Any] = {"readable": world_readable(home)}
    addresses = known_addresses(home)
    instances = sorted(p.name for p in (home / "local-cloud" / "vms").iterdir())
    agents = sorted({a.rsplit("/p2p/", 1)[1] for vm in instances
                     for a in known_addresses(home / "local-cloud" / "vms" / vm / "work")})
    report.update(addresses=addresses, instances=instances, agents=agents)
    key = RSAPrivateKey()
    validator = RSASignatureValidator(key)
    dht = hivemind.DHT(initial_peers=addresses, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[validator],
                       ensure_bootstrap_success=False, start=True)
    report["seconds"] = {"bootstrap": round(time.time() - started, 1)}
    try:
        report["dht"] = dht_attack(dht, cluster, instances, validator.local_public_key, key)
        model = tiny_gpt.build_model()
        optimizer = SwarmOptimizer(dht=dht, run_id=cluster, params=model.parameters(),
                                   optimizer=tiny_gpt.make_optimizer, batch_size_per_step=8, target_batch_size=64,
                                   **optimizer_options("float16", "none"), matchmaking_time=2.0,
                                   averaging_timeout=15.0, verbose=False)
        report["seconds"]["dht"] = round(time.time() - started, 1)
        report["rpc"] = asyncio.run(_rpc(optimizer, agents, dht))
        report["load_state"] = repr(optimizer.state_averager.load_state_from_peers(timeout=CALL_TIMEOUT))[:200]
        report["seconds"]["rpc"] = round(time.time() - started, 1)
        report["average"] = average_nan(optimizer, model, average_seconds)
        optimizer.shutdown()
    finally:
        out.write_text(json.dumps(report, indent=1))
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])))
