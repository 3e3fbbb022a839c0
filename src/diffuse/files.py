"""Small file helpers shared by the data loader, checkpoints and the shipped feature network; the one
sentence of a failed write (`failure`, `writing`), a check before long work (`check_writable`), and
JSON read from untrusted files (`read_json`)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import tokenize
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

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


# What numpy (and zipfile under np.load) raise on a broken .npy or .npz: a flipped byte in a header can
# end its literal early (tokenize.TokenError), make it no literal (SyntaxError, ValueError) or the
# wrong kind of one (TypeError); zipfile raises NotImplementedError for a member packed with a
# compression method it lacks (deflate64, for one) and LargeZipFile for ZIP64 it was not allowed.
NPY_BROKEN = (ValueError, SyntaxError, TypeError, tokenize.TokenError, OSError, EOFError, zipfile.BadZipFile,
              zipfile.LargeZipFile, NotImplementedError)


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, data offset) from the start of a .npy stream, raising one of NPY_BROKEN
    where it has no readable header; nothing past the header is read, so a header that lies costs no memory."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype, f.tell()


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """`npy_header`, or None where the stream has no readable header."""
    try:
        return npy_header(f)
    except NPY_BROKEN:
        return None


# .npy arrays larger than memory, read and written with plain reads and writes. A memory map's touched
# pages count as the process's resident memory, so mapping a file of several GB and walking it grows
# the process towards the file's size; these keep it at one chunk.
CHUNK_BYTES = 16 << 20


def read_chunks(f, shape: tuple[int, ...], dtype: np.dtype, chunk_bytes: int = CHUNK_BYTES):
    """The rows of the C-ordered array (shape, dtype) whose data starts at f's position, as arrays of about
    chunk_bytes each; EOFError where the stream ends early."""
    row = math.prod(shape[1:]) * dtype.itemsize
    step = max(1, chunk_bytes // max(row, 1))
    for start in range(0, shape[0], step):
        k = min(step, shape[0] - start)
        buf = f.read(k * row)
        if len(buf) != k * row:
            raise EOFError(f"{k * row} bytes wanted, {len(buf)} left")
        yield np.frombuffer(buf, dtype).reshape((k, *shape[1:]))


def npy_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES):
    """The rows of a .npy file that diffuse wrote itself (so its header is trusted), chunk by chunk."""
    with open(path, "rb") as f:
        shape, _, dtype, _ = read_npy_header(f)
        yield from read_chunks(f, shape, dtype, chunk_bytes)


def npy_header_bytes(shape: tuple[int, ...], dtype: np.dtype, size: int = 0) -> bytes:
    """A version 1.0 .npy header of a C-ordered array, padded with spaces to `size` bytes if it is shorter
    (the header of fewer rows can so replace the one a file was opened with)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    head = buf.getvalue()  # magic (6), version (2), text length (2, little-endian), text ending in a newline
    if len(head) < size:
        text = head[10:-1] + b" " * (size - len(head)) + b"\n"
        head = head[:8] + struct.pack("<H", len(text)) + text
    return head


class NpyRows:
    """A .npy file written a row at a time, for at most n rows: `append(row)`, and on leaving the `with`
    the header is rewritten with the number appended, so rows left out (unreadable images) cost no copy."""

    def __init__(self, path: Path, n: int, row_shape: tuple[int, ...], dtype=np.uint8):
        self.row_shape, self.dtype, self.count = tuple(row_shape), np.dtype(dtype), 0
        head = npy_header_bytes((n, *self.row_shape), self.dtype)
        self.size = len(head)
        self.f = open(path, "wb")
        self.f.write(head)

    def append(self, row: np.ndarray) -> None:
        row = np.ascontiguousarray(row, self.dtype)
        if row.shape != self.row_shape:
            raise ValueError(f"a row of shape {row.shape} in a file of rows {self.row_shape}")
        self.f.write(row.tobytes())
        self.count += 1

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            if kind is None:
                self.f.seek(0)
                self.f.write(npy_header_bytes((self.count, *self.row_shape), self.dtype, self.size))
        finally:
            self.f.close()


# ---------------------------------------------------------------------------------------------
# Failed reads and writes, in one sentence that names the file and the real cause.

# What to do about each cause; a cause not listed gets its strerror and "fix it and re-run".
FIXES = {
    errno.ENOSPC: "the disk is full; free disk space and re-run",
    errno.EDQUOT: "the disk quota is used up; free space and re-run",
    errno.EFBIG: "the file is larger than the file system allows; choose another place",
    errno.EISDIR: "it is a folder; give the path of a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "something of that name is already there; choose another path",
    errno.ENOENT: "it or its folder does not exist; check the path",
    errno.EACCES: "it is not writable (permission denied); fix its permissions or choose another path",
    errno.EPERM: "the operation is not permitted there; fix its permissions or choose another path",
    errno.EROFS: "it is on a read-only file system; choose a writable path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EIO: "the disk reported an input/output error; check the disk",
}


def error_number(e: BaseException) -> int | None:
    """The errno of an OSError, or the one safetensors' error quotes ("... Os { code: 28, ...")."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"code: (\d+)", str(e))
    return int(found.group(1)) if found else None


def failure(path: Path | str, e: BaseException, doing: str = "write") -> UserError:
    """The UserError of a failed `doing` ('write', 'read') of `path`: the path, the cause and its fix."""
    number = error_number(e)
    said = f" ({os.strerror(number)})" if number else ""
    return UserError(f"could not {doing} {path}{said}: {cause(e)}.")


def cause(e: BaseException) -> str:
    """What went wrong in a failed read or write, and its fix: "the disk is full; free disk space and re-run"."""
    return FIXES.get(error_number(e)) or f"{getattr(e, 'strerror', None) or str(e).splitlines()[0]}; fix it and re-run"


@contextmanager
def writing(path: Path | str, *temporaries: Path):
    """Write `path` inside this block: a failure (OSError, or safetensors' own error on a full disk)
    becomes one UserError naming it, and the `temporaries` (files or folders) are removed whatever
    ends the block, a signal's exception included."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        remove(*temporaries)
        raise failure(path, e) from None
    except BaseException:
        remove(*temporaries)
        raise


def remove(*paths: Path) -> None:
    """Remove files or folders where they exist; a path that cannot be there (its folder is a file) is skipped."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(FileNotFoundError, NotADirectoryError):
                p.unlink()


def check_writable(path: Path | str, what: str) -> None:
    """Before long work: `path` (a file to write) can be created or replaced. Creates and removes a
    probe file beside it, so read-only file systems, permissions and folders in the way all show."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give the path of a file.")
    parent = path.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{what} {path} cannot be written: {existing} is a file, not a folder; choose another path.")
    probe = (existing or Path(".")) / f".diffuse-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written: {cause(e)}.") from None
    finally:
        probe.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Reading JSON that someone else may have written.


def read_json(path: Path, limit: int | None = None):
    """The JSON value in `path`, refusing what Python's json would take but no writer of ours gives:
    text that is not UTF-8, NaN and Infinity, and nesting deep enough to exhaust the stack.
    Raises ValueError (UnicodeDecodeError and JSONDecodeError are ValueErrors) or OSError; with a
    `limit` in bytes, a larger file or one not UTF-8 is a UserError (`read_limited`)."""
    text = Path(path).read_bytes().decode("utf-8") if limit is None else read_limited(Path(path), limit, "JSON file")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("it nests values too deeply") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")
