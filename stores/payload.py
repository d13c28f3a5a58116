"""A checkpoint's payload: plain state dicts saved with torch.save and loaded with
`torch.load(weights_only=True)`, whose unpickler builds only tensors, numbers, strings and
containers. Loading never runs code a file carries, and a state with a NaN or an infinity is
neither written nor loaded (one bad peer's state must not become everyone's restart point). The
one exception: tensors the caller declares constant, a model's buffers such as an additive
attention mask (-inf above the diagonal), may hold infinities; a NaN is refused everywhere.

One file per top-level part of the state (`model.pt`, `optimizer.pt`): a reader sees which part
failed, and a hivemind optimizer's state_dict (torch's, plus `local_epoch`) loads as it is.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from spotrain.stores.base import SAFE_NAME, CorruptCheckpoint, NonFiniteState, UnsafePayload

SUFFIX = ".pt"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Whether the tensor at a dotted path ("model.mask") is a constant that may hold infinities.
Constants = Callable[[str, torch.Tensor], bool]


def no_constants(path: str, tensor: torch.Tensor) -> bool:
    return False


def named_constants(paths: Iterable[str]) -> Constants:
    """The tensors at exactly these paths: for a model, `f"model.{name}"` of its named_buffers()."""
    names = frozenset(paths)
    return lambda path, tensor: path in names


def encode_state(state: Mapping[str, Any], constants: Constants = no_constants) -> dict[str, bytes]:
    """`{"model": ..., "optimizer": ...}` as the files `model.pt`, `optimizer.pt`."""
    files = {}
    for part, value in state.items():
        name = f"{part}{SUFFIX}"
        if not SAFE_NAME.match(name):
            raise ValueError(f"state part {part!r} is not a safe file name")
        check_finite(value, part, constants)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        files[name] = buffer.getvalue()
    return files


def decode_state(files: Mapping[str, bytes], constants: Constants = no_constants) -> dict[str, Any]:
    """The state the files hold; UnsafePayload for anything that would need code to load,
    NonFiniteState for a NaN, or an infinity outside the constants."""
    state = {}
    for name, data in files.items():
        if not name.endswith(SUFFIX):
            raise CorruptCheckpoint(f"{name}: not a state file")
        part = name[: -len(SUFFIX)]
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafePayload(f"{name}: refused by the weights-only loader: {_refusal(error)}") from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise CorruptCheckpoint(f"{name}: unreadable: {_first_line(error)}") from None
        check_finite(value, part, constants)
        state[part] = value
    return state


def check_finite(value: Any, where: str, constants: Constants = no_constants) -> None:
    """Raise NonFiniteState at the first NaN inside `value`, or the first infinity outside the
    constants (in a float, or a floating tensor)."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all()):
            return
        if bool(torch.isnan(value).any()):
            raise NonFiniteState(f"{where}: non-finite values (NaN)")
        if not constants(where, value):
            raise NonFiniteState(f"{where}: non-finite values (infinity)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise NonFiniteState(f"{where}: {value}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_finite(item, f"{where}.{key}", constants)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_finite(item, f"{where}[{index}]", constants)


def _refusal(error: BaseException) -> str:
    """What the file would have needed: torch's message is a page of advice (with terminal escapes)
    whose useful part is the global the pickle names; the operator must not be told to load it anyway."""
    found = _UNSUPPORTED_GLOBAL.search(str(error))
    if found is not None:
        return f"it names {found.group(1)}, which is code, not data"
    return _ANSI.sub("", _first_line(error))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
