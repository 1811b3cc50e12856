"""What a hostile local user or a careless client can do to a running server, and what it
cannot: no control port, metrics that stay apart, capped and timed-out connections, no
orphaned workers, bounded memory and logs (issue 18's probe, each point a test)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from service.core.repository import ModelRepository
from tests.conftest import publish_identity
from tests.e2e.conftest import metric, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def identity_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two identity models: ``alpha`` (width 4) and ``wide`` (width 64)."""
    repo = ModelRepository(tmp_path_factory.mktemp("iso") / "models")
    publish_identity(repo, "alpha")
    publish_identity(repo, "wide", width=64)
    return repo.root


def _tree(process) -> list[psutil.Process]:
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def _workers(process) -> list[psutil.Process]:
    return [p for p in _tree(process) if "service.server.worker" in " ".join(p.cmdline())]


def _infer(url: str, model: str = "alpha", n: int = 1, width: int = 4) -> httpx.Response:
    body = {
        "inputs": [
            {"name": "x", "shape": [n, width], "datatype": "FP32", "data": [0.5] * (n * width)}
        ]
    }
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def _counter(url: str, model: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric(text, "slimserve_requests_total", model=model, outcome="success")


def test_the_server_listens_on_its_own_ports_and_nothing_else(server) -> None:
    """BentoML's circus listened on two unauthenticated TCP control ports; any local process
    could make it run a command. slimserve's supervisor has no control endpoint at all: the
    server listens on its HTTP port and its gRPC port, nothing else."""
    listening = set()
    for proc in _tree(server.process):
        for conn in proc.net_connections(kind="all"):
            if conn.status == psutil.CONN_LISTEN or (conn.family == socket.AF_UNIX and conn.laddr):
                listening.add((proc.pid, conn.family, conn.laddr))
    assert {(laddr.port if hasattr(laddr, "port") else laddr) for *_, laddr in listening} == {
        server.port,
        server.grpc_port,
    }, listening
    assert not any("circus" in " ".join(p.cmdline()) for p in _tree(server.process))


def test_two_servers_keep_their_metrics_apart(identity_root: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = start_server(identity_root, tmp_path / "a")
    b = start_server(identity_root, tmp_path / "b")
    try:
        dirs = set()
        for srv in (a, b):
            for worker in _workers(srv.process):
                dirs.add(worker.environ()["PROMETHEUS_MULTIPROC_DIR"])
        assert len(dirs) == 2 and all(Path(d).is_dir() for d in dirs)
        for _ in range(5):
            assert _infer(a.url).status_code == 200
        for _ in range(3):
            assert _infer(b.url).status_code == 200
        assert (_counter(a.url, "alpha"), _counter(b.url, "alpha")) == (5, 3)
    finally:
        stop_server(a.process)
        stop_server(b.process)
    assert not any(Path(d).exists() for d in dirs)  # removed at stop


def _raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


@pytest.fixture(scope="module")
def strict_server(identity_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """Tight limits, to see them work within seconds."""
    work = tmp_path_factory.mktemp("strict")
    srv = start_server(
        identity_root,
        work,
        max_connections="16",
        header_timeout_s="1",
        body_timeout_s="1",
        keep_alive_s="1",
    )
    yield srv
    stop_server(srv.process)


def test_connections_past_the_cap_get_503_and_the_server_keeps_answering(strict_server) -> None:
    idle = [_raw(strict_server.port) for _ in range(16)]  # the cap
    try:
        time.sleep(0.3)
        refused = _raw(strict_server.port)
        answer = _read_all(refused)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"retry-after: 1" in answer and b"SLIMSERVE_MAX_CONNECTIONS" in answer
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert _infer(strict_server.url).status_code == 200
    metrics = httpx.get(f"{strict_server.url}/metrics").text
    assert "slimserve_connections_refused_total 1.0" in metrics
    assert "refused 1 request (503: 1); latest: 503 new connection" in strict_server.log_text()


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"", b"headers not complete"),  # connects and says nothing
        (b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\n", b"headers not complete"),
        (
            b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
            b"body not complete",
        ),
    ],
    ids=["idle", "slowloris", "stalled-body"],
)
def test_idle_and_slow_connections_are_closed_with_408(strict_server, sent, why) -> None:
    sock = _raw(strict_server.port)
    start = time.monotonic()
    sock.sendall(sent)
    if sent.endswith(b"\r\n") and b"\r\n\r\n" not in sent:
        for _ in range(6):  # slowloris: a header byte every 0.4 s
            time.sleep(0.4)
            try:
                sock.sendall(b"X")
            except OSError:
                break
    answer = _read_all(sock)
    elapsed = time.monotonic() - start
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert why in answer and elapsed < 5


def test_an_idle_keep_alive_connection_is_closed(strict_server) -> None:
    sock = _raw(strict_server.port)
    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _read_all(sock, timeout=5)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


def test_workers_die_with_a_killed_supervisor(identity_root: Path, tmp_path: Path) -> None:
    srv = start_server(identity_root, tmp_path, workers="2")
    workers = _workers(srv.process)
    assert len(workers) == 2
    os.kill(srv.process.pid, signal.SIGKILL)
    srv.process.wait(10)
    gone, alive = psutil.wait_procs(workers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/v2/health/live", timeout=2)


def test_a_worker_that_dies_is_started_again(identity_root: Path, tmp_path: Path) -> None:
    srv = start_server(identity_root, tmp_path)
    try:
        (first,) = _workers(srv.process)
        first.kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if _infer(srv.url).status_code == 200 and _workers(srv.process)[0].pid != first.pid:
                    break
            except (httpx.HTTPError, IndexError):
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"no worker came back:\n{srv.log_text()}")
        assert "exited with -9; starting it again" in srv.log_text()
    finally:
        stop_server(srv.process)


def _rss_peak(pid: int, stop: threading.Event, out: list[int]) -> None:
    proc = psutil.Process(pid)
    peak = 0
    while not stop.is_set():
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.005)
    out.append(peak)


