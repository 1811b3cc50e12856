"""The ``local`` engine: onnxruntime in this process, the next chunk read while this one runs,
and the batch size picked by measuring a few candidates."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from service.core.errors import InferenceFailed, InvalidInput
from service.core.protocol import (
    InferRequest,
    validate_inputs,
)
from service.core.runtime import ModelLoadError, OrtSession, RuntimeOptions
from service.core.tokenizer import TextEncoder, TokenizerSpec, reassemble

from ..errors import JobFailed, SetupError
from ..model import ModelSpec
from ..readers import Chunk, Reader
from .base import (
    CANDIDATE_BATCH_SIZES,
    Engine,
    Prefetch,
    Result,
    RowsRejected,
    finalize,
    run_batches,
)

log = logging.getLogger("slimserve.batch")


def calibrate_batch_size(
    session: OrtSession,
    model: ModelSpec,
    candidates: tuple[int, ...] = CANDIDATE_BATCH_SIZES,
    seconds_each: float = 0.15,
) -> int:
    """The candidate batch size with the most samples/s on this machine (about 0.5 s)."""
    rng = np.random.default_rng(0)
    best, best_rate = candidates[0], 0.0
    name = model.input.name
    for size in candidates:
        x = rng.random((size, *model.row_shape)).astype(model.dtype)
        session.run({name: x})  # warm-up: first runs allocate
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds_each or runs < 2:
            session.run({name: x})
            runs += 1
        rate = runs * size / elapsed
        log.debug("batch size %d: %.0f samples/s", size, rate)
        if rate > best_rate * 1.03:  # a bigger batch must be clearly faster to win
            best, best_rate = size, rate
    return best


class LocalEngine(Engine):
    name = "local"

    def __init__(
        self, model: ModelSpec, options: RuntimeOptions, batch_size: int | None = None
    ) -> None:
        self.model = model
        self.options = options
        self.requested_batch = batch_size
        self.batch_size = batch_size or 0
        self.session: OrtSession | None = None
        self.text: TextEncoder | None = None  # text models: the tokenizer

    def open(self) -> ModelSpec:
        model = self.model
        assert model.path is not None
        try:
            self.session = OrtSession(model.path, model.label, self.options)
        except ModelLoadError as exc:
            raise SetupError(str(exc)) from None
        if not model.is_text and self.session.inputs[0] != model.input:
            raise SetupError(
                f"model '{model.name}': the graph takes {self.session.inputs[0].to_dict()}, "
                f"its manifest says {model.input.to_dict()}"
            )
        if model.is_text:
            self.text = _text_encoder(model, self.session)
            self.batch_size = self.batch_size or TEXT_BATCH
            return model
        fixed = model.fixed_batch
        if fixed is not None:
            self.batch_size = fixed
        elif not self.batch_size:
            self.batch_size = calibrate_batch_size(self.session, model)
        return model

    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        chunks = Prefetch(reader.chunks(first))
        try:
            for chunk in chunks:
                yield self.predict(chunk)
        finally:
            chunks.close()

    def predict(self, chunk: Chunk) -> Result:
        model = self.model
        assert self.session is not None
        names = self.session.output_names
        if not len(chunk.x):
            return finalize(chunk, {}, {}, model)
        if self.text is not None:
            return finalize(chunk, *self._score_texts(self.text, chunk.x), model)
        request = InferRequest(
            {model.input.name: chunk.x}, {model.input.name: model.input.datatype}
        )
        try:
            validate_inputs(request, self.session.inputs, model.name)
        except InvalidInput as exc:  # the readers let only valid rows through
            raise JobFailed(f"rows {chunk.start}-{chunk.stop - 1}: {exc.message}") from exc
        outputs, failed = run_batches(self._call, chunk.x, self.batch_size, names)
        return finalize(chunk, outputs, failed, model)

    def _score_texts(
        self, encoder: TextEncoder, texts: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Outputs for the acceptable ``texts`` (in order) and why the others were refused.
        Texts are tokenized once, sorted by token count and run ``batch_size`` at a time,
        each batch padded to its longest: a chunk of mixed lengths pads little."""
        assert self.session is not None
        ids, why = encoder.encode_rows(texts, self.model.truncate, "pass --truncate")
        refused = {i: encoder.problem("the text", reason) for i, reason in why.items()}
        kept = [row for i, row in enumerate(ids) if i not in refused]
        if not kept:
            return {}, refused
        order = sorted(range(len(kept)), key=lambda j: len(kept[j]))
        parts = []
        for lo in range(0, len(order), self.batch_size):
            rows = order[lo : lo + self.batch_size]
            try:
                outputs = self.session.run(encoder.feeds([kept[j] for j in rows]))
            except InferenceFailed as exc:
                raise JobFailed(exc.message) from exc
            parts.append((rows, outputs))
        merged = reassemble(parts, len(kept))
        return dict(zip(self.session.output_names, merged, strict=True)), refused

    def _call(self, x: np.ndarray) -> list[np.ndarray]:
        assert self.session is not None
        pad = self.model.fixed_batch
        n = len(x)
        if pad is not None and n < pad:  # a graph with a fixed batch axis: fill, then cut
            x = np.concatenate([x, np.repeat(x[:1], pad - n, axis=0)])
        try:
            out = self.session.run({self.model.input.name: x})
        except InvalidInput as exc:
            raise RowsRejected(exc.message) from exc
        except InferenceFailed as exc:
            raise JobFailed(exc.message) from exc
        return [o[:n] for o in out] if pad is not None else out


#: texts per onnxruntime run (sorted by length first, so a batch pads little)
TEXT_BATCH = 32


def _text_encoder(model: ModelSpec, session: OrtSession) -> TextEncoder:
    """The model's tokenizer, checked against its graph's token inputs."""
    assert model.tokenizer is not None and model.tokenizer_path is not None
    try:
        spec = TokenizerSpec.parse(model.tokenizer, model.name)
        encoder = TextEncoder(model.tokenizer_path, spec, model.name)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    if {t.name for t in session.inputs} != {spec.ids, spec.mask}:
        raise SetupError(
            f"model '{model.name}': its tokenizer fills {[spec.ids, spec.mask]}, the graph "
            f"takes {[t.name for t in session.inputs]}"
        )
    return encoder
