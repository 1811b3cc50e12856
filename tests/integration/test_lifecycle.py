"""Models that change while the server runs, in-process (tiny models, seconds): the repository
API, version switches that drop nothing, refusals that keep the old version, version policies,
canary and shadow traffic, the memory budget, poll mode, and sessions that are really closed."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import pytest
from prometheus_client import REGISTRY

from service.core.repository import ModelRepository
from service.core.runtime import OrtSession
from service.core.settings import Settings
from service.http.app import HttpApp
from service.serving.dataplane import DataPlane
from service.serving.lifecycle import Lifecycle
from service.serving.store import ModelStore
from tests.conftest import publish_identity, publish_scale

ONE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _server(repo: ModelRepository, **settings):
    config = Settings(model_repository=repo.root, **settings)
    store = ModelStore(repo, config)
    lifecycle = Lifecycle(store, config)
    lifecycle.start_blocking()
    dataplane = DataPlane(store, lifecycle=lifecycle)
    return HttpApp(dataplane, dict), dataplane


class Client:
    def __init__(self, app: HttpApp) -> None:
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    async def infer(self, model: str = "alpha", path: str = "") -> httpx.Response:
        return await self.http.post(f"/v2/models/{model}{path}/infer", json=ONE)

    async def post(self, path: str, body: object = None) -> httpx.Response:
        return await self.http.post(path, json=body)

    async def index(self) -> list[dict]:
        return (await self.http.post("/v2/repository/index")).json()


def run(app: HttpApp, scenario) -> object:
    async def main():
        client = Client(app)
        try:
            return await scenario(client)
        finally:
            await client.http.aclose()

    return asyncio.run(main())


def _y(response: httpx.Response) -> list[float]:
    return response.json()["outputs"][0]["data"]


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_control_mode_none_refuses_the_api(tiny_repo: ModelRepository) -> None:
    app, _ = _server(tiny_repo)
    r = run(app, lambda c: c.post("/v2/repository/models/alpha/unload"))
    assert r.status_code == 400 and "SLIMSERVE_MODEL_CONTROL=none" in r.json()["error"]


def test_explicit_load_and_unload_through_the_api(tiny_repo: ModelRepository) -> None:
    app, dataplane = _server(tiny_repo, model_control="explicit", startup_models=["alpha"])
    sessions = OrtSession.open_count

    async def scenario(c: Client):
        out = {"beta before": (await c.infer("beta")).status_code}
        out["index before"] = await c.index()
        out["load"] = (await c.post("/v2/repository/models/beta/load")).status_code
        out["beta after"] = (await c.infer("beta")).status_code
        out["sessions loaded"] = OrtSession.open_count
        out["unload"] = (await c.post("/v2/repository/models/alpha/unload")).status_code
        out["alpha unloaded"] = (await c.infer("alpha")).json()
        out["ready index"] = (await c.post("/v2/repository/index", {"ready": True})).json()
        out["unknown"] = (await c.post("/v2/repository/models/zeta/load")).status_code
        return out

    out = run(app, scenario)
    assert out["beta before"] == 400
    assert {"name": "beta", "state": "UNAVAILABLE", "reason": "not loaded"} in out["index before"]
    assert out["load"] == 200 and out["beta after"] == 200
    assert out["sessions loaded"] == sessions + 1
    assert out["unload"] == 200
    assert out["alpha unloaded"] == {"error": "model 'alpha' is not loaded: unloaded"}
    assert out["ready index"] == [{"name": "beta", "version": "1", "state": "READY", "reason": ""}]
    assert out["unknown"] == 404
    assert OrtSession.open_count == sessions  # alpha's session was closed, not leaked


def test_a_new_version_takes_over_and_the_old_is_closed(tiny_repo: ModelRepository) -> None:
    app, dataplane = _server(tiny_repo, model_control="explicit")
    sessions = OrtSession.open_count

    async def scenario(c: Client):
        first = await c.infer()
        publish_scale(tiny_repo, "alpha", 2.0)
        load = await c.post("/v2/repository/models/alpha/load")
        second = await c.infer()
        await asyncio.sleep(0.1)  # the old version drains and closes
        return first, load, second, await c.index()

    first, load, second, index = run(app, scenario)
    assert (_y(first), first.json()["model_version"]) == ([1, 2, 3, 4], "1")
    assert load.status_code == 200
    assert (_y(second), second.json()["model_version"]) == ([2, 4, 6, 8], "2")
    assert second.headers["x-model-version"] == "2" and second.headers["x-model-variant"] == "fp32"
    alpha = [row for row in index if row["name"] == "alpha"]
    assert alpha == [{"name": "alpha", "version": "2", "state": "READY", "reason": ""}]
    assert OrtSession.open_count == sessions  # one closed, one opened


def test_a_tampered_version_is_refused_and_the_old_keeps_serving(tiny_repo: ModelRepository):
    app, _ = _server(tiny_repo, model_control="explicit")
    refused = _count("slimserve_model_loads_total", model="alpha", outcome="refused")

    async def scenario(c: Client):
        version = publish_scale(tiny_repo, "alpha", 3.0)
        onnx_file = version.path / "model.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes()[:-3] + b"xyz")
        load = await c.post("/v2/repository/models/alpha/load")
        return load, await c.infer(), await c.index()

    load, answer, index = run(app, scenario)
    assert load.status_code == 400
    assert (
        "model 'alpha' was not loaded: version 2: alpha/2/model.onnx: sha256"
        in load.json()["error"]
    )
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    rows = {row["version"]: row for row in index if row["name"] == "alpha"}
    assert rows["1"]["state"] == "READY" and rows["2"]["state"] == "UNAVAILABLE"
    assert "sha256" in rows["2"]["reason"]
    assert _count("slimserve_model_loads_total", model="alpha", outcome="refused") == refused + 1


def test_a_version_whose_outputs_break_the_manifest_is_refused_at_warm_up(
    tiny_repo: ModelRepository,
) -> None:
    from tests.conftest import write_identity_onnx

    app, _ = _server(tiny_repo, model_control="explicit")
    staging = tiny_repo.staging_dir("alpha")
    write_identity_onnx(staging / "model.onnx", width=4)
    version = tiny_repo.publish(staging, tiny_repo.get("alpha").manifest)
    manifest = json.loads((version.path / "manifest.json").read_text())
    manifest["outputs"][0]["shape"] = [-1, 5]  # the graph answers [1, 4]
    (version.path / "manifest.json").write_text(json.dumps(manifest))
    r = run(app, lambda c: c.post("/v2/repository/models/alpha/load"))
    assert r.status_code == 400
    assert (
        "output 'y' is FP32 [1, 4] on a one-sample warm-up; the manifest declares FP32 [-1, 5]"
        in r.json()["error"]
    )


def test_version_policy_latest_two_serves_both_and_each_is_addressable(
    tiny_repo: ModelRepository,
) -> None:
    policy = {"version_policy": {"latest": {"num_versions": 2}}}
    publish_scale(tiny_repo, "alpha", 2.0, serving=policy)
    app, dataplane = _server(tiny_repo)

    async def scenario(c: Client):
        meta = (await c.http.get("/v2/models/alpha")).json()
        return (
            meta,
            await c.infer(),
            await c.infer("alpha", "/versions/1"),
            await c.infer("alpha", "/versions/3"),
        )

    meta, default, one, three = run(app, scenario)
    assert meta["versions"] == ["2", "1"] and meta["parameters"]["version_policy"] == "latest 2"
    assert _y(default) == [2, 4, 6, 8] and _y(one) == [1, 2, 3, 4]
    assert three.status_code == 404 and "serving versions [2, 1]" in three.json()["error"]


def test_canary_and_shadow_split_traffic_and_shadows_are_compared(
    tiny_repo: ModelRepository,
) -> None:
    policy = {"version_policy": {"all": {}}}
    publish_scale(tiny_repo, "alpha", 2.0, serving=policy)
    app, dataplane = _server(tiny_repo, model_control="explicit")

    async def scenario(c: Client):
        canary = {"canary": {"version": 1}, "canary_weight": 1.0}
        set_canary = await c.post("/v2/repository/models/alpha/traffic", canary)
        to_canary = [await c.infer() for _ in range(5)]
        shadow = {"shadow": {"version": 1}, "shadow_fraction": 1.0}
        await c.post("/v2/repository/models/alpha/traffic", shadow)
        primary = [await c.infer() for _ in range(6)]
        await asyncio.sleep(0.8)  # the shadow copies run after the answers; counts flushed
        meta = (await c.http.get("/v2/models/alpha")).json()
        cleared = await c.http.post("/v2/repository/models/alpha/traffic", content=b"null")
        return set_canary, to_canary, primary, meta, cleared

    set_canary, to_canary, primary, meta, cleared = run(app, scenario)
    assert set_canary.status_code == 200 and set_canary.json()["canary"] == {
        "version": 1,
        "variant": None,
    }
    assert {r.json()["model_version"] for r in to_canary} == {"1"}
    assert {r.json()["model_version"] for r in primary} == {"2"}  # the shadow never answers
    shadow = meta["parameters"]["shadow"]
    assert shadow["target"] == "version 1" and shadow["compared_samples"] == 6
    assert shadow["agreement"] == 0.0 and shadow["max_abs_difference"] == 4.0
    assert (
        _count("slimserve_shadow_comparisons_total", model="alpha", shadow="v1", outcome="disagree")
        >= 6
    )
    assert cleared.json() is None


def test_a_bad_traffic_policy_is_a_400_naming_the_field(tiny_repo: ModelRepository) -> None:
    app, _ = _server(tiny_repo, model_control="explicit")
    r = run(app, lambda c: c.post("/v2/repository/models/alpha/traffic", {"canary_weight": 2}))
    assert r.status_code == 400 and "canary_weight" in r.json()["error"]


def test_the_memory_budget_evicts_the_least_recently_used_and_reloads_it(tmp_path) -> None:
    repo = ModelRepository(tmp_path / "models")
    for name in ("m1", "m2", "m3"):
        publish_scale(repo, name, 1.0, width=256)  # about 4 kB each... budget below
    size = repo.get("m1").manifest.files["model.onnx"].bytes
    budget_mb = (2.5 * size) / 2**20
    app, dataplane = _server(
        repo, model_control="explicit", startup_models=["m1", "m2"], memory_budget_mb=0
    )
    dataplane.lifecycle.settings = dataplane.settings.model_copy(
        update={"memory_budget_mb": budget_mb}
    )
    body = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]}

    async def scenario(c: Client):
        await c.http.post("/v2/models/m2/infer", json=body)  # m1 is the least recently used
        load = await c.post("/v2/repository/models/m3/load")
        index = {row["name"]: row for row in await c.index()}
        again = await c.http.post("/v2/models/m1/infer", json=body)
        index_after = {row["name"]: row for row in await c.index()}
        return load, index, again, index_after

    load, index, again, after = run(app, scenario)
    assert load.status_code == 200
    assert index["m1"]["state"] == "UNAVAILABLE" and "evicted" in index["m1"]["reason"]
    assert index["m3"]["state"] == "READY"
    assert again.status_code == 200  # loaded again for this request: a cold start
    assert after["m1"]["state"] == "READY" and after["m2"]["state"] == "UNAVAILABLE"
    assert (
        REGISTRY.get_sample_value("slimserve_model_cold_start_seconds_count", {"model": "m1"}) or 0
    ) >= 1


def test_poll_mode_picks_up_new_complete_versions_and_drops_removed_ones(
    tiny_repo: ModelRepository,
) -> None:
    app, dataplane = _server(tiny_repo, model_control="poll")
    lifecycle = dataplane.lifecycle

    async def scenario(c: Client):
        # a version copied by hand, its file not complete yet: not loaded
        half = tiny_repo.root / "alpha" / "2"
        publish_scale(tiny_repo, "alpha", 2.0)
        full = (half / "model.onnx").read_bytes()
        (half / "model.onnx").write_bytes(full[: len(full) // 2])
        await lifecycle.poll_once()
        during = await c.infer()
        (half / "model.onnx").write_bytes(full)  # the copy finished
        await lifecycle.poll_once()
        after = await c.infer()
        publish_identity(tiny_repo, "gamma")  # a new model
        shutil.rmtree(tiny_repo.root / "beta")  # a removed one
        await lifecycle.poll_once()
        return during, after, await c.infer("gamma"), await c.infer("beta")

    during, after, gamma, beta = run(app, scenario)
    assert during.json()["model_version"] == "1"
    assert after.json()["model_version"] == "2" and _y(after) == [2, 4, 6, 8]
    assert gamma.status_code == 200 and beta.status_code == 404


def test_requests_in_flight_finish_on_the_old_version(tiny_repo: ModelRepository) -> None:
    """The switch happens while a request is queued on version 1: it answers from version 1,
    and version 1 is closed only afterwards."""
    import threading

    app, dataplane = _server(tiny_repo, model_control="explicit")
    old = dataplane.store.entries["alpha"].primary()
    gate = threading.Event()
    run_batch = old.default.batcher._run
    old.default.batcher._run = lambda feeds: (gate.wait(5), run_batch(feeds))[1]

    async def scenario(c: Client):
        pending = asyncio.ensure_future(c.infer())
        await asyncio.sleep(0.05)  # queued on version 1, held at the gate
        publish_scale(tiny_repo, "alpha", 2.0)
        load = await c.post("/v2/repository/models/alpha/load")
        new = await c.infer()
        assert old.state == "UNLOADING" and old.default.session is not None
        gate.set()
        held = await pending
        await asyncio.sleep(0.1)
        return load, new, held

    load, new, held = run(app, scenario)
    assert load.status_code == 200 and new.json()["model_version"] == "2"
    assert held.status_code == 200 and held.json()["model_version"] == "1"
    assert old.default.session.closed


@pytest.mark.slow
def test_load_unload_and_infer_interleaved_leave_no_session_behind(tiny_repo) -> None:
    """Many tasks loading, unloading and calling the same models for a few seconds: only
    the documented answers (200; 400 'not loaded' while unloaded; 503 while loading), and
    every session opened is closed at the end."""
    app, dataplane = _server(tiny_repo, model_control="explicit")
    baseline = OrtSession.open_count

    async def scenario(c: Client):
        statuses: dict[int, int] = {}
        until = asyncio.get_running_loop().time() + 5

        async def caller(model: str):
            while asyncio.get_running_loop().time() < until:
                r = await c.infer(model)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                await asyncio.sleep(0.001)  # in-process calls never block: let others run

        async def controller(model: str):
            while asyncio.get_running_loop().time() < until:
                await c.post(f"/v2/repository/models/{model}/unload")
                await asyncio.sleep(0.02)
                await c.post(f"/v2/repository/models/{model}/load")
                await asyncio.sleep(0.1)

        await asyncio.gather(
            *(caller(m) for m in ("alpha", "beta") for _ in range(8)),
            controller("alpha"),
            controller("beta"),
        )
        await c.post("/v2/repository/models/alpha/load")
        await c.post("/v2/repository/models/beta/load")
        await asyncio.sleep(0.2)
        return statuses

    statuses = run(app, scenario)
    assert set(statuses) <= {200, 400, 503}, statuses
    assert statuses[200] > 100, statuses
    assert OrtSession.open_count == baseline
