"""`python -m diffuse` and the `diffuse` command: the signal handler goes in before torch is imported,
so a Ctrl-C in the first seconds ends in one line too, and it stays until the process exits."""

import signal
import sys

from diffuse.signals import SIGNALS, Guard, Stopped


def run() -> None:
    guard = Guard()
    for sig in SIGNALS:
        signal.signal(sig, guard)
    try:
        from diffuse.cli import main
    except Stopped as e:
        ignore_signals()
        print(f"diffuse: interrupted by {e.name} during start-up; nothing was written.", file=sys.stderr)
        sys.exit(e.exit_code)
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
