"""The one exception type for mistakes a user can fix: the CLI prints it as one sentence, exit 2."""


class UserError(Exception):
    """A bad flag, config value, file or folder; the message names the thing and the fix."""
