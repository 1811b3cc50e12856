"""Locust scenarios for a running slimserve; payloads are rows of the real test splits.

Scenarios (pick one or more by class name):

- ``V2JsonUser``: one digit per v2 JSON request to digits-cnn.
- ``V2BinaryUser``: 32 digits per request with Triton's binary tensor extension.
- ``FriendlyUser``: the plain-JSON endpoints (classify, regress, transform, generate).
- ``MixedUser``: v2 JSON across several models at once (``--models``).
- ``TextUser``: the text and sequence models: one text of mixed length per ``/embed``
  (text-minilm), ``/classify`` with texts (news-minilm), v2 ``text`` BYTES requests, and
  ``/forecast`` (sunspots-lstm).
- ``GrpcUser``: the v2 gRPC service: one digit, and 32 digits in ``raw_input_contents``, per
  ``ModelInfer`` to digits-cnn, at ``--grpc-target`` (default: the ``-H`` host, port 8001).

``make loadtest`` runs one headless, bounded in users and time (see the Makefile), e.g.
``locust -f loadtest/locustfile.py --headless -u 16 -t 30s -H http://127.0.0.1:3000 MixedUser``.

The rows come from ``samples.npz`` beside this file (the datasets' test splits, written by
``python -m loadtest.samples``), so the load generator needs only locust and numpy: neither
scikit-learn nor anything of slimserve.
"""

from __future__ import annotations

import gzip
import json
import random
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, User, between, events, task

__all__ = [
    "V2JsonUser",
    "V2BinaryUser",
    "FriendlyUser",
    "MixedUser",
    "TextUser",
    "GrpcUser",
    "PAYLOADS",
]

#: model -> (dataset, input name, per-sample shape), for the zoo models a scenario may call
PAYLOADS: dict[str, tuple[str, str, list[int]]] = {
    "digits-cnn": ("digits", "pixels", [1, 8, 8]),
    "digits-mlp": ("digits", "pixels", [64]),
    "digits-logreg": ("digits", "pixels", [64]),
    "digits-svc": ("digits", "pixels", [64]),
    "digits-pca": ("digits", "pixels", [64]),
    "digits-kmeans": ("digits", "pixels", [64]),
    "diabetes-linear": ("diabetes", "features", [10]),
    "diabetes-svr": ("diabetes", "features", [10]),
    "diabetes-random-forest": ("diabetes", "features", [10]),
    "iris-knn": ("iris", "features", [4]),
    "wine-decision-tree": ("wine", "features", [13]),
    "breast-cancer-random-forest": ("breast-cancer", "features", [30]),
}
DEFAULT_MIXED = "digits-cnn,digits-mlp,diabetes-svr,iris-knn,wine-decision-tree,digits-pca"
#: dataset -> its test split, (rows, features) float32; see loadtest/samples.py
SAMPLES = Path(__file__).resolve().with_name("samples.npz")
#: texts of mixed length and a sunspot history; see loadtest/texts.py
TEXTS = Path(__file__).resolve().with_name("texts.json.gz")


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--models",
        default=DEFAULT_MIXED,
        help="Comma-separated models for MixedUser (from the zoo).",
    )
    parser.add_argument(
        "--grpc-target",
        default="",
        help="host:port of the v2 gRPC service for GrpcUser (default: the -H host, port 8001).",
    )


@cache
def _test_splits() -> dict[str, np.ndarray]:
    with np.load(SAMPLES, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


@cache
def _texts() -> dict[str, Any]:
    with gzip.open(TEXTS, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def _test_split(dataset: str) -> np.ndarray:
    return _test_splits()[dataset]


def _rows(model: str) -> np.ndarray:
    dataset, _, shape = PAYLOADS[model]
    return _test_split(dataset).reshape(-1, *shape)


@events.init.add_listener
def _load_payloads(**_kwargs: Any) -> None:
    """Load every test split before the clock starts: a user's first request is then a
    request, not a file read blocking the event loop (and a missing dataset fails here)."""
    for dataset in {d for d, _, _ in PAYLOADS.values()}:
        _test_split(dataset)
    _texts()


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _json_body(model: str, x: np.ndarray) -> bytes:
    _, name, _ = PAYLOADS[model]
    return _dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )


class _Slimserve(FastHttpUser):
    abstract = True
    wait_time = between(0, 0.002)

    def infer(
        self, model: str, body: bytes, headers: dict[str, str] | None = None, samples: int = 1
    ) -> None:
        with self.client.post(
            f"/v2/models/{model}/infer",
            data=body,  # type: ignore[arg-type]  # locust sends bytes; its hint says str
            name=f"v2 infer {model}",
            headers={"content-type": "application/json", **(headers or {})},
            catch_response=True,
        ) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif "inference-header-content-length" not in r.headers:
                outputs = json.loads(r.content)["outputs"]
                if outputs[0]["shape"][0] != samples:
                    r.failure(f"expected {samples} rows back, got {outputs[0]['shape']}")


class V2JsonUser(_Slimserve):
    def on_start(self) -> None:
        self.x = _rows("digits-cnn")

    @task
    def one_digit(self) -> None:
        i = random.randrange(len(self.x))
        self.infer("digits-cnn", _json_body("digits-cnn", self.x[i : i + 1]))


class V2BinaryUser(_Slimserve):
    def on_start(self) -> None:
        self.x = _rows("digits-cnn")

    @task
    def thirty_two_digits(self) -> None:
        i = random.randrange(len(self.x) - 32)
        x = np.ascontiguousarray(self.x[i : i + 32])
        header = _dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
            }
        )
        self.infer(
            "digits-cnn",
            header + x.tobytes(),
            {
                "Inference-Header-Content-Length": str(len(header)),
                "content-type": "application/octet-stream",
            },
            samples=32,
        )


