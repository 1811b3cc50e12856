"""The OpenAPI document the server publishes (``/docs.json``, behind the page at ``/``).

BentoML writes the document of its API methods (the friendly endpoints' request bodies come
from their pydantic schemas); this module adds what BentoML cannot know: the ``/v2`` API, and
the answers these routes really give. Every error is ``{"error": "..."}`` (BentoML documents
an extra ``detail`` string); the friendly endpoints can also answer 413 (body too large), 415
(not JSON) and 503 (overloaded, with ``Retry-After``). A schemathesis run in the test suite
holds the server to this document.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from ..core.datatypes import V2_TO_NUMPY
from ..core.policies import Traffic
from ..serving.store import LoadedModel

__all__ = ["openapi_document", "V2_PATHS", "Examples", "examples_from"]

_ERROR = {"$ref": "#/components/schemas/Error"}
_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "Tensor": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(V2_TO_NUMPY)},
            "parameters": {"type": "object", "nullable": True},
            "data": {"type": "array", "items": {}},
        },
        "required": ["name", "shape", "datatype"],
    },
    "InferenceRequest": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "nullable": True},
            "parameters": {"type": "object", "nullable": True},
            "inputs": {
                "type": "array",
                "minItems": 1,
                "items": {"$ref": "#/components/schemas/Tensor"},
            },
            "outputs": {
                "type": "array",
                "nullable": True,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "parameters": {"type": "object", "nullable": True},
                    },
                    "required": ["name"],
                },
            },
        },
        "required": ["inputs"],
    },
    "InferenceResponse": {
        "type": "object",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
        },
        "required": ["model_name", "outputs"],
    },
    "ModelMetadata": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"type": "object"}},
            "outputs": {"type": "array", "items": {"type": "object"}},
            "parameters": {"type": "object"},
        },
        "required": ["name", "platform", "inputs", "outputs"],
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ERROR, "Invalid request: malformed body, shape, datatype or value."),
    "404": _json(_ERROR, "Unknown model, version or variant."),
    "413": _json(_ERROR, "Body or sample count over the limit."),
    "503": _json(_ERROR, "Overloaded or not ready: retry after Retry-After seconds."),
}
_MODEL = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}


def _openapi30(schema: Any) -> Any:
    """pydantic's JSON Schema in OpenAPI 3.0's dialect: ``anyOf [X, null]`` becomes
    ``X`` with ``nullable`` (3.0 has no null type)."""
    if isinstance(schema, list):
        return [_openapi30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _openapi30(v) for k, v in schema.items()}
    options = schema.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        schema.pop("anyOf")
        if len(rest) == 1 and "$ref" in rest[0]:
            schema["allOf"] = rest
        elif len(rest) == 1:
            schema.update(rest[0])
        else:
            schema["anyOf"] = rest
        schema["nullable"] = True
    return schema


def _control(summary: str) -> dict[str, Any]:
    """A repository control route (Triton's extension): POST, an optional JSON body."""
    return {
        "post": {
            "tags": ["v2"],
            "summary": summary,
            "parameters": [_MODEL],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"parameters": {"type": "object"}},
                        }
                    }
                },
            },
            "responses": {"200": _json({"type": "object"}, "Done."), **_ERRORS},
        }
    }


def _get(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None) -> Any:
    op: dict[str, Any] = {"tags": ["v2"], "summary": summary, "responses": {"200": ok, **_ERRORS}}
    if params:
        op["parameters"] = params
    return {"get": op}


def _infer(params: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "post": {
            "tags": ["v2"],
            "summary": "Run the model (JSON tensors; Triton's binary tensor extension with "
            "Inference-Header-Content-Length)",
            "parameters": params,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/InferenceRequest"}
                    }
                },
            },
            "responses": {
                "200": _json(
                    {"$ref": "#/components/schemas/InferenceResponse"}, "The model's outputs."
                ),
                **_ERRORS,
            },
        }
    }


