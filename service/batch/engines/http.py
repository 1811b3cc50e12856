"""The ``http`` engine: a running slimserve over the v2 protocol with binary tensors, bounded
concurrency, and retries with backoff on 503 and connection errors."""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from service.core.errors import InvalidInput
from service.core.protocol import (
    HEADER_LENGTH,
    decode_response,
    encode_request,
)

from ..errors import JobFailed, SetupError
from ..model import ModelSpec, from_metadata
from ..readers import Chunk, Reader
from .base import DEFAULT_HTTP_BATCH, Engine, Prefetch, Result, RowsRejected, finalize, run_batches

log = logging.getLogger("slimserve.batch")


class HttpEngine(Engine):
    """v2 infer requests with binary tensors, ``concurrency`` of them in flight."""

    name = "http"
    RETRY_STATUSES = (502, 503, 504)

    def __init__(
        self,
        url: str,
        model_name: str,
        version: int | None = None,
        variant: str | None = None,
        batch_size: int | None = None,
        concurrency: int = 4,
        retries: int = 5,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        local: ModelSpec | None = None,
        truncate: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.truncate = truncate
        self.model_name = model_name
        self.version = version
        self.variant = variant
        self.batch_size = batch_size or DEFAULT_HTTP_BATCH
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.local = local
        self.retried = 0  # requests sent again after a 503 or a connection error
        self._stop = threading.Event()
        self._client: Any = None

    @property
    def _model_path(self) -> str:
        path = f"/v2/models/{self.model_name}"
        return path + (f"/versions/{self.version}" if self.version is not None else "")

    def open(self) -> ModelSpec:
        import httpx

        self._client = httpx.Client(
            base_url=self.url,
            timeout=self.timeout_s,
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
        )
        try:
            answer = self._client.get(self._model_path)
        except httpx.HTTPError as exc:
            raise SetupError(
                f"no v2 server answers at {self.url} ({type(exc).__name__}: {exc}); start one "
                "(make serve) or pass --url"
            ) from None
        if answer.status_code != 200:
            raise SetupError(
                f"model '{self.model_name}' at {self.url}: {answer.status_code} "
                f"{_error_text(answer)}"
            )
        doc = answer.json()
        if self.variant is not None:
            variants = (doc.get("parameters") or {}).get("variants")
            if not isinstance(variants, dict):
                raise SetupError(
                    f"the server at {self.url} does not serve variants; drop --variant "
                    f"{self.variant}"
                )
            entry = variants.get(self.variant)
            served = sorted(k for k, v in variants.items() if v.get("served"))
            if not entry or not entry.get("served"):
                why = (entry or {}).get("reason") or "unknown variant"
                raise SetupError(
                    f"model '{self.model_name}' at {self.url}: variant {self.variant!r} is not "
                    f"served ({why}); served: {served}"
                )
        self.model = replace(
            from_metadata(doc, self.model_name, self.local),
            variant=self.variant,
            truncate=self.truncate,
        )
        return self.model

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "concurrency": self.concurrency}

    def results(self, reader: Reader, first: int) -> Iterator[Result]:
        chunks = Prefetch(reader.chunks(first))
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="slimserve-batch-http")
        pending: deque[tuple[Chunk, list[Future[Any]]]] = deque()
        try:
            for chunk in chunks:
                futures = [
                    pool.submit(self._rows, chunk.x[lo : lo + self.batch_size])
                    for lo in range(0, len(chunk.x), self.batch_size)
                ]
                pending.append((chunk, futures))
                while len(pending) > 2:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            chunks.close()

    def _collect(self, chunk: Chunk, futures: list[Future[Any]]) -> Result:
        names = [o.name for o in self.model.outputs]
        pieces: list[dict[str, np.ndarray]] = []
        failed: dict[int, str] = {}
        for k, future in enumerate(futures):
            outputs, refused = future.result()
            if outputs:
                pieces.append(outputs)
            failed.update({k * self.batch_size + i: r for i, r in refused.items()})
        outputs = {n: np.concatenate([p[n] for p in pieces]) for n in names} if pieces else {}
        return finalize(chunk, outputs, failed, self.model)

    def _rows(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        names = [o.name for o in self.model.outputs]
        return run_batches(self._call, x, len(x), names)

    def _call(self, x: np.ndarray) -> list[np.ndarray]:
        import httpx

        names = [o.name for o in self.model.outputs]
        params: dict[str, Any] = {"variant": self.variant} if self.variant else {}
        if self.model.is_text and self.truncate:
            params["truncate"] = True
        body, headers = encode_request({self.model.input.name: x}, names, True, params or None)
        path = f"{self._model_path}/infer"
        problem = ""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise JobFailed("stopped")
            wait = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
            try:
                answer = self._client.post(path, content=body, headers=headers)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = answer.status_code
                if status == 200:
                    return self._decode(answer, names, len(x))
                problem = f"{status} {_error_text(answer)}"
                if status == 400:
                    raise RowsRejected(f"the server refused the row: {_error_text(answer)}")
                if status == 413:
                    raise RowsRejected(f"{self.url}: {problem} (one row)", per_row=False)
                if status not in self.RETRY_STATUSES:
                    raise JobFailed(f"model '{self.model_name}' at {self.url}: {problem}")
                retry_after = answer.headers.get("retry-after", "")
                if retry_after.isdigit():
                    wait = max(wait, float(retry_after))
            if attempt < self.retries:
                self.retried += 1
                log.info("retrying in %.2f s after %s", wait, problem)
                self._stop.wait(min(wait, 30.0))
        raise JobFailed(
            f"model '{self.model_name}' at {self.url}: gave up after {self.retries} retries; "
            f"last answer: {problem}"
        )

    def _decode(self, answer: Any, names: list[str], n: int) -> list[np.ndarray]:
        try:
            response = decode_response(answer.content, answer.headers.get(HEADER_LENGTH))
        except InvalidInput as exc:
            raise JobFailed(f"{self.url} sent a response that is not v2: {exc.message}") from None
        if self.variant and response.parameters.get("variant") not in (None, self.variant):
            raise JobFailed(
                f"{self.url} answered with variant {response.parameters.get('variant')!r}, "
                f"not {self.variant!r}"
            )
        missing = [name for name in names if name not in response.outputs]
        if missing:
            raise JobFailed(f"{self.url}: the response lacks outputs {missing}")
        return [response.outputs[name] for name in names]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _error_text(answer: Any) -> str:
    try:
        doc = answer.json()
    except ValueError:
        return answer.text[:200]
    return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)[:200]
