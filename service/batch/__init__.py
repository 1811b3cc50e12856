"""Batch jobs over files: ``python -m service.batch --model NAME --input PATH --output PATH``.

Streams the input in chunks through the model (in this process, against a running server, or
on Ray), appends the predictions per row, sets bad rows aside with the reason, and resumes an
interrupted job after its last committed chunk. See ``job.py`` for the on-disk layout.
"""

from __future__ import annotations

from .errors import BatchError, Interrupted, JobFailed, SetupError, TooManyErrors
from .job import JobConfig, run_job
from .progress import Summary

__all__ = [
    "JobConfig",
    "run_job",
    "Summary",
    "BatchError",
    "SetupError",
    "JobFailed",
    "TooManyErrors",
    "Interrupted",
]
