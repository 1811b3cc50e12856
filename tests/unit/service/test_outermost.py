"""The one place that relies on BentoML internals fails loudly when an upgrade moves them."""

from __future__ import annotations

import pytest

from service.http.outermost import Front, check_bentoml_internals


def test_bentoml_still_builds_the_worker_app_through_to_asgi() -> None:
    check_bentoml_internals()


class _Routes:
    """What a Starlette app shows of its routes: paths with methods, and mounts."""

    class Route:
        def __init__(self, path: str) -> None:
            self.path, self.methods = path, {"GET"}

    class Mount:
        def __init__(self, path: str) -> None:
            self.path = path

    def __init__(self) -> None:
        self.routes = [self.Route("/metrics"), self.Route("/"), self.Mount("/static_content")]
        self.routes.append(self.Route("/items/{id}"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2", "lean"),
        ("/v2/models/m/infer", "lean"),
        ("/classify", "lean"),  # a lean path, although BentoML has a route for it too
        ("/metrics", "bento"),
        ("/", "bento"),
        ("/static_content/app.js", "bento"),
        ("/items/7", "bento"),
        ("/v20", "lean"),  # BentoML has no route for it: the lean app answers 404
        ("/x%0Ay", "lean"),
    ],
)
def test_front_dispatch(path: str, expected: str) -> None:
    import asyncio

    seen = []

    async def lean(scope, receive, send):
        seen.append("lean")

    async def bento(scope, receive, send):
        seen.append("bento")

    bento.router = _Routes()  # type: ignore[attr-defined]
    front = Front(lean, bento, "/v2", ["/classify"])
    asyncio.run(front({"type": "http", "path": path}, None, None))
    asyncio.run(front({"type": "lifespan"}, None, None))
    assert seen == [expected, "bento"]


def _probe_service(name: str):
    import bentoml

    @bentoml.service(name=name)
    class Probe:
        @bentoml.api
        def hello(self) -> str:
            return "hi"

    return Probe


async def _lean(scope, receive, send):
    body = b'{"lean": true}'
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _get(app, path: str) -> tuple[int, bytes]:
    import asyncio

    import httpx

    async def go():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.get(path)
            return r.status_code, r.content

    return asyncio.run(go())


def test_the_worker_app_routes_v2_to_the_lean_app_first() -> None:
    from service.http.outermost import Front, mount_outermost, require_live

    service = _probe_service("outermost-probe-a")
    assert mount_outermost(service, _lean, "/v2") == "outermost"
    app = service.to_asgi(is_main=True)  # what BentoML's worker calls
    assert isinstance(app, Front) and app.lean is _lean
    assert {"/livez", "/readyz", "/metrics", "/docs.json", "/hello"} <= app.bento_paths
    assert require_live("outermost-probe-a") == "outermost"
    assert _get(app, "/v2/models/x") == (200, b'{"lean": true}')


def test_services_are_matched_by_name_not_identity() -> None:
    from service.http.outermost import Front, mount_outermost

    mount_outermost(_probe_service("outermost-probe-b"), _lean, "/v2")
    reimported = _probe_service("outermost-probe-b")  # the module imported a second time
    assert isinstance(reimported.to_asgi(is_main=True), Front)


def test_changed_internals_fall_back_to_the_public_mount(monkeypatch, caplog) -> None:
    from service.http import outermost

    def moved() -> None:
        raise RuntimeError("to_asgi is gone")

    monkeypatch.setattr(outermost, "check_bentoml_internals", moved)
    service = _probe_service("outermost-probe-c")
    assert outermost.mount_outermost(service, _lean, "/v2") == "mounted"
    assert "to_asgi is gone" in caplog.text and "mount_asgi_app" in caplog.text
    assert [(app, path) for app, path, _ in service.mount_apps] == [(_lean, "/v2")]
    assert outermost.require_live("outermost-probe-c") == "mounted"
    app = service.to_asgi(is_main=True)
    assert not isinstance(app, outermost.Front)
    status, body = _get(app, "/v2/models/x")
    assert (status, body) == (200, b'{"lean": true}')


def test_a_worker_without_the_route_refuses_to_start() -> None:
    from service.http.outermost import OutermostRouteDead, mount_outermost, require_live

    mount_outermost(_probe_service("outermost-probe-d"), _lean, "/v2")  # to_asgi never called
    with pytest.raises(OutermostRouteDead, match="outermost-probe-d.*every /v2 call a 404"):
        require_live("outermost-probe-d")


def test_the_slimserve_service_is_registered_outermost() -> None:
    from service.http import bento, outermost

    assert outermost._REGISTRY["slimserve"][0] == "/v2"
    assert bento.SlimServe.name == "slimserve"
