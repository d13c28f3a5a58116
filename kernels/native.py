"""The fused CPU path: `native_blockwise.c`, compiled on first use with the machine's C compiler.

The torch reference in `blockwise.py` makes about ten passes over every chunk; the C file makes
two per block, the second from L1, so a codec runs at memory speed. It is built for this CPU
(-march=native) into a per-user cache, keyed by the source, the flags, the compiler and the
CPU's feature flags, so a home directory shared between machines never loads a foreign build.
No compiler, a failed build or SPOTRAIN_NATIVE_KERNELS=0: `load()` returns None and the torch
reference serves; the formats are identical, so peers on either path decode each other.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger("spotrain.kernels")

SOURCE = Path(__file__).with_name("native_blockwise.c")
# -ffp-contract=off: the residual's codes * scale is rounded before the subtraction, as in the
# torch reference; the one fused multiply-add the rounding needs is written out (fmaf)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread")
HUGE_PAGES_FROM_BYTES = 8 << 20  # smaller buffers hold too few whole 2 MiB pages to be worth a syscall
DISABLE_ENV = "SPOTRAIN_NATIVE_KERNELS"

_F32 = ctypes.POINTER(ctypes.c_float)
_U8 = ctypes.POINTER(ctypes.c_uint8)

# A bytes object created without contents and filled before anyone else sees it: how CPython's
# own C code builds bytes. The payload then leaves the kernel as the bytes hivemind's protobuf
# message needs, instead of being assembled by a copy of the codes.
_unfilled_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_unfilled_bytes.restype = ctypes.py_object
_unfilled_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = [ctypes.py_object]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spotrain" / "kernels"


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled library, built if needed; None where it cannot be had."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: blockwise codecs use the torch reference path")
        return None
    try:
        library = _build(compiler)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("building %s failed, blockwise codecs use the torch reference path: %s", SOURCE.name,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
    return _bind(ctypes.CDLL(str(library)))


def available() -> bool:
    return load() is not None


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256(b"\0".join(part.encode() for part in (
        SOURCE.read_text(), " ".join(FLAGS), compiler, version, platform.machine(), _cpu_flags()))).hexdigest()[:16]
    target = cache_dir() / f"native_blockwise-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: agents starting together never load a half-written file
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], check=False, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise OSError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[:500]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    library.spotrain_quantize.restype = ctypes.c_int64
    library.spotrain_quantize.argtypes = [_F32, _F32, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, _U8, _F32,
                                          ctypes.c_int]
    library.spotrain_dequantize.restype = None
    library.spotrain_dequantize.argtypes = [_U8, _F32, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, _F32,
                                            ctypes.c_int]
    library.spotrain_advise_huge_pages.restype = None
    library.spotrain_advise_huge_pages.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return library


def _pointer(tensor: torch.Tensor, kind):
    return ctypes.cast(tensor.data_ptr(), kind)


def fresh(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor; a large one is backed by huge pages where the kernel allows."""
    tensor = torch.empty(numel, dtype=dtype)
    library = load()
    if library is not None:
        _advise_huge_pages(library, tensor.data_ptr(), numel * tensor.element_size())
    return tensor


def _advise_huge_pages(library: ctypes.CDLL, address: int, nbytes: int) -> None:
    if nbytes >= HUGE_PAGES_FROM_BYTES:
        library.spotrain_advise_huge_pages(address, nbytes)


def _library_for(flat: torch.Tensor) -> ctypes.CDLL | None:
    """The library, where it can quantize `flat`: a contiguous float32 CPU tensor."""
    library = load()
    if library is None or flat.device.type != "cpu" or flat.dtype != torch.float32 or not flat.is_contiguous():
        return None
    return library


def _quantize_into(library: ctypes.CDLL, flat: torch.Tensor, bits: int, block_size: int,
                   residual: torch.Tensor | None, codes, absmax) -> int:
    return library.spotrain_quantize(
        _pointer(flat, _F32), None if residual is None else _pointer(residual, _F32), flat.numel(), bits, block_size,
        codes, absmax, torch.get_num_threads())


def quantize(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None,
             codes: torch.Tensor, absmax: torch.Tensor) -> int | None:
    """Fill `codes` and `absmax` from a contiguous float32 CPU tensor; the count of non-finite
    inputs, or None where this path does not apply (the caller then uses the reference)."""
    library = _library_for(flat)
    if library is None:
        return None
    return _quantize_into(library, flat, bits, block_size, residual, _pointer(codes, _U8), _pointer(absmax, _F32))


def quantize_to_bytes(flat: torch.Tensor, bits: int, block_size: int, residual: torch.Tensor | None,
                      header: bytes, blocks: int, code_bytes: int) -> tuple[bytes, int] | None:
    """`header | absmax | codes` as one new bytes object, the kernel writing straight into it,
    and the count of non-finite inputs; None where this path does not apply."""
    library = _library_for(flat)
    if library is None:
        return None
    if len(header) < 2:
        raise ValueError("a payload needs its header: CPython shares its 0- and 1-byte objects, never fill those")
    payload = _unfilled_bytes(None, len(header) + 4 * blocks + code_bytes)
    address = _bytes_address(payload)
    _advise_huge_pages(library, address, len(payload))
    ctypes.memmove(address, header, len(header))
    absmax = ctypes.cast(address + len(header), _F32)  # 4-byte aligned: bytes data is 8-aligned, the header 20 bytes
    codes = ctypes.cast(address + len(header) + 4 * blocks, _U8)
    return payload, _quantize_into(library, flat, bits, block_size, residual, codes, absmax)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, numel: int, bits: int, block_size: int,
               out: torch.Tensor) -> bool:
    """Decode into `out` (float32, contiguous); False where this path does not apply."""
    library = load()
    if library is None or out.dtype != torch.float32 or not out.is_contiguous() or not codes.is_contiguous() \
            or absmax.dtype != torch.float32 or not absmax.is_contiguous():
        return False
    library.spotrain_dequantize(_pointer(codes, _U8), _pointer(absmax, _F32), numel, bits, block_size,
                                _pointer(out, _F32), torch.get_num_threads())
    return True
