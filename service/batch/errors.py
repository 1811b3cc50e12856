"""The batch runner's exceptions; the process exit code lives on the class.

As with :class:`service.core.errors.ServingError` (HTTP status on the class), one handler in
``__main__`` turns these into a one-line message and the exit code, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "BatchError",
    "SetupError",
    "JobFailed",
    "TooManyErrors",
    "Interrupted",
    "AlreadyComplete",
]


class BatchError(Exception):
    """Base class: ``exit_code`` is what ``python -m service.batch`` exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SetupError(BatchError):
    """The job cannot start: missing input, unknown model, unwritable output, bad options.

    Raised before any row is read, so nothing is written.
    """

    exit_code = 2


class JobFailed(BatchError):
    """The job stopped part-way (server gone after retries, disk full...); ``--resume`` goes on."""

    exit_code = 1


class TooManyErrors(BatchError):
    """The job finished, but more rows than ``--max-error-rate`` allows were bad."""

    exit_code = 3


class Interrupted(BatchError):
    """Ctrl-C or SIGTERM: committed chunks are kept, ``--resume`` continues after them."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class AlreadyComplete(BatchError):
    """``--resume`` of a job whose output is complete: nothing to do, and that is fine."""

    exit_code = 0