_READY = _json(
    {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "The model is ready.",
)
_METADATA = _json({"$ref": "#/components/schemas/ModelMetadata"}, "The model's metadata.")
_SERVER_READY = {
    "type": "object",
    "properties": {"ready": {"type": "boolean"}, "not_ready_models": {"type": "object"}},
}

#: the /v2 API (Open Inference Protocol v2, REST)
V2_PATHS: dict[str, Any] = {
    "/v2": _get(
        "Server metadata",
        _json(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "extensions": {"type": "array", "items": {"type": "string"}},
                },
            },
            "Name, version, extensions.",
        ),
    ),
    "/v2/health/live": _get(
        "Liveness", _json({"type": "object", "properties": {"live": {"type": "boolean"}}}, "Live")
    ),
    "/v2/health/ready": {
        "get": {
            "tags": ["v2"],
            "summary": "Readiness: ready while at least one model serves",
            "responses": {
                "200": _json(_SERVER_READY, "Ready."),
                "503": _json(_SERVER_READY, "No model is ready."),
            },
        }
    },
    "/v2/models/{model_name}": _get("Model metadata", _METADATA, [_MODEL]),
    "/v2/models/{model_name}/ready": _get("Model readiness", _READY, [_MODEL]),
    "/v2/models/{model_name}/versions/{model_version}": _get(
        "Model metadata of a version", _METADATA, [_MODEL, _VERSION]
    ),
    "/v2/models/{model_name}/versions/{model_version}/ready": _get(
        "Readiness of a version", _READY, [_MODEL, _VERSION]
    ),
    "/v2/models/{model_name}/infer": _infer([_MODEL]),
    "/v2/models/{model_name}/versions/{model_version}/infer": _infer([_MODEL, _VERSION]),
    "/v2/repository/index": {
        "post": {
            "tags": ["v2"],
            "summary": "Every model and version with its state (READY, LOADING, UNLOADING, "
            'UNAVAILABLE) and the reason; {"ready": true} lists only ready ones',
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
                    }
                },
            },
            "responses": {
                "200": _json({"type": "array", "items": {"type": "object"}}, "The index."),
                **_ERRORS,
            },
        }
    },
    "/v2/repository/models/{model_name}/load": _control("Load the model (or its new version)"),
    "/v2/repository/models/{model_name}/unload": _control("Unload the model"),
    "/v2/repository/models/{model_name}/traffic": {
        "get": {
            "tags": ["v2"],
            "summary": "The model's traffic policy (canary and shadow), or null",
            "parameters": [_MODEL],
            "responses": {
                "200": _json({"nullable": True, "type": "object"}, "The policy."),
                **_ERRORS,
            },
        },
        "post": {
            "tags": ["v2"],
            "summary": "Set the model's traffic policy; null goes back to the manifest's",
            "parameters": [_MODEL],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "allOf": [{"$ref": "#/components/schemas/Traffic"}],
                            "nullable": True,
                        }
                    }
                },
            },
            "responses": {
                "200": _json({"nullable": True, "type": "object"}, "The policy."),
                **_ERRORS,
            },
        },
    },
}


def openapi_document(
    bentoml_spec: dict[str, Any],
    friendly: dict[str, type[BaseModel]],
    examples: Examples | None = None,
) -> bytes:
    """BentoML's document with the /v2 API added, every error answer as it really is, and
    ``examples`` (built from the models this server has) on the operations."""
    doc = copy.deepcopy(bentoml_spec)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(copy.deepcopy(_SCHEMAS))
    traffic = _openapi30(Traffic.model_json_schema(ref_template="#/components/schemas/{model}"))
    schemas.update(traffic.pop("$defs", {}))
    schemas["Traffic"] = traffic
    for path, model in friendly.items():
        post = doc.get("paths", {}).get(path, {}).get("post")
        if post is None:
            continue
        _nullable(post, model)
        responses = {k: v for k, v in post.get("responses", {}).items() if str(k) == "200"}
        responses.update(copy.deepcopy(_ERRORS))
        responses["415"] = _json(_ERROR, "The body is not JSON.")
        post["responses"] = responses
        post.setdefault("requestBody", {})["required"] = True
    doc.setdefault("paths", {}).update(copy.deepcopy(V2_PATHS))
    doc.setdefault("tags", []).append({"name": "v2", "description": "Open Inference Protocol v2"})
    if examples is not None:
        _add_examples(doc["paths"], examples)
    return orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)  # BentoML keys statuses by int


