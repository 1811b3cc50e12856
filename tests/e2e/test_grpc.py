"""The v2 gRPC service of the real server (two workers sharing the port): tritonclient.grpc
unchanged, answers equal to HTTP's and to in-process onnxruntime, bad requests with their
status codes, the metrics' protocol label, health over both listeners, and a taken port."""

from __future__ import annotations

import shutil
import socket

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from export.data import load
from service.core.repository import ModelRepository
from tests.e2e.conftest import metric, start_server, stop_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELS = ("digits-cnn", "iris-knn", "text-minilm")


@pytest.fixture(scope="module")
def server(zoo_repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("grpc-server")
    for name in MODELS:
        shutil.copytree(zoo_repo.root / name, work / "models" / name)
    srv = start_server(work / "models", work, workers="2", max_body_bytes="1000000")
    yield srv
    stop_server(srv.process)


@pytest.fixture(scope="module")
def clients(server):
    grpc = grpcclient.InferenceServerClient(server.grpc_target)
    http = httpclient.InferenceServerClient(f"{server.host}:{server.port}")
    yield grpc, http
    grpc.close()
    http.close()


def _inputs(module, name: str, x: np.ndarray, datatype: str = "FP32"):
    tensor = module.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return [tensor]


def _local(server, model: str, variant: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(server.repo.get(model).variant_path(variant)))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


@pytest.mark.parametrize(
    ("model", "dataset", "shape"),
    [("digits-cnn", "digits", (-1, 1, 8, 8)), ("iris-knn", "iris", (-1, 4))],
)
def test_tritonclient_grpc_equals_http_and_onnxruntime(
    clients, server, model, dataset, shape
) -> None:
    grpc, http = clients
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(model)
    meta = grpc.get_model_metadata(model, as_json=True)
    over_http = http.get_model_metadata(model)
    assert meta["name"] == over_http["name"] and meta["platform"] == over_http["platform"]
    for ours, theirs in zip(
        meta["inputs"] + meta["outputs"], over_http["inputs"] + over_http["outputs"], strict=True
    ):
        assert ours["name"] == theirs["name"] and ours["datatype"] == theirs["datatype"]
        assert [int(d) for d in ours["shape"]] == theirs["shape"]
    data = load(dataset)
    x = data.x_test.reshape(shape).astype(np.float32)
    name = meta["inputs"][0]["name"]
    over_grpc = grpc.infer(model, _inputs(grpcclient, name, x))
    answered = http.infer(model, _inputs(httpclient, name, x))
    variant = over_grpc.get_response().parameters["variant"].string_param
    assert answered.get_response()["parameters"]["variant"] == variant
    local = _local(server, model, variant, {name: x})
    for output in local:
        np.testing.assert_array_equal(over_grpc.as_numpy(output), answered.as_numpy(output))
        np.testing.assert_allclose(over_grpc.as_numpy(output), local[output], rtol=1e-5, atol=1e-6)
    accuracy = float((over_grpc.as_numpy("label") == data.y_test).mean())
    assert accuracy > 0.85


def test_text_over_grpc_equals_http(clients) -> None:
    grpc, http = clients
    texts = np.array([b"A man is eating food.", "caf\u00e9 au lait".encode()], dtype=object)
    embedded = grpc.infer("text-minilm", _inputs(grpcclient, "text", texts, "BYTES"))
    answered = http.infer("text-minilm", _inputs(httpclient, "text", texts, "BYTES"))
    np.testing.assert_array_equal(
        embedded.as_numpy("sentence_embedding"), answered.as_numpy("sentence_embedding")
    )
    too_long = np.array([b"word " * 2000], dtype=object)
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer("text-minilm", _inputs(grpcclient, "text", too_long, "BYTES"))
    assert (
        caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        and "truncate" in caught.value.message()
    )
    cut = grpc.infer(
        "text-minilm", _inputs(grpcclient, "text", too_long, "BYTES"), parameters={"truncate": True}
    )
    assert cut.as_numpy("sentence_embedding").shape == (1, 384)


def _status(grpc, model: str, inputs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        grpc.infer(model, inputs)
    return caught.value.status(), caught.value.message()


def test_bad_requests_get_the_right_status_code_and_message(clients, server) -> None:
    grpc, _ = clients
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert _status(grpc, "digits-cnn", _inputs(grpcclient, "pixels", x[:, 0])) == (
        "StatusCode.INVALID_ARGUMENT",
        "input 'pixels' of model 'digits-cnn': expected shape [-1, 1, 8, 8], got [2, 8, 8]",
    )
    assert _status(
        grpc, "digits-cnn", _inputs(grpcclient, "pixels", x.astype(np.float64), "FP64")
    ) == (
        "StatusCode.INVALID_ARGUMENT",
        "input 'pixels' of model 'digits-cnn': expected datatype FP32, got FP64",
    )
    code, message = _status(grpc, "no-such-model", _inputs(grpcclient, "pixels", x))
    assert code == "StatusCode.NOT_FOUND" and "'no-such-model'" in message
    # raw contents of the wrong byte length, through the raw stub
    request = pb.ModelInferRequest(model_name="digits-cnn")
    request.inputs.add(name="pixels", datatype="FP32", shape=[2, 1, 8, 8])
    request.raw_input_contents.append(b"\0" * 500)
    code, message = _status_raw(server, request)
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert (
        message
        == "input 'pixels': shape [2, 1, 8, 8] of FP32 needs 512 bytes, raw_input_contents[0] has 500"
    )
    # over SLIMSERVE_MAX_BODY_BYTES (1,000,000): refused before it is read
    big = np.zeros((4000, 1, 8, 8), np.float32)
    code, message = _status(grpc, "digits-cnn", _inputs(grpcclient, "pixels", big))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in message
    # under the size limit but more samples than the model can queue: ours, as HTTP's 413
    many = np.zeros((3000, 1, 8, 8), np.float32)
    code, message = _status(grpc, "digits-cnn", _inputs(grpcclient, "pixels", many))
    assert code == "StatusCode.RESOURCE_EXHAUSTED" and "3000 samples in one request" in message
    assert grpc.is_server_ready()
    assert "Traceback" not in server.log_text()


def _status_raw(server, request) -> tuple[str, str]:
    import grpc as grpclib
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpclib.insecure_channel(server.grpc_target) as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        except grpclib.RpcError as exc:
            return str(exc.code()), exc.details()
    raise AssertionError("the request was answered")


def test_metrics_by_protocol_health_of_both_listeners_and_both_workers(clients, server) -> None:
    grpc, http = clients
    x = np.zeros((1, 1, 8, 8), np.float32)
    before = httpx.get(f"{server.url}/metrics").text
    for _ in range(5):
        grpc.infer("digits-cnn", _inputs(grpcclient, "pixels", x))
    http.infer("digits-cnn", _inputs(httpclient, "pixels", x))
    after = httpx.get(f"{server.url}/metrics").text
    labels = {"model": "digits-cnn", "outcome": "success"}
    for protocol, count in (("grpc", 5), ("http", 1)):
        done = metric(after, "slimserve_requests_total", protocol=protocol, **labels)
        done -= metric(before, "slimserve_requests_total", protocol=protocol, **labels)
        assert done == count
        timed = metric(after, "slimserve_request_duration_seconds_count", protocol=protocol)
        timed -= metric(before, "slimserve_request_duration_seconds_count", protocol=protocol)
        assert timed == count
    ready = httpx.get(f"{server.url}/v2/health/ready").json()
    assert ready["listeners"] == {"http": True, "grpc": True}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    # every worker serves gRPC on the one port (SO_REUSEPORT)
    workers = psutil.Process(server.process.pid).children(recursive=True)
    serving = {
        p.pid
        for p in workers
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == server.grpc_port
    }
    assert len(serving) == 2


def test_a_taken_grpc_port_stops_the_start_with_a_clear_error(zoo_repo, tmp_path) -> None:
    shutil.copytree(zoo_repo.root / "iris-knn", tmp_path / "models" / "iris-knn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as failed:
            start_server(tmp_path / "models", tmp_path, grpc_port=str(port))
    assert "server exited with 1" in str(failed.value)
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in str(failed.value)
    assert "0 turns gRPC off" in str(failed.value)
