"""Plain-JSON endpoints for people who do not speak v2: classify, regress, generate, transform,
embed and forecast.

Each takes a model name and rows of numbers (texts for text models, a history for
forecasters) and hands the dataplane a decoder (rows -> the
model's input tensor) and an encoder (outputs -> an answer in the task's terms): the model runs
the one way every transport runs it (:meth:`DataPlane.infer`). Their request bodies are the
pydantic models below, one schema for the lean handler (:class:`FriendlyApp`, which serves
them in front of BentoML's stack) and for the BentoML API methods that document them in the
OpenAPI page.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.datatypes import from_numpy, to_numpy
from ..core.errors import InvalidInput, MethodNotAllowed, UnsupportedMediaType
from ..core.protocol import InferRequest, dumps
from ..core.tokenizer import TEXT_INPUT
from ..serving.dataplane import DataPlane, Decode, Inference
from ..serving.store import LoadedModel
from ..serving.tracing import Call
from .asgi import JSON, Receive, Scope, Send, read_body, respond

__all__ = [
    "classify",
    "regress",
    "transform",
    "generate",
    "png_base64",
    "MAX_GENERATE",
    "ClassifyRequest",
    "EmbedRequest",
    "ForecastRequest",
    "embed",
    "forecast",
    "RowsRequest",
    "GenerateRequest",
    "FriendlyApp",
    "ROUTES",
]

MAX_GENERATE = 1024
MAX_TEXTS = 4096
MAX_HORIZON = 240
#: the longest history /forecast takes (a recurrent model's time grows with it)
MAX_HISTORY = 10_000

ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        description="A model of the repository, e.g. digits-cnn (name@variant picks a variant).",
    ),
]
Rows = Annotated[
    list[Annotated[list[float], Field(min_length=1)]],
    Field(
        min_length=1,
        description="One list of numbers per sample, after the preprocessing in the model's "
        "manifest (digits: pixels / 16, 64 per row).",
    ),
]


class RowsRequest(BaseModel):
    """The body of /regress and /transform."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: ModelName
    rows: Rows


Texts = Annotated[
    list[str],
    Field(
        min_length=1,
        max_length=MAX_TEXTS,
        description="Strings, tokenized by the server with the model's own tokenizer.",
    ),
]
Truncate = Annotated[
    bool,
    Field(description="Cut texts longer than the model takes (else such a text gets 400)."),
]


class ClassifyRequest(BaseModel):
    """The body of /classify: ``rows`` of numbers, or ``texts`` for a text classifier."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: ModelName
    rows: Rows | None = None
    texts: Texts | None = None
    truncate: Truncate = False
    top_k: int = Field(1, ge=1, le=100, description="How many labels per row, best first.")


class EmbedRequest(BaseModel):
    """The body of /embed."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: ModelName
    texts: Texts
    truncate: Truncate = False


class ForecastRequest(BaseModel):
    """The body of /forecast."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: ModelName
    history: (
        Annotated[list[float], Field(min_length=1, max_length=MAX_HISTORY)]
        | Annotated[
            list[Annotated[list[float], Field(min_length=1, max_length=MAX_HISTORY)]],
            Field(min_length=1),
        ]
    ) = Field(
        description="The series so far in its own units, oldest first (or a list of series "
        "of one length)."
    )
    horizon: int | None = Field(
        None,
        ge=1,
        le=MAX_HORIZON,
        description="Steps to forecast (default: the model's own horizon). Beyond it, the "
        "forecast is fed back as history, step by step.",
    )


class GenerateRequest(BaseModel):
    """The body of /generate."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: ModelName
    n: int = Field(1, ge=1, le=MAX_GENERATE, description="How many samples.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="The same seed gives the same samples.")
    labels: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        None, description="The class of each sample, for conditional generators."
    )
    format: Literal["array", "png"] = Field("array", description="Arrays in [0, 1] or PNG.")
    scale: int = Field(8, ge=1, le=32, description="PNG pixel size.")


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line: each field, what it needs, what came (cut short)."""
    problems = []
    for e in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        got = repr(e.get("input"))
        problems.append(f"'{where}': {e['msg']} (got {got[:40]}{'...' if len(got) > 40 else ''})")
    more = f"; and {exc.error_count() - 5} more" if exc.error_count() > 5 else ""
    return "; ".join(problems) + more


def _single_input(model: LoadedModel, rows: list[list[float]]) -> InferRequest:
    """Rows of features -> the model's one input, reshaped to its declared shape."""
    assert model.session is not None
    if model.text is not None:
        raise InvalidInput(f"model '{model.name}' takes text: send 'texts' instead of 'rows'")
    if len(model.session.inputs) != 1:
        names = [t.name for t in model.session.inputs]
        raise InvalidInput(
            f"model '{model.name}' takes several inputs {names}; use the v2 infer endpoint"
        )
    spec = model.session.inputs[0]
    if not rows:
        raise InvalidInput(f"'rows' for model '{model.name}': expected at least one row")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InvalidInput(
            f"'rows' for model '{model.name}': rows have different lengths {sorted(widths)}"
        )
    per_row = list(spec.shape[1:])
    expected = int(np.prod(per_row)) if per_row and -1 not in per_row else None
    width = widths.pop()
    if expected is not None and width != expected:
        raise InvalidInput(
            f"'rows' for model '{model.name}': expected {expected} numbers per row "
            f"(input '{spec.name}' has shape {list(spec.shape)}), got {width}"
        )
    x = np.asarray(rows, dtype=np.float64)
    shape = (len(rows), *per_row) if expected is not None else x.shape
    array = x.astype(to_numpy(spec.datatype)).reshape(shape)
    return InferRequest({spec.name: array}, {spec.name: spec.datatype})


