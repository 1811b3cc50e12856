"""The progress bar (tqdm: rows, rows/s, ETA, errors so far) and the end-of-job summary."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

__all__ = ["Progress", "Summary", "peak_rss_mib"]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """A tqdm bar over input rows; silent when disabled or when tqdm is not installed."""

    def __init__(
        self, total: int, done: int, label: str, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total,
            initial=done,
            desc=label,
            unit="rows",
            unit_scale=True,
            dynamic_ncols=True,
            mininterval=0.5,
            smoothing=0.1,
            file=stream or sys.stderr,
        )

    def advance(self, rows: int, errors: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"errors={errors:,}", refresh=False)
            self._bar.update(rows)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class Summary:
    """What a job did; printed at the end and written with ``--summary-json``."""

    model: str
    engine: str
    input: str
    output: str
    errors_file: str
    rows: int  # input rows done, earlier runs of a resumed job included
    predicted: int
    errors: int
    rows_this_run: int
    wall_s: float  # this run, setup included
    compute_s: float  # this run, from the first chunk to the output assembled
    batch_size: int
    chunk_rows: int
    chunks: int
    resumed_from_chunk: int
    peak_rss_mib: float
    max_error_rate: float
    complete: bool = True

    @property
    def error_share(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.compute_s if self.compute_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_share": self.error_share, "rows_per_s": self.rows_per_s}

    def text(self) -> str:
        resumed = f", resumed at chunk {self.resumed_from_chunk}" if self.resumed_from_chunk else ""
        lines = [
            f"{self.model} on the {self.engine} engine: batch {self.batch_size}, "
            f"{self.chunks} chunk{'s' if self.chunks != 1 else ''} of {self.chunk_rows:,} rows"
            f"{resumed}",
            f"  rows        {self.rows:,} ({self.predicted:,} predicted, {self.errors:,} errors "
            f"= {self.error_share:.4%}, limit {self.max_error_rate:.2%})",
            f"  throughput  {self.rows_per_s:,.0f} rows/s ({self.rows_this_run:,} rows in "
            f"{self.compute_s:.2f} s; wall time {self.wall_s:.2f} s with setup)",
            f"  memory      {self.peak_rss_mib:,.0f} MiB peak resident",
            f"  output      {self.output}",
            f"  errors      {self.errors_file}",
        ]
        return "\n".join(lines)
