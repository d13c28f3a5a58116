"""The poison guard's rule and its bookkeeping, without peers (tests/chaos/test_poison_allreduce.py
runs it inside hivemind's all-reduce)."""

import math

import torch

from spotrain.kernels.poison_guard import (
    DELTA_LIMIT,
    HISTORY_CAP,
    HISTORY_LENGTH,
    NORM_RATIO_LIMIT,
    OffenceCounter,
    SenderHistory,
    delta_verdict,
    part_verdict,
)


def gaussian(n: int = 4096, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def test_a_part_is_dropped_when_non_finite_overflowing_weighted_wrongly_or_far_too_large():
    own = gaussian()
    assert part_verdict(gaussian(seed=1, scale=5.0), 1.0, own, 1.0, None) is None  # 5x: noise, kept
    nan = gaussian(seed=1)
    nan[7] = math.nan
    assert part_verdict(nan, 1.0, own, 1.0, None) == "non-finite values"
    assert part_verdict(torch.full((4096,), 1e30), 1.0, own, 1.0, None) == "a norm that overflows float32"
    assert part_verdict(gaussian(seed=1), math.inf, own, 1.0, None) == "weight inf"
    assert part_verdict(gaussian(seed=1), -1.0, own, 1.0, None) == "weight -1.0"
    assert "over 10x" in part_verdict(gaussian(seed=1, scale=11.0), 1.0, own, 1.0, None)
    assert part_verdict(gaussian(seed=1, n=10), 1.0, own, 1.0, None) == "shape (10,), expected (4096,)"


def test_the_reference_is_the_largest_of_our_part_our_vector_and_the_senders_capped_history():
    zero = torch.zeros(4096)
    # our slice is all zero (an untouched embedding row): the round's scale stands in
    assert part_verdict(gaussian(scale=9.0), 1.0, zero, 1.0, None) is None
    assert part_verdict(gaussian(scale=11.0), 1.0, zero, 1.0, None) is not None
    # a sender whose parts have been 3x ours earns that room; a ramp beyond the cap does not
    assert part_verdict(gaussian(scale=22.0), 1.0, gaussian(seed=1), 0.0, 2.5) is None
    capped = HISTORY_CAP * NORM_RATIO_LIMIT
    assert part_verdict(gaussian(scale=capped * 1.1), 1.0, gaussian(seed=1), 0.0, 1e6) is not None
    # nothing here to compare with: only finiteness is checked
    assert part_verdict(gaussian(scale=1e6), 1.0, zero, 0.0, None) is None


def test_a_reply_is_dropped_when_non_finite_or_beyond_what_any_accepted_average_could_be():
    mine = gaussian()
    assert delta_verdict(gaussian(seed=1, scale=DELTA_LIMIT * 0.9), mine, 0.0) is None
    assert "over 31x" in delta_verdict(gaussian(seed=1, scale=DELTA_LIMIT * 1.1), mine, 0.0)
    assert delta_verdict(torch.full((4096,), math.inf), mine, 0.0) == "non-finite values"


def test_offences_are_bounded_and_repeat_offenders_keep_their_slot():
    counter = OffenceCounter(slots=2)
    assert [counter.add("QmEvil") for _ in range(3)] == [1, 2, 3]
    counter.add("QmOnce")
    counter.add("QmNew")  # full: takes the slot of the one with the fewest offences
    assert counter.snapshot() == {"QmEvil": 3, "QmNew": 1}
    assert OffenceCounter().add("Qm" + "x" * 100) == 1  # a long id is cut to the slot, not refused


def test_the_history_keeps_the_recent_parts_of_the_recently_seen_senders():
    history = SenderHistory()
    for value in range(HISTORY_LENGTH + 4):
        history.accept("QmA", float(value))
    assert history.median("QmA") == (4 + 11) / 2 and history.median("QmB") is None
