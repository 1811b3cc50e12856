"""Where a job writes and what it has committed: the work folder's layout, the journal
(replaced atomically after every chunk), and the checks and repairs that let ``--resume`` pick
up after the last committed chunk. See :mod:`service.batch.job` for the protocol."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .config import JobConfig
from .errors import SetupError
from .writers import Writer

__all__ = [
    "JOURNAL_FORMAT",
    "Layout",
    "check_output",
    "check_unchanged",
    "fsync",
    "prepare_work",
    "read_journal",
    "rewind",
    "write_json_atomic",
]

JOURNAL_FORMAT = "slimserve.batch-journal/1"


@dataclass
class Layout:
    output: Path
    work: Path
    journal: Path
    errors_work: Path
    errors_final: Path
    folder: bool

    @classmethod
    def of(cls, config: JobConfig) -> Layout:
        out = config.output
        if config.folder_output:
            errors = config.errors_path or out / "_errors.jsonl"
            return cls(out, out, out / "_journal.json", out / "_errors.jsonl", errors, True)
        work = out.with_name(out.name + ".partial")
        errors = config.errors_path or out.with_name(out.name + ".errors.jsonl")
        return cls(out, work, work / "journal.json", work / "errors.jsonl", errors, False)

    def suffix(self, writer: Writer) -> str:
        """Folder output keeps parts in the output format; a file output keeps Arrow IPC."""
        return writer.suffix if self.folder else ".arrow"

    def part(self, index: int, writer: Writer) -> Path:
        return self.work / f"part-{index:06d}{self.suffix(writer)}"

    def parts(self, count: int, writer: Writer) -> list[Path]:
        return [self.part(i, writer) for i in range(count)]

    @property
    def output_tmp(self) -> Path:
        return self.work / "output.tmp"


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_journal(path: Path) -> dict[str, Any]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SetupError(
            f"journal {path} is not readable ({exc}); start over with --overwrite"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
        raise SetupError(
            f"journal {path} is not a {JOURNAL_FORMAT} journal; start over with --overwrite"
        )
    return doc


def check_output(config: JobConfig, layout: Layout) -> dict[str, Any] | None:
    """Refuse to clobber, find the journal to resume; returns it (or None for a fresh job)."""
    out = layout.output
    anchor = out if layout.folder and out.exists() else out.parent
    if not anchor.is_dir():
        raise SetupError(f"output {out}: the folder {anchor} does not exist")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise SetupError(f"output {out}: the folder {anchor} is not writable (permissions)")
    if not layout.folder and out.is_dir():
        raise SetupError(
            f"output {out} is a folder; end the path with / to write part files into it"
        )
    journal = layout.journal if layout.journal.exists() else None
    if config.resume:
        if journal is not None:
            return read_journal(journal)
        if layout.folder and (out / "_SUCCESS").exists() or not layout.folder and out.exists():
            return {"complete": True}
        return None
    if journal is not None and not config.overwrite:
        doc = read_journal(journal)
        raise SetupError(
            f"output {out}: {layout.work} holds an unfinished job ({doc.get('next_chunk', 0)} of "
            f"{doc.get('chunks', '?')} chunks committed); pass --resume to continue it or "
            "--overwrite to start over"
        )
    exists = out.is_dir() and any(out.iterdir()) if layout.folder else out.exists()
    if exists and not config.overwrite:
        raise SetupError(f"output {out} already exists; pass --overwrite to replace it")
    return None


def prepare_work(layout: Layout, fresh: bool) -> None:
    """Create the work folder (clearing it for a fresh job); :class:`SetupError` if unwritable."""
    try:
        if fresh and layout.work.exists() and not layout.folder:
            shutil.rmtree(layout.work)
        if fresh and layout.folder and layout.work.exists():
            for entry in layout.work.iterdir():
                if entry.is_file() and (entry.name.startswith(("part-", "_"))):
                    entry.unlink()
        layout.work.mkdir(parents=False, exist_ok=True)
        probe = layout.work / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SetupError(
            f"output {layout.output}: cannot write {layout.work} ({exc.strerror or exc})"
        ) from None


def check_unchanged(old: dict[str, Any], new: dict[str, Any], layout: Layout) -> None:
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {new[k]!r}" for k in changed[:3])
        raise SetupError(
            f"cannot resume {layout.work}: the job changed ({detail}); run the original "
            "command again, or start over with --overwrite"
        )


def rewind(layout: Layout, journal: dict[str, Any], writer: Writer) -> None:
    """Undo whatever was written after the journal's last commit."""
    committed = journal["next_chunk"]
    with open(layout.errors_work, "ab") as fh:
        fh.truncate(journal["errors_bytes"])
    for entry in layout.work.iterdir():
        name = entry.name
        later_part = name.startswith("part-") and name.endswith(layout.suffix(writer))
        if name.endswith(".tmp") or later_part and int(name[5:11]) >= committed:
            entry.unlink()
    missing = [p for p in layout.parts(committed, writer) if not p.exists()]
    if missing:
        raise SetupError(
            f"cannot resume {layout.work}: committed part {missing[0].name} is missing; "
            "start over with --overwrite"
        )
