"""Text in: a model that declares a tokenizer in its manifest takes strings, not token ids.

The manifest's ``tokenizer`` names a ``tokenizer.json`` in the version folder (Hugging Face's
``tokenizers`` format, Rust), the longest input the model takes and the pad id; the server
tokenizes with it, so a client sends a v2 input ``text`` of datatype ``BYTES`` (strings in JSON,
length-prefixed UTF-8 in the binary extension) and never sees token ids. A text longer than the
model's limit is refused with 400 unless the request asks for truncation (``truncate``, as
Hugging Face's text-embeddings-inference does), so nothing is cut without the client knowing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInput
from .repository import TensorSpec

__all__ = ["TEXT_INPUT", "TextEncoder", "TokenizerSpec", "reassemble", "truncation"]

#: the input a text model serves
TEXT_INPUT = "text"


@dataclass(frozen=True)
class TokenizerSpec:
    """A manifest's ``tokenizer`` object, checked."""

    file: str
    max_length: int
    pad_id: int
    ids: str  # the graph input that takes token ids
    mask: str  # the graph input that takes the attention mask

    @classmethod
    def parse(cls, data: dict[str, Any], model: str) -> TokenizerSpec:
        try:
            spec = cls(
                str(data["file"]),
                int(data["max_length"]),
                int(data["pad_id"]),
                str(data["ids"]),
                str(data["mask"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"model '{model}': manifest 'tokenizer' needs file, max_length, pad_id, ids and "
                f"mask; {type(exc).__name__}: {exc}"
            ) from None
        if spec.max_length < 2:
            raise ValueError(f"model '{model}': tokenizer max_length {spec.max_length} < 2")
        return spec


class TextEncoder:
    """Strings -> token ids of one model, and token ids -> the graph's padded feeds."""

    def __init__(self, path: Path, spec: TokenizerSpec, model: str) -> None:
        from tokenizers import Tokenizer

        self.spec = spec
        self.model = model
        try:
            self._whole = Tokenizer.from_file(str(path))
            self._cut = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions
            raise ValueError(
                f"{path}: not a tokenizer.json the tokenizers library reads: {exc}"
            ) from None
        for tok in (self._whole, self._cut):
            tok.no_padding()
        self._whole.no_truncation()
        self._cut.enable_truncation(spec.max_length)
        self.inputs = [TensorSpec(TEXT_INPUT, "BYTES", (-1,))]
        self.pad = {spec.ids: spec.pad_id, spec.mask: 0}

    @property
    def max_length(self) -> int:
        return self.spec.max_length

    def encode(self, texts: np.ndarray | Sequence[Any], truncate: bool = False) -> list[list[int]]:
        """Token ids of each text (strings, or UTF-8 bytes from binary BYTES); 400 for what is
        not text, is not UTF-8, or is longer than the model takes without ``truncate``."""
        ids, refused = self.encode_rows(texts, truncate)
        if refused:
            first = min(refused)
            raise InvalidInput(self.problem(f"text {first}", refused[first]))
        return ids

    def problem(self, which: str, why: str) -> str:
        """A refused text's message: ``which`` ("text 3", "the text") and ``why``."""
        return f"input '{TEXT_INPUT}' of model '{self.model}': {which} {why}"

    def encode_rows(
        self,
        texts: np.ndarray | Sequence[Any],
        truncate: bool = False,
        hint: str = 'ask for truncation (v2 parameter "truncate": true, or "truncate": true '
        "in the JSON body)",
    ) -> tuple[list[list[int]], dict[int, str]]:
        """Token ids of each text, and why each refused text is refused (by index, to be
        finished by :meth:`problem`; its ids are then meaningless): batch jobs keep the
        other rows."""
        strings: list[str] = []
        refused: dict[int, str] = {}
        for i, value in enumerate(_flat(texts)):
            text, why = _string(value)
            strings.append(text)
            if why:
                refused[i] = why
        encodings = (self._cut if truncate else self._whole).encode_batch(strings)
        ids = [e.ids for e in encodings]
        if not truncate:
            limit = self.spec.max_length
            for i, row in enumerate(ids):
                if len(row) > limit and i not in refused:
                    refused[i] = (
                        f"is {len(row)} tokens long, more than the {limit} the model takes; "
                        f"shorten it, or {hint} to keep its first {limit} tokens"
                    )
        return ids, refused

    def feeds(self, ids: Sequence[Sequence[int]], width: int | None = None) -> dict[str, Any]:
        """The graph's inputs for ``ids``: padded to ``width`` (the longest when None)."""
        width = width or max(len(row) for row in ids)
        tokens = np.full((len(ids), width), self.spec.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for r, row in enumerate(ids):
            tokens[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return {self.spec.ids: tokens, self.spec.mask: mask}


def reassemble(parts: Sequence[tuple[Sequence[int], list[np.ndarray]]], n: int) -> list[np.ndarray]:
    """Outputs of ``n`` rows from runs over groups of them (row indices, that run's outputs),
    each output back in row order: texts run grouped by length, answered in order."""
    merged = []
    for j, first in enumerate(parts[0][1]):
        out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for rows, result in parts:
            out[list(rows)] = result[j]
        merged.append(out)
    return merged


def truncation(parameters: dict[str, Any], model: str) -> bool:
    """The request's ``truncate`` parameter (false when absent); 400 unless a boolean."""
    value = parameters.get("truncate", False)
    if not isinstance(value, bool):
        raise InvalidInput(
            f"model '{model}': parameter 'truncate' must be true or false, got {str(value)[:32]!r}"
        )
    return value


def _flat(texts: np.ndarray | Sequence[Any]) -> list[Any]:
    if isinstance(texts, np.ndarray):
        return list(texts.reshape(-1))
    return list(texts)


def _string(value: Any) -> tuple[str, str]:
    """A text element as a string, or "" and why it is not text."""
    if isinstance(value, str):
        return value, ""
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            return bytes(value).decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            return "", (
                f"is not valid UTF-8 ({exc.reason} at byte {exc.start}); expected UTF-8 "
                "encoded text"
            )
    return "", f"is {type(value).__name__}; expected a string"
