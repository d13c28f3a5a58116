"""Poison stops at the receiver: parts a peer sends into hivemind's all-reduce are checked before
they are averaged, and averaged results a peer sends back are checked before they are applied.

The rule (`part_verdict`, `delta_verdict`), per part of the flattened tensors:
- a part with a NaN or an infinity, or whose sum of squares overflows float32, is dropped;
- a sender's weight (hivemind lets each sender name its own) must be finite and not negative;
- a part's RMS may be at most NORM_RATIO_LIMIT times a reference: the largest of the receiver's
  own corresponding part, the receiver's whole vector this round (so a slice that is zero here,
  an embedding row this batch did not touch, still has a scale), and the median of the sender's
  recent accepted parts, which may raise the reference at most HISTORY_CAP times above the
  receiver's own (so a sender cannot ramp its scale up round after round);
- a reply from a peer that averaged one of our slices (hivemind sends `average - our part`) may
  be at most DELTA_LIMIT times that reference: an average of parts within the bound above
  differs from ours by no more than that.
A dropped part enters the average with weight 0 (the mean is over the other parts); a bad reply
is treated as hivemind treats a failed reducer: that peer's slice keeps our own values. Every
drop is counted against the sender's peer id once per all-reduce round (`offences`, shared with
the agent's status record) and logged once per round and sender.

What this relies on in hivemind 1.1.12 (checked with real peers by tests/chaos/test_poison_*.py):
- `hivemind.averaging.averager` builds each round's `AllReduceRunner` by that module-level name
  (`install_poison_guard` replaces it; averagers fork after the agent installs it);
- `AllReduceRunner.__init__` sets `tensor_part_reducer` (a `TensorPartReducer` whose
  `accumulate_part(sender_index, part_index, part, weight)` receives every part, ours included),
  `tensor_part_container` (whose `register_processed_part(peer_index, part_index, delta)` receives
  every reply and whose `_input_parts_by_peer[i][j][0]` is the part we sent to peer i),
  `parts_for_local_averaging`, `sender_peer_ids`, `ordered_peer_ids` and `peer_id`;
- an exception raised in `register_processed_part` makes `_communicate_with_peer` call
  `register_failed_reducer`, which keeps our own values for the rest of that peer's slice.

It is no Byzantine-robust aggregation: a peer inside the bound still moves the average by up to
its bounded part over the group's weight, and a receiver whose whole vector is zero (a fresh
optimizer's statistics) has no scale to compare with, so only finiteness is checked there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import averager as hivemind_averager
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import AllreduceException, TensorPartReducer

logger = logging.getLogger("spotrain.kernels.poison_guard")

# Honest peers average the same slice of the same model: gradients differ by their batches'
# noise (a peer with fewer samples is noisier, by sqrt of the sample ratio: 8x at 1 vs 64),
# parameters and optimizer statistics hardly at all. 10x leaves room for that; a poisoned part
# (the attack in ../shared/findings: NaN, or scales of 1e30) is far outside it.
NORM_RATIO_LIMIT = 10.0
# A sender whose parts are consistently larger than ours (noisier gradients) earns up to 3x more
# room from its own history, never more: history cannot be ramped up round after round.
HISTORY_CAP = 3.0
HISTORY_LENGTH = 8  # accepted parts per sender whose median is its recent scale
HISTORY_SENDERS = 64  # senders remembered per averager process (least recently seen forgotten)
# a reply is an average of accepted parts minus ours: |avg - mine| <= |avg| + |mine|
DELTA_LIMIT = NORM_RATIO_LIMIT * HISTORY_CAP + 1.0
MAX_OFFENDERS = 16  # peer ids whose offences are kept (the status record carries them)
PEER_ID_BYTES = 64  # base58 peer ids are 46 (RSA) to 52 (Ed25519) characters
DISABLE_ENV = "SPOTRAIN_POISON_GUARD"  # "0" switches the guard off: for the benchmark's baseline only


def rms(tensor: torch.Tensor) -> float:
    """Root mean square in float64 arithmetic of a float32 norm: NaN/inf when any value is, or
    when the sum of squares overflows."""
    if tensor.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(tensor.detach().float())) / math.sqrt(tensor.numel())


def _nonfinite_reason(tensor: torch.Tensor) -> str:
    return "non-finite values" if not bool(torch.isfinite(tensor).all()) else "a norm that overflows float32"


def part_verdict(part: torch.Tensor, weight: float, own_part: torch.Tensor, own_scale: float,
                 sender_recent: float | None) -> str | None:
    """Why a received part must not be averaged, or None. `own_scale`: the RMS of the receiver's
    whole vector this round; `sender_recent`: the median RMS of the sender's accepted parts."""
    if not math.isfinite(weight) or weight < 0:
        return f"weight {weight}"
    if part.shape != own_part.shape:
        return f"shape {tuple(part.shape)}, expected {tuple(own_part.shape)}"
    got = rms(part)
    if not math.isfinite(got):
        return _nonfinite_reason(part)
    own = max(rms(own_part), own_scale)
    if own == 0.0:
        return None  # nothing here to compare with (see the module's doc)
    reference = max(own, min(sender_recent or 0.0, HISTORY_CAP * own))
    if got > NORM_RATIO_LIMIT * reference:
        return f"RMS {got:.3g}, over {NORM_RATIO_LIMIT:g}x the plausible {reference:.3g}"
    return None


