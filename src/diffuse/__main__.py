"""`python -m diffuse` and the `diffuse` command: a signal handler goes in before torch is imported, so
a Ctrl-C in the first seconds ends in one line too (once the imports are done: an exception raised
inside an import can leave numpy half-initialized), and the Guard stays until the process exits."""

import signal
import sys

from diffuse.signals import SIGNALS, Guard


def run() -> None:
    arrived: list[int] = []
    for sig in SIGNALS:  # during the imports a signal is only noted: an exception raised inside numpy's or
        signal.signal(sig, lambda signum, frame: arrived.append(signum))  # torch's import can leave it half-made
    from diffuse.cli import main
    if arrived:
        ignore_signals()
        name = signal.Signals(arrived[0]).name
        print(f"diffuse: interrupted by {name} during start-up; nothing was written.", file=sys.stderr)
        sys.exit(128 + arrived[0])
    guard = Guard()
    for sig in SIGNALS:
        signal.signal(sig, guard)
    code = main()
    ignore_signals()
    sys.exit(code)


def ignore_signals() -> None:
    """SIG_IGN to the end: Python's shutdown resets a Python handler to SIG_DFL, under which a late second
    signal would kill the process while it exits (torch's teardown takes a while)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    run()