#: the tasks each endpoint serves (a model whose manifest says "unknown" is served by all)
TASKS = {
    "classify": ("classification",),
    "regress": ("regression",),
    "transform": ("dimensionality_reduction", "encoding", "clustering", "reconstruction"),
    "generate": ("generation",),
    "embed": ("embedding",),
    "forecast": ("forecasting",),
}


def _rows_for(endpoint: str, rows: list[list[float]]) -> Decode:
    """The decoder of the row-taking endpoints: the task check, then rows -> the one input."""

    async def decode(model: LoadedModel) -> InferRequest:
        _check_task(model, endpoint)
        return _single_input(model, rows)

    return decode


def _check_task(model: LoadedModel, endpoint: str) -> None:
    tasks = TASKS[endpoint]
    task = model.manifest.task if model.manifest else "unknown"
    if task not in (*tasks, "unknown"):
        raise InvalidInput(
            f"model '{model.name}' is a {task} model; /{endpoint} serves {', '.join(tasks)} models"
        )


def _answer(model: LoadedModel, **body: Any) -> dict[str, Any]:
    return {"model": model.name, "version": str(model.version), "variant": model.variant, **body}


def _texts_for(endpoint: str, texts: list[str] | None, truncate: bool) -> Decode:
    """The decoder of text endpoints: the task check, then strings -> the ``text`` input."""

    async def decode(model: LoadedModel) -> InferRequest:
        _check_task(model, endpoint)
        if model.text is None:
            raise InvalidInput(
                f"model '{model.name}' takes numbers, not text: send 'rows' instead of 'texts'"
            )
        data = np.empty(len(texts or ()), dtype=object)
        data[:] = texts or []
        return InferRequest(
            {TEXT_INPUT: data}, {TEXT_INPUT: "BYTES"}, parameters={"truncate": truncate}
        )

    return decode


async def classify(
    dataplane: DataPlane,
    name: str,
    rows: list[list[float]] | None,
    top_k: int = 1,
    call: Call | None = None,
    texts: list[str] | None = None,
    truncate: bool = False,
) -> dict[str, Any]:
    """Labels with probabilities, best first (``top_k`` of them per row or text)."""
    if (rows is None) == (texts is None):
        raise InvalidInput("/classify: expected either 'rows' (numbers) or 'texts' (strings)")

    def encode(done: Inference) -> dict[str, Any]:
        model = done.model
        probabilities = done.values.get("probabilities")
        if probabilities is None or probabilities.ndim != 2:
            raise InvalidInput(
                f"model '{name}' has no 'probabilities' output [-1, classes] to classify with"
            )
        labels = (model.manifest.labels if model.manifest else None) or [
            str(i) for i in range(probabilities.shape[1])
        ]
        k = max(1, min(top_k, probabilities.shape[1]))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        predictions = []
        for row, idx in zip(probabilities, order, strict=True):
            ranked = [{"label": labels[i], "probability": float(row[i])} for i in idx]
            predictions.append({**ranked[0], "top_k": ranked})
        return _answer(model, predictions=predictions)

    decode = (
        _texts_for("classify", texts, truncate)
        if texts is not None
        else _rows_for("classify", rows or [])
    )
    return await dataplane.infer(name, None, decode, encode, call)