class FriendlyUser(_Slimserve):
    def on_start(self) -> None:
        self.digits = _test_split("digits")
        self.diabetes = _test_split("diabetes")

    def _post(self, endpoint: str, body: dict) -> None:
        with self.client.post(f"/{endpoint}", json=body, name=endpoint, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(3)
    def classify(self) -> None:
        i = random.randrange(len(self.digits))
        self._post(
            "classify", {"model": "digits-cnn", "rows": self.digits[i : i + 1].tolist(), "top_k": 3}
        )

    @task(2)
    def regress(self) -> None:
        i = random.randrange(len(self.diabetes))
        rows = self.diabetes[i : i + 1].tolist()
        self._post("regress", {"model": "diabetes-linear", "rows": rows})

    @task(2)
    def transform(self) -> None:
        i = random.randrange(len(self.digits))
        self._post("transform", {"model": "digits-pca", "rows": self.digits[i : i + 1].tolist()})

    @task(1)
    def generate(self) -> None:
        self._post(
            "generate",
            {"model": "digits-gan", "n": 4, "seed": random.randrange(1000), "format": "png"},
        )


class MixedUser(_Slimserve):
    def on_start(self) -> None:
        names = [m.strip() for m in self.environment.parsed_options.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in PAYLOADS]
        if unknown:
            raise ValueError(f"--models: no payload for {unknown}; known: {sorted(PAYLOADS)}")
        self.rows = {m: _rows(m) for m in names}

    @task
    def any_model(self) -> None:
        model = random.choice(list(self.rows))
        x = self.rows[model]
        i = random.randrange(len(x))
        self.infer(model, _json_body(model, x[i : i + 1]))


class TextUser(_Slimserve):
    """Text in: mixed lengths (4 to 300 words), so padding and bucketing show."""

    def on_start(self) -> None:
        self.texts = _texts()["mixed"]
        self.history = _texts()["sunspots"]

    def _post(self, endpoint: str, body: dict, name: str) -> None:
        with self.client.post(f"/{endpoint}", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(4)
    def embed(self) -> None:
        text = random.choice(self.texts)
        self._post("embed", {"model": "text-minilm", "texts": [text], "truncate": True}, "embed")

    @task(2)
    def classify(self) -> None:
        body = {"model": "news-minilm", "texts": [random.choice(self.texts)], "truncate": True}
        self._post("classify", body, "classify text")

    @task(2)
    def v2_text(self) -> None:
        texts = random.sample(self.texts, 4)
        body = _dumps(
            {
                "inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": texts}],
                "parameters": {"truncate": True},
            }
        )
        self.infer("text-minilm", body, samples=4)

    @task(1)
    def forecast(self) -> None:
        start = random.randrange(0, len(self.history) - 120)
        body = {"model": "sunspots-lstm", "history": self.history[start : start + 120]}
        self._post("forecast", body, "forecast")


class GrpcUser(User):
    """The v2 gRPC service (``inference.GRPCInferenceService``) with the stubs tritonclient
    ships: one digit or 32 digits per ``ModelInfer``, tensors in ``raw_input_contents`` (what
    ``tritonclient.grpc`` sends). gRPC's blocking calls yield to Locust's gevent loop."""

    wait_time = between(0, 0.002)

    def on_start(self) -> None:
        import grpc
        import grpc.experimental.gevent as grpc_gevent
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        grpc_gevent.init_gevent()  # before the first channel: calls then yield to gevent
        self.pb = service_pb2
        target = self.environment.parsed_options.grpc_target
        if not target:
            host = (self.host or "http://127.0.0.1").split("://")[-1].split("/")[0]
            target = f"{host.rsplit(':', 1)[0]}:8001"
        self.channel = grpc.insecure_channel(target)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.x = _rows("digits-cnn")

    def on_stop(self) -> None:
        self.channel.close()

    def _infer(self, samples: int) -> None:
        i = random.randrange(len(self.x) - samples)
        x = np.ascontiguousarray(self.x[i : i + samples], dtype="<f4")
        request = self.pb.ModelInferRequest(model_name="digits-cnn")
        request.inputs.add(name="pixels", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        start, length = time.perf_counter(), 0
        error: Exception | None = None
        try:
            response = self.stub.ModelInfer(request, timeout=30)
            length = response.ByteSize()
            shapes = {o.name: list(o.shape) for o in response.outputs}
            if shapes.get("label") != [samples]:
                error = AssertionError(f"expected {samples} labels back, got {shapes}")
        except Exception as exc:  # a gRPC status, reported as the failure
            error = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"grpc infer digits-cnn b{samples}",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    @task(4)
    def one_digit(self) -> None:
        self._infer(1)

    @task(1)
    def thirty_two_digits(self) -> None:
        self._infer(32)
