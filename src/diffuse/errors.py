"""The exceptions that end a command cleanly: one sentence on stderr, a distinct exit code, no traceback.

    0   done
    1   `diffuse doctor` found a failing check (a finding, not an error)
    2   UserError: a bad flag, config value, file or folder; the message names the thing and the fix
    3   Diverged: training met a non-finite loss or gradient under train.nonfinite = "stop"
    75  Interrupted: SIGTERM or SIGINT; the run wrote a checkpoint, and re-running the command resumes it
        (75 is EX_TEMPFAIL of sysexits.h: "try again later")
    130 Stopped by SIGINT anywhere else (start-up, sample, eval, ...), 143 by SIGTERM: 128 + the signal,
        as a shell reports it; no temporary file is left (`diffuse.signals`)
"""


class UserError(Exception):
    """A bad flag, config value, file or folder; the message names the thing and the fix."""

    exit_code = 2


class Diverged(Exception):
    """A non-finite loss or gradient; the last checkpoint written stays the newest."""

    exit_code = 3


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; the step in flight finished and a checkpoint was written."""

    exit_code = 75