def delta_verdict(delta: torch.Tensor, mine: torch.Tensor, own_scale: float) -> str | None:
    """Why an averaged reply (`average - mine`) must not be applied, or None."""
    if delta.shape != mine.shape:
        return f"shape {tuple(delta.shape)}, expected {tuple(mine.shape)}"
    got = rms(delta)
    if not math.isfinite(got):
        return _nonfinite_reason(delta)
    own = max(rms(mine), own_scale)
    if own > 0.0 and got > DELTA_LIMIT * own:
        return f"RMS {got:.3g}, over {DELTA_LIMIT:g}x our {own:.3g}"
    return None


class OffenceCounter:
    """Offences per sender peer id, in shared memory: hivemind's averagers are forked processes and
    the agent's status thread reads the counts. Bounded: when full, a new offender takes the slot
    of the one with the fewest offences, so repeat offenders stay."""

    def __init__(self, slots: int = MAX_OFFENDERS) -> None:
        self._ids: Any = multiprocessing.Array(ctypes.c_char, slots * PEER_ID_BYTES, lock=False)
        self._counts = multiprocessing.Array(ctypes.c_longlong, slots, lock=False)
        self._lock = multiprocessing.Lock()
        self._slots = slots

    def add(self, peer_id: str) -> int:
        """Count one offence; the sender's count so far."""
        key = peer_id.encode()[:PEER_ID_BYTES]
        with self._lock:
            slot = next((i for i in range(self._slots) if self._id(i) == key), None)
            if slot is None:
                slot = min(range(self._slots), key=lambda i: self._counts[i])
                self._ids[slot * PEER_ID_BYTES:(slot + 1) * PEER_ID_BYTES] = key.ljust(PEER_ID_BYTES, b"\0")
                self._counts[slot] = 0
            self._counts[slot] += 1
            return int(self._counts[slot])

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {self._id(i).decode(errors="replace"): int(self._counts[i])
                    for i in range(self._slots) if self._counts[i] > 0}

    def _id(self, slot: int) -> bytes:
        return bytes(self._ids[slot * PEER_ID_BYTES:(slot + 1) * PEER_ID_BYTES]).rstrip(b"\0")


offences = OffenceCounter()


class SenderHistory:
    """The RMS of each sender's recently accepted parts, per averager process."""

    def __init__(self) -> None:
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def median(self, sender: str) -> float | None:
        recent = self._recent.get(sender)
        return statistics.median(recent) if recent else None

    def accept(self, sender: str, value: float) -> None:
        recent = self._recent.pop(sender, None) or deque(maxlen=HISTORY_LENGTH)
        recent.append(value)
        self._recent[sender] = recent
        while len(self._recent) > HISTORY_SENDERS:
            self._recent.popitem(last=False)


history = SenderHistory()


