"""The Ray Serve application's parts that need no Ray running: groups, deployment options,
replica settings, the metrics merge, the router's model lookup and the in-process ASGI call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from service.core.repository import ModelNotFoundError, ModelRepository  # noqa: E402
from service.core.settings import ModelGroup, RayServeSettings, Settings  # noqa: E402
from service.rayserve.app import deployment_options, replica_settings  # noqa: E402
from service.rayserve.board import federate  # noqa: E402
from service.rayserve.forward import Forwarded, call_asgi  # noqa: E402
from service.rayserve.groups import DEFAULT_GROUP, Grouping, GroupRepository  # noqa: E402
from service.rayserve.router import _model_of  # noqa: E402

GRACE = Settings().graceful_shutdown_s
NAMES = ["digits-cnn", "digits-mlp", "iris-knn", "text-minilm"]


def grouping(**groups) -> Grouping:
    return Grouping.from_settings(RayServeSettings(groups=groups), NAMES)


def test_without_groups_every_model_is_in_the_default_group():
    g = grouping()
    assert [x.name for x in g.groups] == [DEFAULT_GROUP]
    assert all(g.group_of(n).name == DEFAULT_GROUP for n in [*NAMES, "added-later"])


def test_groups_claim_by_name_or_pattern_in_order_and_the_rest_is_default():
    g = grouping(vision=["digits-*"], cnn=["digits-cnn", "iris-knn"])
    assert [x.name for x in g.groups] == ["vision", "cnn", DEFAULT_GROUP]
    assert g.group_of("digits-cnn").name == "vision"  # the first group that matches
    assert g.group_of("iris-knn").name == "cnn"
    assert g.group_of("text-minilm").name == DEFAULT_GROUP


def test_no_default_group_when_the_groups_claim_every_model():
    g = grouping(vision=["digits-*"], other=ModelGroup(models=["iris-knn", "text-*"]))
    assert [x.name for x in g.groups] == ["vision", "other"]
    assert g.group_of("new-model") is None


@pytest.mark.parametrize("name", ["default", "has space", "", "x" * 64])
def test_a_bad_group_name_is_refused_with_the_setting_named(name):
    with pytest.raises(ValueError, match=r"SLIMSERVE_RAY_GROUPS: group name .* is not allowed"):
        grouping(**{name: ["digits-cnn"]})


def test_a_group_that_serves_no_model_is_refused_with_the_repository_listed():
    with pytest.raises(ValueError, match=r"group 'ghosts' \(ghost-\*\) serves no model .*iris-knn"):
        grouping(ghosts=["ghost-*"])


def test_groups_come_from_json_in_the_environment(monkeypatch):
    monkeypatch.setenv(
        "SLIMSERVE_RAY_GROUPS",
        '{"vision": ["digits-*"], "text": {"models": ["text-*"], "num_replicas": 2}}',
    )
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    s = RayServeSettings()
    assert s.address == "127.0.0.1:6379"
    assert s.groups["vision"] == ["digits-*"]
    assert s.groups["text"] == ModelGroup(models=["text-*"], num_replicas=2)


def test_a_group_repository_lists_and_opens_its_own_models_only(tiny_repo: ModelRepository):
    g = Grouping.from_settings(RayServeSettings(groups={"a": ["alpha"]}), tiny_repo.names())
    alpha = GroupRepository(tiny_repo.root, g, "a")
    rest = GroupRepository(tiny_repo.root, g, DEFAULT_GROUP)
    assert alpha.names() == ["alpha"] and rest.names() == ["beta"]
    assert alpha.versions("alpha") == [1]
    with pytest.raises(ModelNotFoundError, match="'beta' is not served by group 'a'"):
        alpha.versions("beta")


def test_deployment_options_fixed_replicas_per_group_or_for_all():
    s = RayServeSettings(num_replicas=3, replica_cpus=0.5, max_ongoing_requests=64)
    g = Grouping.from_settings(
        RayServeSettings(groups={"v": ModelGroup(models=["digits-*"], num_replicas=2)}), NAMES
    )
    assert deployment_options(g["v"], s, GRACE) == {
        "name": "group-v",
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 0.5},
        "logging_config": {"enable_access_log": False},
        "graceful_shutdown_timeout_s": 10,
        "num_replicas": 2,
    }
    assert deployment_options(g[DEFAULT_GROUP], s, GRACE)["num_replicas"] == 3


def test_deployment_options_autoscaling_for_all_or_one_group():
    auto = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    s = RayServeSettings(autoscaling=auto)
    mine = {"min_replicas": 2, "max_replicas": 3}
    g = Grouping.from_settings(
        RayServeSettings(groups={"v": ModelGroup(models=["digits-*"], autoscaling=mine)}), NAMES
    )
    assert deployment_options(g["v"], s, GRACE)["autoscaling_config"] == mine
    options = deployment_options(g[DEFAULT_GROUP], s, GRACE)
    assert options["autoscaling_config"] == auto and "num_replicas" not in options


def test_an_autoscaling_config_ray_refuses_names_the_setting():
    s = RayServeSettings(autoscaling={"min_replicas": 5, "max_replicas": 2})
    g = grouping()
    with pytest.raises(ValueError, match=r"SLIMSERVE_RAY_AUTOSCALING: group 'default': not an"):
        deployment_options(g[DEFAULT_GROUP], s, GRACE)
    s = RayServeSettings(autoscaling={"max_replicas": 2, "no_such_field": 1})
    with pytest.raises(ValueError, match="not an autoscaling config"):
        deployment_options(g[DEFAULT_GROUP], s, GRACE)


def test_replicas_serve_with_an_absolute_repository_and_threads_for_their_cpus(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    s = replica_settings(
        Settings(model_repository=Path("models")), RayServeSettings(replica_cpus=2)
    )
    assert s.model_repository == tmp_path / "models"
    assert s.intra_op_threads == 2 and s.grpc_port == 0 and s.runtime_dir is None
    explicit = Settings(
        model_repository=Path("models"), model_control="explicit", intra_op_threads=3
    )
    s = replica_settings(explicit, RayServeSettings(app_name="app1"))
    assert s.runtime_dir == tmp_path / "models" / ".slimserve-ray" / "app1"
    assert s.intra_op_threads == 3  # set by the user: kept


def _exposition(count: int, seconds: float) -> str:
    registry = CollectorRegistry()
    requests = Counter("slimserve_requests", "Requests.", ["model"], registry=registry)
    requests.labels("m").inc(count)
    duration = Histogram("slimserve_d_seconds", "D.", ["model"], buckets=(1.0,), registry=registry)
    duration.labels("m").observe(seconds)
    return generate_latest(registry).decode()


def test_federate_merges_replicas_with_their_labels():
    text = federate(
        [
            ({"replica": "r1", "node": "n1"}, _exposition(3, 0.5)),
            ({"replica": "r2", "node": "n2"}, _exposition(4, 2.0)),
        ]
    ).decode()
    assert text.count("# TYPE slimserve_requests_total counter") == 1
    assert 'slimserve_requests_total{model="m",node="n1",replica="r1"} 3.0' in text
    assert 'slimserve_requests_total{model="m",node="n2",replica="r2"} 4.0' in text
    assert 'slimserve_d_seconds_bucket{le="1.0",model="m",node="n2",replica="r2"} 0.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert len(families["slimserve_d_seconds"].samples) == 2 * 4  # 2 buckets, sum, count


@pytest.mark.parametrize(
    ("method", "path", "body", "model"),
    [
        ("POST", "/v2/models/digits-cnn/infer", b"", "digits-cnn"),
        ("GET", "/v2/models/digits-cnn/versions/2/ready", b"", "digits-cnn"),
        ("POST", "/v2/repository/models/iris-knn/load", b"", "iris-knn"),
        ("POST", "/classify", b'{"model": "iris-knn", "rows": [[1, 2, 3, 4]]}', "iris-knn"),
        ("POST", "/classify", b"not json", None),
        ("POST", "/classify", b'{"model": 3}', None),
        ("GET", "/v2", b"", None),
        ("GET", "/v2/health/live", b"", None),
    ],
)
def test_the_router_finds_the_model_a_request_names(method, path, body, model):
    assert _model_of(Forwarded(method, path, body=body)) == model


def test_call_asgi_gives_the_app_the_request_and_gathers_its_answer():
    async def app(scope, receive, send):
        message = await receive()
        body = f"{scope['method']} {scope['path']} {scope['query_string'].decode()} ".encode()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": message["body"]})

    answer = asyncio.run(call_asgi(app, Forwarded("POST", "/p", b"q=1", [], b"data")))
    assert (answer.status, answer.headers, answer.body) == (
        201,
        [(b"x-a", b"1")],
        b"POST /p q=1 data",
    )


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class _Handle:
    """A Ray Serve handle's shape: ``handle.method.remote(...)`` awaited."""

    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, _Method(fn))