def test_a_huge_body_for_a_small_input_costs_about_its_own_size(
    identity_root: Path, tmp_path: Path
) -> None:
    """60 MB of floats for a [1, 4] input once added 651 MiB to the worker before the
    element count was checked; now the count is checked on the raw text first."""
    srv = start_server(identity_root, tmp_path)
    try:
        assert _infer(srv.url).status_code == 200  # warm
        (worker,) = _workers(srv.process)
        data = b",".join([b"0.12345"] * 7_500_000)
        body = b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [%s]}]}' % (
            data
        )
        before = worker.memory_info().rss
        stop, peak = threading.Event(), []
        watcher = threading.Thread(target=_rss_peak, args=(worker.pid, stop, peak))
        watcher.start()
        try:
            r = httpx.post(f"{srv.url}/v2/models/alpha/infer", content=body, timeout=60)
        finally:
            stop.set()
            watcher.join()
        assert r.status_code == 400
        assert "shape [1, 4] needs 4 elements, 'data' has 7500000" in r.json()["error"]
        grew = peak[0] - before
        assert grew < 3 * len(body), f"{grew / 2**20:.0f} MiB for a {len(body) / 2**20:.0f} MB body"
    finally:
        stop_server(srv.process)


def test_a_request_larger_than_the_queue_is_413_not_503(server) -> None:
    x = np.zeros((2049, 1, 8, 8), np.float32)
    header = (
        b'{"inputs": [{"name": "pixels", "shape": [2049, 1, 8, 8], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": %d}}]}' % x.nbytes
    )
    r = httpx.post(
        f"{server.url}/v2/models/digits-cnn/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert r.status_code == 413, r.text
    assert "2049 samples in one request, more than the 2048" in r.json()["error"]
    assert "retry-after" not in r.headers


def test_a_model_that_failed_to_load_says_it_will_not_heal(server) -> None:
    r = httpx.post(f"{server.url}/v2/models/iris-knn/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 400 and "retry-after" not in r.headers
    message = r.json()["error"]
    assert "will not be served until its repository folder is fixed" in message
    assert "iris-knn/1/model.onnx" in message and str(server.repo.root) not in message
    ready = httpx.get(f"{server.url}/v2/health/ready").json()["not_ready_models"]["iris-knn"]
    assert str(server.repo.root) not in ready


def test_client_text_cannot_forge_or_flood_log_lines(server) -> None:
    forged = "x%0A2026-01-01 00:00:00,000 ERROR slimserve: FORGED"
    r = httpx.get(f"{server.url}/v2/models/{forged}/ready", timeout=10)
    assert r.status_code == 404 and len(r.content) < 500
    names = [
        {"name": f"n{i}", "shape": [1], "datatype": "FP32", "data": [1]} for i in range(20_000)
    ]
    r = httpx.post(f"{server.url}/v2/models/digits-cnn/infer", json={"inputs": names}, timeout=60)
    assert r.status_code == 400 and len(r.content) < 1000, len(r.content)
    httpx.post(f"{server.url}/v2/models/{forged}/infer", json={"inputs": []}, timeout=10)
    lines = server.log_text().splitlines()
    assert not any(
        line.startswith("2026-01-01 00:00:00,000 ERROR slimserve: FORGED") for line in lines
    )
    assert max(len(line) for line in lines) < 2000


def test_an_error_answered_before_the_body_is_read_reaches_the_client(server) -> None:
    """The server answers 404/413 without reading the body; the client must still see the
    answer, not a connection reset."""
    big = b"x" * 20_000_000
    for path, status in (("/v2/models/nope/infer", 404), ("/v2/models/digits-cnn/infer", 413)):
        r = httpx.post(f"{server.url}{path}", content=big, timeout=30)
        assert r.status_code == status and "error" in r.json()


def test_multipart_to_a_friendly_endpoint_is_415(server) -> None:
    r = httpx.post(f"{server.url}/classify", files={"rows": ("x.csv", b"1,2,3")}, timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_bentoml_serve_listens_where_the_settings_say(identity_root: Path, tmp_path: Path) -> None:
    """``bentoml serve service.service:SlimServe`` (what a Bento's container runs) used to bind
    0.0.0.0:3000 whatever SLIMSERVE_HOST said; the service's own config now carries them. The
    worker's start-up hook starts gRPC beside HTTP there too, on SLIMSERVE_GRPC_PORT."""
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT, _free_port

    port, grpc_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "SLIMSERVE_MODEL_REPOSITORY": str(identity_root),
        "SLIMSERVE_HOST": "127.0.0.1",
        "SLIMSERVE_PORT": str(port),
        "SLIMSERVE_GRPC_PORT": str(grpc_port),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    bentoml = Path(sys.executable).with_name("bentoml")
    log = (tmp_path / "bentoml.log").open("wb")
    process = subprocess.Popen(
        [str(bentoml), "serve", "service.service:SlimServe"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail((tmp_path / "bentoml.log").read_text())
        listening = {  # gRPC binds 127.0.0.1 on a dual-stack socket: ::ffff:127.0.0.1
            (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
            for p in _tree(process)
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in (port, grpc_port)
        }
        assert listening == {("127.0.0.1", port), ("127.0.0.1", grpc_port)}
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_server_ready()
    finally:
        stop_server(process)
