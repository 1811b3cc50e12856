"""The plain-JSON endpoints (classify, regress, transform, generate) on the real server."""

from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import pytest

from export.data import load

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def post(server, endpoint: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/{endpoint}", json=body, timeout=30)


def test_classify_matches_the_v2_answer_with_top_k(server) -> None:
    ds = load("digits")
    rows = ds.x_test[:20]
    r = post(server, "classify", model="digits-cnn", rows=rows.tolist(), top_k=3)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 20 and all(len(p["top_k"]) == 3 for p in preds)
    assert all(p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] for p in preds)
    accuracy = np.mean([int(p["label"]) == y for p, y in zip(preds, ds.y_test[:20], strict=True)])
    assert accuracy >= 0.9


def test_regress_gives_one_value_per_row(server) -> None:
    x = load("diabetes").x_test[:4]
    r = post(server, "regress", model="diabetes-linear", rows=x.tolist())
    assert r.status_code == 200
    values = r.json()["values"]
    assert len(values) == 4 and all(isinstance(v, float) for v in values)


def test_transform_pca_embeddings(server) -> None:
    r = post(server, "transform", model="digits-pca", rows=load("digits").x_test[:3].tolist())
    assert r.status_code == 200
    assert np.array(r.json()["outputs"]["embedding"]).shape == (3, 16)


def test_generate_is_seeded_and_encodes_png(server) -> None:
    a = post(server, "generate", model="digits-gan", n=3, seed=5, labels=[1, 2, 3]).json()
    b = post(server, "generate", model="digits-gan", n=3, seed=5, labels=[1, 2, 3]).json()
    c = post(server, "generate", model="digits-gan", n=3, seed=6, labels=[1, 2, 3]).json()
    assert a["images"] == b["images"] != c["images"]
    assert np.array(a["images"]).shape == (3, 64)
    png = post(server, "generate", model="digits-gan", n=2, format="png", scale=4).json()
    raw = base64.b64decode(png["images"][0])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", raw[16:24]) == (32, 32)  # 8x8 digits, 4x4 blocks


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "message"),
    [
        (
            "classify",
            {"model": "digits-cnn", "rows": [[0.5] * 10]},
            400,
            "expected 64 numbers per row (input 'pixels' has shape [-1, 1, 8, 8]), got 10",
        ),
        ("classify", {"model": "nope", "rows": [[1.0]]}, 404, "model 'nope' is not served here"),
        (
            "regress",
            {"model": "digits-cnn", "rows": [[0.0] * 64]},
            400,
            "/regress serves regression models",
        ),
        (
            "generate",
            {"model": "digits-gan", "n": 2, "labels": [1]},
            400,
            "'labels': expected 2 values",
        ),
        ("classify", {"model": "iris-knn", "rows": [[1.0] * 4]}, 400, "failed to load"),
        (
            "classify",
            {"model": "digits-cnn", "rows": [["x"] * 64]},
            400,
            "/classify: 'rows.0.0': Input should be a valid number (got 'x')",
        ),
        ("classify", {"model": "digits-cnn", "rows": []}, 400, "'rows': List should have"),
        ("classify", {"model": "digits-cnn", "rows": [[0.0] * 64], "top_k": 0}, 400, "'top_k'"),
        ("classify", {"model": "digits-cnn", "rows": [[0.0] * 64], "topk": 2}, 400, "'topk'"),
        ("generate", {"model": "digits-gan", "seed": -1}, 400, "'seed': Input should be"),
        ("generate", {"model": "digits-gan", "labels": [2**64]}, 400, "'labels.0'"),
        (
            "generate",
            {"model": "digits-gan", "n": 1, "labels": [10]},
            400,
            "'labels' for model 'digits-gan': expected classes 0..9, got 10",
        ),
        ("generate", {"model": "digits-gan", "format": "gif"}, 400, "'format'"),
        ("regress", {"model": "diabetes-linear", "rows": [[True] * 10]}, 400, "'rows.0.0'"),
        ("transform", {"rows": [[1.0]]}, 400, "'model': Field required"),
    ],
)
def test_friendly_errors(server, endpoint, body, status, message) -> None:
    """Every error has the one shape {"error": "..."} the OpenAPI document publishes."""
    r = post(server, endpoint, **body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and message in r.json()["error"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "message"),
    [
        (b"{", {"content-type": "application/json"}, 400, "Invalid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "/classify:"),
        (b"\xff\xfe", {"content-type": "application/json"}, 400, "/classify:"),
        (b"rows=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "JSON body"),
        (b"", {}, 400, "/classify:"),
    ],
)
def test_friendly_bodies_that_are_not_json_objects(server, content, headers, status, message):
    r = httpx.post(f"{server.url}/classify", content=content, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_friendly_endpoints_take_post_only(server) -> None:
    r = httpx.get(f"{server.url}/classify", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json() == {"error": "/classify takes POST, got GET"}


def test_friendly_endpoints_are_in_the_openapi_page(server) -> None:
    paths = httpx.get(f"{server.url}/docs.json").json()["paths"]
    assert {"/classify", "/regress", "/transform", "/generate"} <= set(paths)


def test_no_traceback_for_client_errors(server) -> None:
    post(server, "classify", model="digits-cnn", rows=[["x"]])
    assert "Traceback" not in server.log_text()
