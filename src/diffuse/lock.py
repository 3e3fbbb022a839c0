"""One writer per run directory: RUN_DIR/.lock, held by `flock` for as long as a command writes there.

The kernel releases a flock when its holder exits, however it exits (a SIGKILL included), so a
lock left behind by a killed process never blocks the next command; the file itself stays, and
holds the process id and command of its last holder, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from diffuse.errors import UserError
from diffuse.files import cause

LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path, command: str):
    """Hold the run directory's lock inside the block; a second holder gets one sentence and exit code 2.
    Creates run_dir if it does not exist, and removes it again if the block wrote nothing there."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"cannot write to the run directory {run_dir}: it is a file, not a folder; choose a new --out.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {run_dir}: {cause(e)}; choose another --out.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}; wait for it to finish or stop it, then re-run.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} (diffuse {command})\n".encode(), 0)
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:  # a command that failed before writing
            (run_dir / LOCK).unlink()
            run_dir.rmdir()
        os.close(fd)  # closing the descriptor releases the flock
