"""What a batch job is asked to do: :class:`JobConfig`, everything ``python -m service.batch``
takes, checked when it is made."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .engines.base import ENGINES
from .errors import SetupError
from .readers import DEFAULT_CHUNK_ROWS

__all__ = ["JobConfig"]


@dataclass
class JobConfig:
    """Everything ``python -m service.batch`` takes; checks itself."""

    model: str
    input: Path
    output: Path
    engine: str = "local"
    repo: Path | None = None  # None: SLIMSERVE_MODEL_REPOSITORY (settings), default models/
    version: int | None = None
    variant: str | None = None
    input_format: str | None = None
    output_format: str | None = None
    features: tuple[str, ...] | None = None
    id_column: str | None = None
    header: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    batch_size: int | None = None  # None: the model's best (local, ray) or 512 (http)
    truncate: bool = False  # text models: cut long texts instead of refusing their rows
    max_error_rate: float = 0.01
    errors_path: Path | None = None  # None: <output>.errors.jsonl
    resume: bool = False
    overwrite: bool = False
    url: str | None = None  # http engine; None: the settings' host and port
    concurrency: int = 4
    retries: int = 5
    timeout_s: float = 60.0
    retry_backoff_s: float = 0.5  # the first wait; doubled at every retry (with jitter)
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_cpus: int | None = None
    threads: int | None = None  # onnxruntime intra-op threads; None: the settings'
    progress: bool = True
    summary_json: Path | None = None
    #: keep one part file per chunk in the folder ``output``; None: when ``output`` is given
    #: as a string ending in "/" or names an existing folder
    folder_output: bool | None = None

    def __post_init__(self) -> None:
        if self.folder_output is None:
            text = str(self.output)  # a Path has already lost a trailing "/"
            self.folder_output = text.endswith(("/", os.sep)) or Path(text).is_dir()
        self.input, self.output = Path(self.input), Path(self.output)
        if self.engine not in ENGINES:
            raise SetupError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise SetupError(f"--max-error-rate: expected 0..1, got {self.max_error_rate}")
        for name in ("chunk_rows", "concurrency"):
            if getattr(self, name) < 1:
                raise SetupError(
                    f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}"
                )
        if self.batch_size is not None and self.batch_size < 1:
            raise SetupError(f"--batch-size: expected >= 1, got {self.batch_size}")
        if self.retries < 0:
            raise SetupError(f"--retries: expected >= 0, got {self.retries}")
        if self.resume and self.overwrite:
            raise SetupError("--resume and --overwrite contradict each other; pass one")
