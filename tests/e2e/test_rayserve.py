"""slimserve on Ray Serve, on a real two-node Ray cluster on this machine.

One cluster (``ray.cluster_utils.Cluster``: a head and a second node, each its own raylet) for
the module; each test deploys the application it needs at ``/`` and deletes it after. The
proxy runs on the head only (both nodes share this machine's ports).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import tritonclient.http as triton  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from service.core.repository import ModelRepository  # noqa: E402
from service.core.settings import RayServeSettings, Settings  # noqa: E402
from service.rayserve.app import build  # noqa: E402
from tests.conftest import publish_slow  # noqa: E402
from tests.e2e.conftest import _free_port, metric, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.slow

APP = "slimserve"
MODELS = ("digits-cnn", "iris-knn")


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield f"127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def repo(zoo_repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rayserve") / "models"
    for name in MODELS:
        shutil.copytree(zoo_repo.root / name, root / name)
    return root


def deploy(root: Path, **ray_settings) -> None:
    """The application of ``root``'s models at ``/``; returns once every replica serves."""
    settings = Settings(model_repository=root)
    ray_settings = RayServeSettings(replica_cpus=0.5, metrics_push_s=0.5, **ray_settings)
    names = ModelRepository(root).names()
    serve.run(build(settings, ray_settings, names), name=APP, route_prefix="/")


@pytest.fixture
def deployed():
    yield deploy
    serve.delete(APP)


def running(deployment: str) -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def replica_actors(deployment: str) -> list:
    return [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")])
        if a.class_name == f"ServeReplica:{APP}:{deployment}"
    ]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.5)


def _infer(client, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    meta = client.get_model_metadata(model)
    name, datatype = meta["inputs"][0]["name"], meta["inputs"][0]["datatype"]
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer(model, [tensor])
    return {o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]}


def _inputs(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "digits-cnn": rng.random((5, 1, 8, 8), dtype=np.float32),
        "iris-knn": rng.random((5, 4), dtype=np.float32) * 6,
    }


def test_replicas_on_both_nodes_answer_as_the_single_process_server(
    cluster, repo, deployed, tmp_path
):
    deployed(repo, groups={"vision": {"models": ["digits-*"], "num_replicas": 2}})
    nodes = {a.node_id for a in replica_actors("group-vision")}
    assert len(nodes) == 2, "the two replicas of group-vision share a node"
    assert running("group-default") == 1

    client = triton.InferenceServerClient(cluster)
    assert client.is_server_live() and client.is_server_ready()
    ready = httpx.get(f"http://{cluster}/v2/health/ready").json()
    assert ready["ready"] and set(ready["groups"]) == {"vision", "default"}
    assert ready["groups"]["vision"]["models"] == ["digits-cnn"]
    assert ready["groups"]["default"]["models"] == ["iris-knn"]
    index = httpx.post(f"http://{cluster}/v2/repository/index", json={}).json()
    assert [m["name"] for m in index] == list(MODELS)

    inputs = _inputs(repo)
    on_ray = {m: _infer(client, m, inputs[m]) for m in MODELS}
    single = start_server(repo, tmp_path, grpc_port="0")
    try:
        alone = triton.InferenceServerClient(single.url.removeprefix("http://"))
        for model in MODELS:
            expected = _infer(alone, model, inputs[model])
            for name, value in expected.items():
                np.testing.assert_array_equal(on_ray[model][name], value, err_msg=model)
        bad = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        for path in ("/v2/models/iris-knn/infer", "/v2/models/digits-cnn/infer"):
            want = httpx.post(single.url + path, json=bad)
            got = httpx.post(f"http://{cluster}{path}", json=bad)
            assert (got.status_code, got.json()) == (want.status_code, want.json())
            assert got.status_code == 400
    finally:
        stop_server(single.process)

    # every request counted once, by the replica that answered it, across both nodes
    for _ in range(20):
        _infer(client, "digits-cnn", inputs["digits-cnn"])
    time.sleep(1.5)  # two pushes
    text = httpx.get(f"http://{cluster}/metrics").text
    replicas = {a.name.rsplit("#", 1)[-1] for a in replica_actors("group-vision")}
    per_replica = [
        metric(
            text,
            "slimserve_requests_total",
            model="digits-cnn",
            outcome="success",
            protocol="http",
            replica=r,
        )
        for r in replicas
    ]
    assert sum(per_replica) == 21 and all(n > 0 for n in per_replica)
    assert f'node="{sorted(nodes)[0][:12]}"' in text and f'node="{sorted(nodes)[1][:12]}"' in text


def test_each_replica_checks_sha256_and_health_names_the_group_that_cannot_serve(
    cluster, repo, deployed, tmp_path
):
    root = tmp_path / "models"
    shutil.copytree(repo, root)
    onnx_file = root / "iris-knn" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:64])
    deployed(root, groups={"vision": ["digits-*"], "tabular": ["iris-*"]})
    got = httpx.get(f"http://{cluster}/v2/health/ready")
    assert got.status_code == 503 and got.headers["retry-after"] == "1"
    health = got.json()
    assert health["groups"]["vision"]["ready"] and not health["groups"]["tabular"]["ready"]
    assert "sha256" in health["not_ready_models"]["iris-knn"]
    assert health["groups"]["tabular"]["node"]  # the node whose replica checked the file
    body = {
        "inputs": [
            {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
        ]
    }
    assert httpx.post(f"http://{cluster}/v2/models/digits-cnn/infer", json=body).status_code == 200
    got = httpx.post(f"http://{cluster}/v2/models/nope/infer", json={"inputs": []})
    assert got.status_code == 404
    assert "served by no group" in got.json()["error"] and "vision, tabular" in got.json()["error"]


def test_a_replica_killed_mid_load_is_replaced_and_clients_see_only_retriable_503s(
    cluster, repo, deployed
):
    deployed(repo, groups={"vision": {"models": ["digits-*"], "num_replicas": 2}})
    body = {
        "inputs": [
            {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
        ]
    }
    statuses: Counter[int] = Counter()
    retry_after: set[str | None] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://{cluster}", timeout=30) as http:
            while not stop.is_set():
                r = http.post("/v2/models/digits-cnn/infer", json=body)
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    retry_after.add(r.headers.get("retry-after"))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim = replica_actors("group-vision")[0]
    ray.kill(ray.get_actor(victim.name, namespace=victim.ray_namespace), no_restart=True)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    print("statuses while a replica was killed:", dict(statuses))
    assert statuses[200] > 0
    assert set(statuses) <= {200, 503}, statuses
    assert retry_after <= {"1"}
    wait_for(lambda: running("group-vision") == 2, 60, "group-vision back to 2 replicas")
    assert victim.actor_id not in {a.actor_id for a in replica_actors("group-vision")}


def test_autoscaling_adds_replicas_under_load_and_removes_them_after(cluster, tmp_path, deployed):
    root = tmp_path / "models"
    publish_slow(ModelRepository(root), "slow", width=512)
    autoscaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0,
        "downscale_delay_s": 2,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 1,
    }
    deployed(root, autoscaling=autoscaling)
    assert running("group-default") == 1
    x = np.ones((1, 512), dtype=np.float32)
    body = {
        "inputs": [{"name": "x", "shape": [1, 512], "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://{cluster}", timeout=60) as http:
            while not stop.is_set():
                assert http.post("/v2/models/slow/infer", json=body).status_code == 200

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: running("group-default") == 2, 60, "a second replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join()
    wait_for(lambda: running("group-default") == 1, 90, "back to one replica after the load")