@dataclass
class Examples:
    """Requests that work on this server: a model name, a v2 infer body for it, and a body
    per friendly endpoint (path -> body) where a model of its task is served."""

    model: str | None = None
    infer: dict[str, Any] | None = None
    friendly: dict[str, dict[str, Any]] = field(default_factory=dict)


def _nullable(post: dict[str, Any], model: type[BaseModel]) -> None:
    """Mark the body's optional fields that take null as ``nullable`` (OpenAPI 3.0's way;
    BentoML's conversion drops the null)."""
    schema = post.get("requestBody", {}).get("content", {}).get("application/json", {})
    properties = schema.get("schema", {}).get("properties", {})
    for name, info in model.model_fields.items():
        if name in properties and type(None) in typing.get_args(info.annotation):
            properties[name]["nullable"] = True


def _add_examples(paths: dict[str, Any], examples: Examples) -> None:
    for path, item in paths.items():
        for op in item.values():
            for param in op.get("parameters", []):
                if param.get("name") == "model_name" and examples.model:
                    param["example"] = examples.model
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            if path.endswith("/infer") and examples.infer is not None:
                body["example"] = examples.infer
            elif path in examples.friendly:
                body["example"] = examples.friendly[path]


def examples_from(models: list[LoadedModel]) -> Examples:
    """Working requests for the first ready models: zeros of each input's shape (one
    sample), and for each friendly endpoint a model of a task it serves."""
    from .friendly import TASKS

    ready = [m for m in models if m.ready and m.session is not None and _fixed(m)]
    examples = Examples()
    if not ready:
        return examples
    first = ready[0]
    assert first.session is not None
    examples.model = first.name
    examples.infer = {
        "inputs": [
            {
                "name": spec.name,
                "shape": [1, *spec.shape[1:]],
                "datatype": spec.datatype,
                "data": [0] * math.prod(spec.shape[1:]),
            }
            for spec in first.session.inputs
        ]
    }
    for endpoint, tasks in TASKS.items():
        model = next((m for m in ready if m.manifest and m.manifest.task in tasks), None)
        if model is None or model.session is None:
            continue
        if endpoint == "generate":
            examples.friendly["/generate"] = {"model": model.name, "n": 2, "seed": 7}
        elif len(model.session.inputs) == 1:
            width = math.prod(model.session.inputs[0].shape[1:])
            examples.friendly[f"/{endpoint}"] = {"model": model.name, "rows": [[0.0] * width]}
    served = [m for m in models if m.ready and m.manifest is not None]
    texts = ["A man is eating food.", "Shares fell after the rate decision."]
    for m in served:
        task = m.manifest.task if m.manifest else ""
        if m.text is not None and task == "embedding":
            examples.friendly.setdefault("/embed", {"model": m.name, "texts": texts})
        if task == "forecasting":
            history = [float(v) for v in range(40, 160, 5)]
            examples.friendly.setdefault(
                "/forecast", {"model": m.name, "history": history, "horizon": 12}
            )
    return examples


def _fixed(model: LoadedModel) -> bool:
    """Every input has a batch axis, fixed other dimensions, and numbers (not strings)."""
    assert model.session is not None
    return all(
        s.shape[:1] == (-1,) and -1 not in s.shape[1:] and s.datatype != "BYTES"
        for s in model.session.inputs
    )
