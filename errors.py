"""The one error type a user sees: a bad file, folder or option. Every script prints it as one line and exits
with status 2 (cli.exit_status), never a traceback."""


class CaptchaError(Exception):
    """A user-facing problem (bad file, bad folder, bad option): scripts print it as one line."""
