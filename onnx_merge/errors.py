"""Errors the CLI turns into one line on stderr and an exit code."""


class OnnxMergeError(Exception):
    exit_code = 1


class UsageError(OnnxMergeError):
    """Bad arguments or options (exit 2)."""

    exit_code = 2


class ModelError(OnnxMergeError):
    """An unreadable or invalid model or data file (exit 3)."""

    exit_code = 3


class OutputError(OnnxMergeError):
    """A file could not be written: full disk, read-only folder (exit 3). Nothing is left half-written."""

    exit_code = 3


class VerificationError(OnnxMergeError):
    """The candidate's outputs are outside tolerance (exit 1). ``report``: what was done and
    measured, for a caller that still shows or writes it."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the program was, so that clean-up code runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
