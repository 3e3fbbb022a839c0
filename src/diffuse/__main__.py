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
        guard.ignore()
        print(f"diffuse: interrupted by {e.name} during start-up; nothing was written.", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(main())


if __name__ == "__main__":
    run()