async def embed(
    dataplane: DataPlane,
    name: str,
    texts: list[str],
    truncate: bool = False,
    call: Call | None = None,
) -> dict[str, Any]:
    """One embedding per text."""

    def encode(done: Inference) -> dict[str, Any]:
        matrices = [v for v in done.values.values() if v.ndim == 2]
        if not matrices:
            raise InvalidInput(f"model '{name}' has no [-1, dimensions] output to embed with")
        embeddings = matrices[0]
        return _answer(done.model, dimensions=embeddings.shape[1], embeddings=embeddings.tolist())

    return await dataplane.infer(name, None, _texts_for("embed", texts, truncate), encode, call)


async def forecast(
    dataplane: DataPlane,
    name: str,
    history: list[float] | list[list[float]],
    horizon: int | None = None,
    call: Call | None = None,
) -> dict[str, Any]:
    """The next ``horizon`` values of each series, in its own units. A horizon longer than the
    model's own is reached step by step, each forecast appended to the history."""
    several = bool(history) and isinstance(history[0], list)
    series = history if several else [history]
    if len({len(s) for s in series}) != 1:  # type: ignore[arg-type]
        lengths = sorted({len(s) for s in series})  # type: ignore[arg-type]
        raise InvalidInput(f"'history': the series have different lengths {lengths[:8]}")
    values = np.asarray(series, dtype=np.float64)
    ahead = np.empty((len(series), 0))  # the forecast so far: the history of the next step

    async def decode(model: LoadedModel) -> InferRequest:
        _check_task(model, "forecast")
        assert model.session is not None
        if len(model.session.inputs) != 1:
            raise InvalidInput(f"model '{model.name}' takes several inputs; use v2 infer")
        spec = model.session.inputs[0]
        so_far = np.concatenate([values, ahead], axis=1)
        return InferRequest(
            {spec.name: so_far.astype(to_numpy(spec.datatype))}, {spec.name: spec.datatype}
        )

    def encode(done: Inference) -> Inference:
        return done

    steps = 0
    while True:
        done = await dataplane.infer(name, None, decode, encode, call)
        step = next(iter(done.values.values())).reshape(len(series), -1).astype(np.float64)
        ahead = np.concatenate([ahead, step], axis=1)
        steps += 1
        wanted = horizon or step.shape[1]
        if ahead.shape[1] >= wanted:
            break
    out = ahead[:, :wanted]
    return _answer(
        done.model,
        horizon=wanted,
        model_horizon=step.shape[1],
        steps=steps,
        forecast=out.tolist() if several else out[0].tolist(),
    )


async def regress(
    dataplane: DataPlane,
    name: str,
    rows: list[list[float]],
    call: Call | None = None,
) -> dict[str, Any]:
    """One value per row (a list per row for multi-target models)."""

    def encode(done: Inference) -> dict[str, Any]:
        flat = next(iter(done.values.values())).reshape(len(rows), -1)
        values = flat[:, 0].tolist() if flat.shape[1] == 1 else flat.tolist()
        return _answer(done.model, values=values)

    return await dataplane.infer(name, None, _rows_for("regress", rows), encode, call)


async def transform(
    dataplane: DataPlane,
    name: str,
    rows: list[list[float]],
    call: Call | None = None,
) -> dict[str, Any]:
    """Every output of an embedding, PCA, encoder, autoencoder or clustering model, per row."""

    def encode(done: Inference) -> dict[str, Any]:
        body = {k: v.tolist() for k, v in done.values.items()}
        manifest = done.model.manifest
        if manifest and manifest.task == "clustering" and "label" in body:
            body["cluster"] = body.pop("label")
        return _answer(done.model, outputs=body)

    return await dataplane.infer(name, None, _rows_for("transform", rows), encode, call)


async def generate(
    dataplane: DataPlane,
    name: str,
    n: int = 1,
    seed: int = 0,
    labels: list[int] | None = None,
    image_format: str = "array",
    scale: int = 8,
    call: Call | None = None,
) -> dict[str, Any]:
    """``n`` samples from a generator, seeded: the same seed gives the same samples."""

    async def decode(model: LoadedModel) -> InferRequest:
        _check_task(model, "generate")
        if not 1 <= n <= MAX_GENERATE:
            raise InvalidInput(f"'n': expected 1..{MAX_GENERATE} samples, got {n}")
        if image_format not in ("array", "png"):
            raise InvalidInput(f"'format': expected 'array' or 'png', got {image_format!r}")
        if not 1 <= scale <= 32:
            raise InvalidInput(f"'scale': expected 1..32, got {scale}")
        return _latent_request(model, n, seed, labels)

    def encode(done: Inference) -> dict[str, Any]:
        images = np.clip(next(iter(done.values.values())).reshape(n, -1), 0.0, 1.0)
        side = int(round(np.sqrt(images.shape[1])))
        if image_format == "png":
            if side * side != images.shape[1]:
                raise InvalidInput(
                    f"model '{name}' does not output square images; use format 'array'"
                )
            encoded = [png_base64(img.reshape(side, side), scale) for img in images]
            return _answer(done.model, seed=seed, format="png", images=encoded)
        return _answer(done.model, seed=seed, format="array", images=images.tolist())

    return await dataplane.infer(name, None, decode, encode, call)