def _router(vision_forward=None):
    from service.rayserve.forward import Answered
    from service.rayserve.router import Router

    async def answer(group, request):
        return Answered(200, [(b"content-type", b"text/plain")], f"{group} {request.path}".encode())

    def group(name, ready=True, forward=None):
        async def is_ready():
            return {"ready": ready, "not_ready_models": {} if ready else {"m": "why"}}

        async def index(ready_only):
            return [{"name": f"{name}-model", "version": "1", "state": "READY", "reason": ""}]

        return _Handle(forward=forward or (lambda r: answer(name, r)), ready=is_ready, index=index)

    async def collect():
        return b"slimserve_x 1.0\n"

    grouping = Grouping.from_settings(
        RayServeSettings(groups={"vision": ["digits-*"], "text": ["text-*"]}), NAMES
    )
    handles = {
        "vision": group("vision", forward=vision_forward),
        "text": group("text", ready=False),
        DEFAULT_GROUP: group(DEFAULT_GROUP),
    }
    router = Router(grouping, Settings(), handles, _Handle(collect=collect))
    return router.__serve_build_asgi_app__()


def _call(app, method, path, **kwargs):
    import httpx

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_the_router_sends_each_request_to_its_models_group():
    app = _router()
    assert (
        _call(app, "POST", "/v2/models/digits-cnn/infer").text
        == "vision /v2/models/digits-cnn/infer"
    )
    assert _call(app, "GET", "/v2/models/iris-knn").text == "default /v2/models/iris-knn"
    got = _call(app, "POST", "/classify", json={"model": "text-minilm", "texts": ["a"]})
    assert got.text == "text /classify"


