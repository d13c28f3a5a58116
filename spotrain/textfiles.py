"""Read a text file a user named (a spec, a trace) without hanging, tracebacks or surprises."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnreadableText(Exception):
    """Why the file is no usable text, in a few words (the caller adds the path)."""


def read_user_text(path: Path, limit_bytes: int) -> str:
    """The file's UTF-8 text (a leading BOM dropped), or UnreadableText.

    Opened non-blocking so a FIFO cannot hang us, and checked on the open descriptor, so what is
    judged is what is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UnreadableText(f"cannot read: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableText("cannot read: Is a directory")
        if not stat.S_ISREG(mode):
            raise UnreadableText("not a regular file (a FIFO, socket or device)")
        data = _read_up_to(fd, limit_bytes + 1)
    except OSError as error:
        raise UnreadableText(f"cannot read: {error.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit_bytes:
        raise UnreadableText(f"larger than {limit_bytes:,} bytes")
    nul = data.find(b"\0")
    if nul >= 0:
        raise UnreadableText(f"a binary file, not text (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UnreadableText(f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None


def _read_up_to(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
