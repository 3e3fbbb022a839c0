"""SIGINT and SIGTERM outside training's steps: every command stops where it is, in one line.

`diffuse.cli.main` runs each command inside `stopped_by_signals()`: the first signal raises
`Stopped` (a BaseException, so no `except Exception` swallows it) from wherever the command is;
the writers remove their temporary files as it passes (`files.writing`), and main prints one line
and returns 130 (SIGINT) or 143 (SIGTERM), the shell's 128 + signal number. Every later signal is
ignored, so the cleanup and the line are never torn by a second one.

Training's steps answer a signal themselves (`run.stop_requests`: a checkpoint, then exit 75);
a second signal there is handed to the handler installed here and stops at once.
This module imports nothing heavy: `diffuse.__main__` installs a Guard before torch is imported and
leaves it in place (ignoring) until the process exits, so a signal during shutdown is ignored too.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived; the command stopped where it was, with no partial file left."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM


class Guard:
    """Raises Stopped at the first signal, ignores the later ones."""

    def __init__(self):
        self.stopped: str | None = None

    def __call__(self, signum, frame):
        if self.stopped is None:
            self.stopped = signal.Signals(signum).name
            raise Stopped(signum)

    def ignore(self) -> None:
        """From now on every signal is ignored: the command's ending is printed whole."""
        self.stopped = self.stopped or "done"


@contextmanager
def stopped_by_signals():
    """Turn SIGINT and SIGTERM into Stopped within the block (main thread only; elsewhere nothing)."""
    installed = signal.getsignal(signal.SIGINT)
    if isinstance(installed, Guard):  # `diffuse.__main__`'s, in place since start-up: it stays to the end
        installed.stopped = None
        yield installed
        installed.ignore()
        return
    guard = Guard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {sig: signal.signal(sig, guard) for sig in SIGNALS}
    try:
        yield guard
    finally:
        guard.ignore()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
