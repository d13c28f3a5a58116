"""The codec table: spec names, bit widths and block sizes (pure Python: the report reads it too).

Anything here is part of the codec-table fingerprint peers compare at join, so changing a value
is a wire change: bump `wire.WIRE_VERSION` with it.
"""

from __future__ import annotations

SPEC_CODECS = ("none", "float16", "uniform8", "blockwise8", "blockwise4", "powersgd:RANK")
ACTIVATION_CODECS = SPEC_CODECS[:-1]  # a low-rank factorization fits weight gradients, not activations
BLOCK_SIZES = {8: 1024, 4: 256}  # default values per block of blockwise8 / blockwise4
RAW_BELOW = 16  # tensors smaller than this travel raw (a step counter must stay exact)
SLOTS = {8: "BLOCKWISE_8BIT", 4: "QUANTILE_8BIT"}  # the hivemind enum slots our envelopes take
_FIXED_RATIOS = {"none": 1.0, "float16": 2.0, "uniform8": 4.0}  # fp32 bytes per wire byte


def powersgd_rank(name: str) -> int | None:
    """RANK of a `powersgd:RANK` name; None for any other name."""
    prefix, sep, rank = name.partition(":")
    if prefix != "powersgd" or not sep:
        return None
    if not rank.isdigit() or int(rank) < 1:
        raise ValueError(f"powersgd needs a positive integer rank, got {name!r}")
    return int(rank)


def validate_codec_name(name: str) -> str:
    if name in SPEC_CODECS[:-1] or powersgd_rank(name) is not None:
        return name
    raise ValueError(f"unknown codec {name!r}; valid: {', '.join(SPEC_CODECS)}")


def blockwise_bits_per_value(bits: int, block_size: int | None = None) -> float:
    """Code bits plus each value's share of its block's fp32 scale."""
    return bits + 32 / (block_size or BLOCK_SIZES[bits])


def nominal_ratio(name: str) -> float | None:
    """fp32 bytes per wire byte on a large fp32 tensor; None where it depends on the model (PowerSGD)."""
    validate_codec_name(name)
    if name in _FIXED_RATIOS:
        return _FIXED_RATIOS[name]
    if name in ("blockwise8", "blockwise4"):
        return 32 / blockwise_bits_per_value(int(name[-1]))
    return None
