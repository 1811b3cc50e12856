"""The one place that relies on BentoML internals fails loudly when an upgrade moves them."""

from __future__ import annotations

import pytest

from service.http.outermost import PrefixDispatch, check_bentoml_internals


def test_bentoml_still_builds_the_worker_app_through_to_asgi() -> None:
    check_bentoml_internals()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/v2", "lean"), ("/v2/models/m/infer", "lean"), ("/v20", "bento"), ("/metrics", "bento")],
)
def test_prefix_dispatch(path: str, expected: str) -> None:
    import asyncio

    seen = []

    async def lean(scope, receive, send):
        seen.append("lean")

    async def bento(scope, receive, send):
        seen.append("bento")

    asyncio.run(PrefixDispatch(lean, bento, "/v2")({"type": "http", "path": path}, None, None))
    asyncio.run(PrefixDispatch(lean, bento, "/v2")({"type": "lifespan"}, None, None))
    assert seen == [expected, "bento"]