def _latent_request(
    model: LoadedModel, n: int, seed: int, labels: list[int] | None
) -> InferRequest:
    """Seeded noise for each float input; the class to draw for a conditional generator's
    integer input."""
    assert model.session is not None
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in model.session.inputs:
        dims = list(spec.shape[1:])
        if -1 in dims:
            raise InvalidInput(
                f"model '{model.name}': input '{spec.name}' has no fixed size to sample"
            )
        if spec.datatype == "INT64":  # the class to draw (conditional generators)
            classes = len(model.manifest.labels or []) if model.manifest else 0
            classes = classes or 10
            wanted = labels if labels is not None else [i % classes for i in range(n)]
            if len(wanted) != n:
                raise InvalidInput(
                    f"'labels': expected {n} values (one per sample), got {len(wanted)}"
                )
            if any(not 0 <= c < classes for c in wanted):
                bad = next(c for c in wanted if not 0 <= c < classes)
                raise InvalidInput(
                    f"'labels' for model '{model.name}': expected classes 0..{classes - 1}, "
                    f"got {bad}"
                )
            inputs[spec.name] = np.asarray(wanted, dtype=np.int64).reshape(n, *dims)
        else:
            inputs[spec.name] = rng.standard_normal((n, *dims)).astype(np.float32)
    if labels is not None and not any(t.datatype == "INT64" for t in model.session.inputs):
        raise InvalidInput(f"model '{model.name}' is not conditional: it takes no 'labels'")
    return InferRequest(inputs, {k: from_numpy(v.dtype) for k, v in inputs.items()})


def png_base64(image: np.ndarray, scale: int = 1) -> str:
    """A grey-level image in [0, 1] as a base64 PNG, each pixel a ``scale`` x ``scale`` block."""
    pixels = np.kron(np.clip(image, 0, 1), np.ones((scale, scale)))
    data = (pixels * 255).round().astype(np.uint8)
    height, width = data.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in data)  # filter type 0 per scanline

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------------------------
# the lean handler: the same endpoints in front of BentoML's stack

Endpoint = Callable[[DataPlane, Any, Call], Awaitable[dict[str, Any]]]

#: path -> (the body's schema, the call)
ROUTES: dict[str, tuple[type[BaseModel], Endpoint]] = {
    "/classify": (
        ClassifyRequest,
        lambda d, r, g: classify(d, r.model, r.rows, r.top_k, g, r.texts, r.truncate),
    ),
    "/embed": (EmbedRequest, lambda d, r, g: embed(d, r.model, r.texts, r.truncate, g)),
    "/forecast": (
        ForecastRequest,
        lambda d, r, g: forecast(d, r.model, r.history, r.horizon, g),
    ),
    "/regress": (RowsRequest, lambda d, r, g: regress(d, r.model, r.rows, g)),
    "/transform": (RowsRequest, lambda d, r, g: transform(d, r.model, r.rows, g)),
    "/generate": (
        GenerateRequest,
        lambda d, r, g: generate(d, r.model, r.n, r.seed, r.labels, r.format, r.scale, g),
    ),
}


class FriendlyApp:
    """``POST /classify`` and the others: a JSON body checked against its schema, the model
    run by the dataplane, the answer as JSON. Errors are raised for the caller to answer."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.max_body_bytes = dataplane.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send, call: Call) -> None:
        path = scope["path"]
        schema, endpoint = ROUTES[path]
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"{path} takes POST, got {scope['method']}", "POST")
        for header, value in scope["headers"]:
            if header == b"content-type":
                media = value.split(b";")[0].strip().lower()
                if media != b"application/json":
                    raise UnsupportedMediaType(
                        f"{path} takes a JSON body (content-type: application/json), got "
                        f"{media.decode('latin-1')[:64]!r}"
                    )
        body = await read_body(scope, receive, self.max_body_bytes)
        try:
            request = schema.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput(f"{path}: {describe(exc)}") from None
        answer = await endpoint(self.dataplane, request, call)
        await respond(send, 200, dumps(answer), JSON)
