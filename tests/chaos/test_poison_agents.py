"""Chaos with real agents: an admitted agent turns malicious; a malicious checkpoint waits in the store.

Invariants: honest agents never step on a non-finite loss and keep training, every checkpoint
written is finite, the malicious peer is counted in the honest agents' status records (and the
controller's rule picks it for revocation), and a checkpoint that would run code or holds NaN
is refused with a line naming it, without running anything (even one an admitted peer sealed).
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
import torch
from conftest import admit, start_agent, wait_for

from spotrain.access import ClusterAccess
from spotrain.offenders import instances_to_revoke, peer_ids_of
from spotrain.stores import ANY_WRITER, ManifestSigner, ReplicatedStore, encode_state, named_constants
from spotrain.stores.local import LocalDirStore
from spotrain.swarm_view import SwarmView

TESTS = Path(__file__).resolve().parent.parent


def agent_config(cluster: str, instance_id: str, peers: list[str], store: Path, task: str,
                 admission: dict) -> dict:
    return {
        "admission": admission, "cluster": cluster, "instance_id": instance_id, "initial_peers": peers, "task": task,
        # raw tensors on the wire: blockwise codecs would turn a NaN into 0 before sending it
        "training": {"batch_size": 8, "target_batch_size": 64, "compression": {"gradients": "none", "state": "none"},
                     "matchmaking_time": 2.0, "averaging_timeout": 15.0, "delayed_updates": True},
        "checkpoint": {"store": str(store), "every_epochs": 2}, "torch_threads": 1,
    }






@pytest.mark.slow
def test_an_admitted_agent_that_averages_nan_and_huge_parts_is_dropped_and_counted(tmp_path, agents):
    cluster, store = "poison-test", tmp_path / "ckpt"
    swarm = SwarmView(cluster, ClusterAccess(tmp_path / "cluster", cluster))
    admitted = admit(swarm, ["i-a", "i-b", "i-evil"])  # the attacker is one of the cluster's own instances
    try:
        peers = swarm.addresses()
        honest = "spotrain.examples.tiny_gpt:task"
        for name in ("i-a", "i-b"):
            agents.append(start_agent(tmp_path, agent_config(cluster, name, peers, store, honest, admitted[name])))
        swarm.assign_duty(["i-a"])
        wait_for(lambda: all(s.epoch >= 1 for s in swarm.statuses().values()) and len(swarm.statuses()) == 2, 240,
                 "two honest agents training")
        agents.append(start_agent(tmp_path, agent_config(cluster, "i-evil", swarm.addresses(), store,
                                                         "chaos.evil_task:task", admitted["i-evil"])))

        def counted():
            statuses = swarm.statuses()
            swarm.assign_duty(["i-a"])
            return "i-evil" in statuses and instances_to_revoke(statuses, threshold=2) == ["i-evil"] and statuses
        statuses = wait_for(counted, 300, "both honest agents counting i-evil twice")
        evil = peer_ids_of(statuses["i-evil"])
        epoch = max(statuses["i-a"].epoch, statuses["i-b"].epoch)
        statuses = wait_for(lambda: (s := swarm.statuses()) and min(s["i-a"].epoch, s["i-b"].epoch) >= epoch + 2 and s,
                            240, "the honest agents training on")
        for name in ("i-a", "i-b"):
            assert statuses[name].loss is not None and math.isfinite(statuses[name].loss) and statuses[name].loss < 10
            assert evil & set(statuses[name].offenders)
            log = (tmp_path / name / "agent.log").read_text()
            assert "non-finite loss" not in log  # nothing poisoned reached their parameters
            # a part it sent us, or a reply carrying its average of our part: either is its poison dropped
            assert any(("poison guard: dropped part" in line or "poison guard: dropped averaged part" in line)
                       and peer in line
                       for line in log.splitlines() for peer in evil)
        from spotrain.examples import tiny_gpt

        buffers = named_constants(f"model.{n}" for n, _ in tiny_gpt.task.build_model().named_buffers())
        # checks every tensor finite
        checkpoint = ReplicatedStore.from_urls([str(store)], trust=ANY_WRITER).load_newest(buffers)
        assert checkpoint is not None and checkpoint.epoch >= 2
        assert all(p.poll() is None for p in agents[:2])
    finally:
        swarm.shutdown()


def armed_payload(marker: Path) -> bytes:
    """A torch.save file whose unpickling would create `marker` (run code)."""
    import io

    class Armed:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2), "hook": Armed()}, buffer)
    return buffer.getvalue()


@pytest.mark.slow  # a whole agent; the same refusals run in the default suite in tests/test_store_backends.py
def test_a_malicious_checkpoint_is_refused_with_a_line_and_the_agent_starts_without_it(tmp_path, agents):
    from spotrain.examples import tiny_gpt

    cluster, store, marker = "bad-ckpt-test", tmp_path / "ckpt", tmp_path / "pwned"
    model = tiny_gpt.task.build_model()
    poisoned = {name: value.clone() for name, value in model.state_dict().items()}
    name = next(n for n, v in poisoned.items() if v.is_floating_point() and v.numel() > 1 and "mask" not in n)
    poisoned[name].view(-1)[0] = float("nan")
    buffers = named_constants(f"model.{n}" for n, _ in model.named_buffers())  # the -inf attention mask
    files = encode_state({"model": model.state_dict(), "optimizer": {}}, buffers)
    files["model.pt"] = _saved(poisoned)  # written past the writer's check, with a valid manifest
    swarm = SwarmView(cluster, ClusterAccess(tmp_path / "cluster", cluster))
    admitted = admit(swarm, ["i-a", "i-evil"])
    # sealed by an admitted instance turned malicious: the seal is believed, so the payload checks decide
    evil = admitted["i-evil"]
    sealed_by = ManifestSigner.from_identity(base64.b64decode(evil["identity"]), lambda: evil["record"])
    target = LocalDirStore.from_url(str(store))
    target.write(7, files, "intruder", sealed_by)
    target.write(8, {"model.pt": armed_payload(marker), "optimizer.pt": files["optimizer.pt"]}, "intruder", sealed_by)
    try:
        agents.append(start_agent(tmp_path, agent_config(cluster, "i-a", swarm.addresses(), store,
                                                         "spotrain.examples.tiny_gpt:task", admitted["i-a"])))
        wait_for(lambda: (s := swarm.statuses().get("i-a")) and s.state == "training", 180, "the agent training")
    finally:
        swarm.shutdown()
    log = (tmp_path / "i-a" / "agent.log").read_text()
    assert "skipping checkpoint ckpt-00000008-intruder" in log and "refused by the weights-only loader" in log
    assert "skipping checkpoint ckpt-00000007-intruder" in log and f"model.{name}: non-finite values (NaN)" in log
    assert "resumed from checkpoint" not in log
    assert not marker.exists()


def _saved(value: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
