"""Small file helpers shared by the data loader, checkpoints and the shipped feature network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from diffuse.errors import UserError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk, so a rename after it publishes whole data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_limited(path: Path, limit: int, what: str) -> str:
    """The UTF-8 text of a file that may hold at most `limit` bytes; no more is ever read, so a huge
    file or a device such as /dev/zero is refused at once instead of filling the memory."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{path} is over {limit >> 10} KiB, more than any {what} needs; give the right file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text, so it is no {what}; give the right file.") from None


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, Fortran order, dtype, data offset) from the start of a .npy stream, or None where it has no
    readable header; nothing past the header is read, so a header that lies costs no memory."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return tuple(shape), fortran, dtype, f.tell()
    except (ValueError, SyntaxError, TypeError, OSError, EOFError):  # numpy's kinds of complaint on a broken header
        return None