class _RoundOffences:
    """Counts and logs each offending peer once per all-reduce round."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def report(self, peer_id: str, what: str, reason: str) -> None:
        if peer_id in self._seen:
            return
        self._seen.add(peer_id)
        count = offences.add(peer_id)
        logger.warning("poison guard: dropped %s from peer %s: %s (offence %d of this peer)",
                       what, peer_id, reason, count)


class GuardedReducer(TensorPartReducer):
    """hivemind's reducer, with every part from another sender checked first (see `part_verdict`)."""

    # hivemind's own attributes, read below (its classes are not annotated)
    accumulator: torch.Tensor
    denominator: float
    current_part_index: int
    current_part_accumulated_from: int
    num_current_senders: int

    def attach(self, senders: Sequence[str], local_index: int | None, local_parts: Sequence[torch.Tensor],
               own_scale: float, round_offences: _RoundOffences) -> None:
        self.senders, self.local_index, self.local_parts = senders, local_index, local_parts
        self.own_scale, self.round_offences = own_scale, round_offences

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        if sender_index != self.local_index and 0 <= sender_index < len(self.senders) \
                and 0 <= part_index < len(self.local_parts):
            sender = self.senders[sender_index]
            reason = part_verdict(tensor_part, weight, self.local_parts[part_index], self.own_scale,
                                  history.median(sender))
            if reason is not None:
                self.round_offences.report(sender, f"part {part_index}", reason)
                # weight 0 and zeros: the mean is over the other senders' parts (NaN x 0 is NaN)
                return await super().accumulate_part(sender_index, part_index,
                                                     torch.zeros(self.part_shapes[part_index]), weight=0.0)
            history.accept(sender, rms(tensor_part))
        return await super().accumulate_part(sender_index, part_index, tensor_part, weight)

    def check_current_part_finished(self) -> None:
        # every weighted part dropped and ours of weight 0 (hivemind's tag-along): the average is
        # our own part, not 0/0
        if self.current_part_accumulated_from == self.num_current_senders and self.denominator == 0 \
                and 0 <= self.current_part_index < len(self.local_parts):
            self.accumulator.add_(self.local_parts[self.current_part_index])
            self.denominator = 1.0
        super().check_current_part_finished()


class GuardedAllReduceRunner(AllReduceRunner):
    """hivemind's AllReduceRunner whose reducer checks received parts and whose container checks
    replies (see the module's doc for the hivemind internals this relies on)."""

    tensor_part_reducer: TensorPartReducer

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        container = self.tensor_part_container
        own_scale = _vector_rms(container.local_tensors)
        round_offences = _RoundOffences()
        senders = [str(peer) for peer in self.sender_peer_ids]
        local_index = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        plain = self.tensor_part_reducer
        plain.finished.set()  # replaced before it ran: nothing to finalize, no "received 0%" warning
        reducer = GuardedReducer(plain.part_shapes, plain.num_senders)
        reducer.attach(senders, local_index, self.parts_for_local_averaging, own_scale, round_offences)
        self.tensor_part_reducer = reducer
        container.register_processed_part = _checked_replies(
            container, self.ordered_peer_ids.index(self.peer_id), [str(p) for p in self.ordered_peer_ids],
            own_scale, round_offences)


def _checked_replies(container: Any, own_index: int, peers: Sequence[str], own_scale: float,
                     round_offences: _RoundOffences) -> Callable[[int, int, torch.Tensor], None]:
    register = container.register_processed_part

    def register_checked(peer_index: int, part_index: int, delta: torch.Tensor) -> None:
        sent = container._input_parts_by_peer[peer_index]
        if peer_index != own_index and 0 <= part_index < len(sent):  # hivemind refuses other indices itself
            mine = sent[part_index][0]
            reason = delta_verdict(delta, mine, own_scale)
            if reason is not None:
                round_offences.report(peers[peer_index], f"averaged part {part_index}", reason)
                # hivemind then keeps our own values for the rest of this peer's slice
                raise AllreduceException(f"poison guard: averaged part from {peers[peer_index]}: {reason}")
        register(peer_index, part_index, delta)

    return register_checked


def _vector_rms(tensors: Sequence[torch.Tensor]) -> float:
    total = sum(float(torch.linalg.vector_norm(t.detach().float())) ** 2 for t in tensors)
    count = sum(t.numel() for t in tensors)
    return math.sqrt(total / count) if count and math.isfinite(total) else 0.0


def guard_enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def install_poison_guard() -> bool:
    """Make every all-reduce of this process (and of averagers it forks later) guarded; whether it
    is (SPOTRAIN_POISON_GUARD=0 leaves hivemind as it comes, for the benchmark's baseline)."""
    if not guard_enabled():
        hivemind_averager.AllReduceRunner = AllReduceRunner  # type: ignore[misc]
        return False
    hivemind_averager.AllReduceRunner = GuardedAllReduceRunner  # type: ignore[misc]
    return True