def test_the_router_merges_health_and_index_across_groups():
    app = _router()
    got = _call(app, "GET", "/v2/health/ready")
    assert got.status_code == 503 and got.headers["retry-after"] == "1"
    doc = got.json()
    assert not doc["ready"] and doc["not_ready_models"] == {"m": "why"}
    assert doc["groups"]["vision"]["ready"] and not doc["groups"]["text"]["ready"]
    names = [m["name"] for m in _call(app, "POST", "/v2/repository/index", json={}).json()]
    assert names == ["default-model", "text-model", "vision-model"]
    assert _call(app, "GET", "/metrics").text == "slimserve_x 1.0\n"


@pytest.mark.parametrize(
    ("raised", "status", "message"),
    [
        ("backpressure", 503, "every replica holds as many requests as it takes"),
        ("died", 503, "the replica answering this request stopped (ActorDiedError); retry"),
        ("bug", 500, "internal server error"),
    ],
)
def test_a_failing_group_is_a_retriable_503_and_a_bug_a_500(raised, status, message):
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    async def forward(request):
        if raised == "backpressure":
            raise BackPressureError(num_queued_requests=5, max_queued_requests=5)
        if raised == "died":
            raise ActorDiedError()
        raise KeyError("a bug")

    got = _call(_router(forward), "POST", "/v2/models/digits-cnn/infer", content=b"{}")
    assert got.status_code == status and message in got.json()["error"]
    assert (got.headers.get("retry-after") == "1") == (status == 503)
