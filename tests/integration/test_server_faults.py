"""Genuine server faults: a 500 with a JSON body, never a traceback to the client, and
always counted."""

from __future__ import annotations

from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.store import ModelStore
from tests.conftest import asgi_post

BODY = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}


_post = asgi_post


def test_every_500_is_counted(tiny_repo: ModelRepository, monkeypatch) -> None:
    """A genuine server fault (onnxruntime failing on valid input, a bug in a route) is a 500
    with a JSON body, and it is counted: in slimserve_requests_total for inference, in
    slimserve_http_errors_total for any route."""
    from prometheus_client import REGISTRY

    settings = Settings(model_repository=tiny_repo.root)
    store = ModelStore(tiny_repo, settings)
    store.load_all()
    app = HttpApp(DataPlane(store), dict)

    def broken(feeds, output_names=None):
        raise RuntimeError("the GPU fell off")

    monkeypatch.setattr(store.models["alpha"].batcher, "_run", broken)

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    inference = {
        "model": "alpha",
        "version": "1",
        "variant": "fp32",
        "outcome": "error",
        "protocol": "http",
    }
    before = value("slimserve_requests_total", **inference)
    before_http = value("slimserve_http_errors_total", endpoint="v2", status="500")
    r = _post(app, "/v2/models/alpha/infer", json=BODY)
    assert r.status_code == 500 and "inference failed" in r.json()["error"]
    assert value("slimserve_requests_total", **inference) == before + 1
    assert value("slimserve_http_errors_total", endpoint="v2", status="500") == before_http + 1

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(app.v2.dataplane, "repository_index", bug)
    r = _post(app, "/v2/repository/index")
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}
    assert value("slimserve_http_errors_total", endpoint="v2", status="500") == before_http + 2
