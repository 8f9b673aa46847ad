"""Typed failures of a batch run; ``cli.main`` is the one place that turns them into exit codes."""


class BatchError(Exception):
    exit_code = 1


class UsageError(BatchError):
    """Bad arguments, a model that cannot be loaded, a token the server rejects."""

    exit_code = 2


class ServerUnavailable(BatchError):
    """The server cannot be reached, or keeps answering 503/507 after every retry."""

    exit_code = 3
