"""Models that change under load, on the real server with real clients: a new version takes
over with zero failed requests (poll mode, and tritonclient's load/unload in explicit mode), a
tampered version is refused while the old one serves, a shadow records its agreement, the
memory budget evicts and reloads, and a minute of interleaved load/unload/infer leaks nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import tritonclient.http as triton

from service.core.repository import ModelRepository
from tests.conftest import publish_scale
from tests.e2e.conftest import start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ONE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


class Load:
    """``clients`` threads sending v2 JSON to ``model`` until stopped; every answer's status
    and (for 200s) when its request began, its version and first output value, in order per
    client."""

    def __init__(self, url: str, model: str = "alpha", clients: int = 16) -> None:
        self.url = f"{url}/v2/models/{model}/infer"
        self.statuses: Counter[str] = Counter()
        self.answers: list[list[tuple[float, str, float]]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = http.post(self.url, json=ONE)
                except httpx.HTTPError as exc:
                    self.statuses[type(exc).__name__] += 1
                    continue
                self.statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    doc = r.json()
                    answer = (started, doc["model_version"], doc["outputs"][0]["data"][0])
                    self.answers[i].append(answer)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _worker(srv) -> psutil.Process:
    root = psutil.Process(srv.process.pid)
    return next(
        p for p in root.children(recursive=True) if "service.server.worker" in " ".join(p.cmdline())
    )


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _switched(load: Load, new: str, after: float) -> None:
    """Every request that began after ``after`` was answered by version ``new``; per client,
    no answer from the old version follows one from the new."""
    assert load.statuses.keys() == {"200"}, load.statuses
    for answers in load.answers:
        seen_new = False
        for t, version, _ in answers:
            seen_new |= version == new
            assert not (seen_new and version != new), answers
            if t > after:
                assert version == new


@pytest.fixture
def scale_repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    publish_scale(repo, "alpha", 1.0)
    publish_scale(repo, "beta", 1.0)
    return repo


def test_poll_mode_switches_to_a_new_version_under_load_with_no_failure(scale_repo, tmp_path):
    srv = start_server(scale_repo.root, tmp_path, model_control="poll", repository_poll_s="0.2")
    try:
        with Load(srv.url) as load:
            time.sleep(1.0)
            publish_scale(scale_repo, "alpha", 2.0)  # staged, then renamed in: never half seen
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if (
                    httpx.post(f"{srv.url}/v2/models/alpha/infer", json=ONE).json()["model_version"]
                    == "2"
                ):
                    break
                time.sleep(0.1)
            switched_at = time.monotonic()
            time.sleep(1.0)
        _switched(load, "2", switched_at + 0.5)
        assert sum(len(a) for a in load.answers) > 200
        assert {v for a in load.answers for _, v, _ in a} == {"1", "2"}
        assert "model alpha version 2 serving" in srv.log_text()
    finally:
        stop_server(srv.process)


def test_explicit_load_and_unload_through_tritonclient_under_load(scale_repo, tmp_path):
    srv = start_server(scale_repo.root, tmp_path, model_control="explicit")
    client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
    try:
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["alpha"]["state"] == "READY" and index["beta"]["state"] == "READY"
        with Load(srv.url) as load:
            time.sleep(1.0)
            publish_scale(scale_repo, "alpha", 3.0)
            client.load_model("alpha")  # returns once version 2 serves
            switched_at = time.monotonic()
            time.sleep(1.0)
        _switched(load, "2", switched_at)
        client.unload_model("beta")
        assert not client.is_model_ready("beta")
        index = {m["name"]: m for m in client.get_model_repository_index()}
        assert index["beta"] == {"name": "beta", "state": "UNAVAILABLE", "reason": "unloaded"}
        client.load_model("beta")
        assert client.is_model_ready("beta")
    finally:
        client.close()
        stop_server(srv.process)


def test_a_tampered_version_is_refused_and_nothing_restarts(scale_repo, tmp_path):
    srv = start_server(scale_repo.root, tmp_path, model_control="explicit")
    client = triton.InferenceServerClient(f"127.0.0.1:{srv.port}")
    try:
        worker = _worker(srv)
        refused_before = _metric(
            srv.url, "slimserve_model_loads_total", model="alpha", outcome="refused"
        )
        version = publish_scale(scale_repo, "alpha", 5.0)
        data = bytearray((version.path / "model.onnx").read_bytes())
        data[-1] ^= 0xFF
        (version.path / "model.onnx").write_bytes(bytes(data))
        with Load(srv.url, clients=4) as load:
            with pytest.raises(triton.InferenceServerException, match="sha256"):
                client.load_model("alpha")
            time.sleep(0.5)
        assert load.statuses.keys() == {"200"}
        assert {v for a in load.answers for _, v, _ in a} == {"1"}
        rows = [m for m in client.get_model_repository_index() if m["name"] == "alpha"]
        assert {m["version"]: m["state"] for m in rows} == {"1": "READY", "2": "UNAVAILABLE"}
        assert (
            _metric(srv.url, "slimserve_model_loads_total", model="alpha", outcome="refused")
            == refused_before + 1
        )
        assert _worker(srv).pid == worker.pid  # nothing restarted
    finally:
        client.close()
        stop_server(srv.process)


def test_a_shadow_int8_variant_records_its_agreement(zoo_repo: ModelRepository, tmp_path):
    import shutil

    from export.data import load as dataset

    root = tmp_path / "models"
    shutil.copytree(zoo_repo.root / "digits-cnn", root / "digits-cnn")
    srv = start_server(root, tmp_path, model_control="explicit")
    try:
        policy = {"shadow": {"variant": "int8-dynamic"}, "shadow_fraction": 1.0}
        r = httpx.post(f"{srv.url}/v2/repository/models/digits-cnn/traffic", json=policy)
        assert r.status_code == 200, r.text
        x = dataset("digits").x_test.reshape(-1, 1, 8, 8)[:40]
        for row in x:
            body = {
                "inputs": [
                    {
                        "name": "pixels",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": row.ravel().tolist(),
                    }
                ]
            }
            answer = httpx.post(f"{srv.url}/v2/models/digits-cnn/infer", json=body)
            assert answer.status_code == 200 and answer.headers["x-model-variant"] != "int8-dynamic"
        time.sleep(1.0)  # the shadow runs after the answers; its counts are flushed each 0.5 s
        agree = _metric(
            srv.url, "slimserve_shadow_comparisons_total", shadow="int8-dynamic", outcome="agree"
        )
        disagree = _metric(
            srv.url, "slimserve_shadow_comparisons_total", shadow="int8-dynamic", outcome="disagree"
        )
        assert agree + disagree == 40 and agree >= 36
        shadow = httpx.get(f"{srv.url}/v2/models/digits-cnn").json()["parameters"]["shadow"]
        assert shadow["compared_samples"] == 40 and shadow["agreement"] >= 0.9
    finally:
        stop_server(srv.process)


def test_the_memory_budget_holds_two_of_three_and_a_request_loads_the_third_again(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    for name in ("m1", "m2", "m3"):
        publish_scale(repo, name, 1.0, width=65536)  # a 256 kB weight each
    size = repo.get("m1").manifest.files["model.onnx"].bytes
    srv = start_server(
        repo.root,
        tmp_path,
        model_control="explicit",
        memory_budget_mb=str(2.5 * size / 2**20),  # room for two
        startup_models='["m1", "m2"]',
    )
    try:
        body = {
            "inputs": [
                {"name": "x", "shape": [1, 65536], "datatype": "FP32", "data": [1.0] * 65536}
            ]
        }
        assert httpx.post(f"{srv.url}/v2/models/m2/infer", json=body, timeout=30).status_code == 200
        assert httpx.post(f"{srv.url}/v2/repository/models/m3/load", timeout=30).status_code == 200
        index = {m["name"]: m for m in httpx.post(f"{srv.url}/v2/repository/index").json()}
        assert "evicted" in index["m1"]["reason"], srv.log_text()[-3000:]
        assert index["m3"]["state"] == "READY"
        assert httpx.post(f"{srv.url}/v2/models/m1/infer", json=body, timeout=30).status_code == 200
        assert _metric(srv.url, "slimserve_model_cold_start_seconds_count", model="m1") == 1
    finally:
        stop_server(srv.process)


def test_a_minute_of_load_unload_and_infer_leaks_nothing(scale_repo, tmp_path):
    srv = start_server(scale_repo.root, tmp_path, model_control="explicit")
    try:
        worker = _worker(srv)
        sessions = _metric(srv.url, "slimserve_sessions_open")
        time.sleep(0.5)
        rss_before = worker.memory_info().rss
        stop = threading.Event()
        controls: Counter[str] = Counter()

        def control(model: str) -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    for action in ("unload", "load"):
                        r = http.post(f"{srv.url}/v2/repository/models/{model}/{action}")
                        controls[f"{action} {r.status_code}"] += 1
                        time.sleep(0.05)

        controllers = [threading.Thread(target=control, args=(m,)) for m in ("alpha", "beta")]
        with Load(srv.url, "alpha", clients=6) as a, Load(srv.url, "beta", clients=6) as b:
            for t in controllers:
                t.start()
            time.sleep(60)
            stop.set()
            for t in controllers:
                t.join()
        statuses = a.statuses + b.statuses
        assert set(statuses) <= {"200", "400", "503"}, statuses
        assert statuses["200"] > 1000 and set(controls) == {"load 200", "unload 200"}, controls
        time.sleep(0.5)
        assert _metric(srv.url, "slimserve_sessions_open") == sessions
        grown = (worker.memory_info().rss - rss_before) / 2**20
        assert grown < 30, f"worker RSS grew {grown:.0f} MiB"
    finally:
        stop_server(srv.process)


def test_the_repository_api_reaches_every_worker(scale_repo, tmp_path):
    """With two workers, an unload (and a load) through the API applies in both: a request
    on a fresh connection, whichever worker takes it, sees it within a second."""
    srv = start_server(scale_repo.root, tmp_path, model_control="explicit", workers="2")

    def answers() -> Counter[int]:
        statuses: Counter[int] = Counter()
        for _ in range(40):
            with httpx.Client() as fresh:  # a new connection: either worker
                statuses[fresh.post(f"{srv.url}/v2/models/alpha/infer", json=ONE).status_code] += 1
        return statuses

    try:
        assert answers() == {200: 40}
        assert httpx.post(f"{srv.url}/v2/repository/models/alpha/unload").status_code == 200
        time.sleep(1.5)
        assert answers() == {400: 40}
        assert httpx.post(f"{srv.url}/v2/repository/models/alpha/load").status_code == 200
        time.sleep(1.5)
        assert answers() == {200: 40}
        assert srv.log_text().count("model alpha version 1 unloaded") == 2  # once per worker
    finally:
        stop_server(srv.process)
