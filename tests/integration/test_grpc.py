"""The v2 gRPC service in-process: the listener on 127.0.0.1 over the dataplane, spoken to with
tritonclient's asyncio gRPC client and the raw stubs; every test runs on both transports
(slimserve's own HTTP/2 and grpcio's grpc.aio, ``SLIMSERVE_GRPC_SERVER``)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as grpcclient
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from export.data import load
from service.core.logs import RejectionLog
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.grpc.server import GrpcListener
from service.serving.dataplane import DataPlane
from service.serving.store import ModelStore

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, params=["slimserve", "grpcio"])
def transport(request, monkeypatch) -> str:
    monkeypatch.setenv("SLIMSERVE_GRPC_SERVER", request.param)
    return request.param


@pytest.fixture(scope="module")
def repo(zoo_repo: ModelRepository, tmp_path_factory) -> ModelRepository:
    """Two zoo models plus a copy of iris-knn whose file is corrupt."""
    root = tmp_path_factory.mktemp("grpc") / "models"
    for name in ("digits-cnn", "iris-knn"):
        shutil.copytree(zoo_repo.root / name, root / name)
    shutil.copytree(zoo_repo.root / "iris-knn", root / "broken")
    bad = root / "broken" / "1" / "model.onnx"
    bad.write_bytes(bad.read_bytes()[:50])
    return ModelRepository(root)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(repo: ModelRepository, check, prepare=None, **settings) -> None:
    """Start the listener on a free port, run ``check(client, stub, dataplane)``, stop;
    ``prepare(store)`` first, when given."""
    config = Settings(
        model_repository=repo.root, grpc_port=_port(), max_body_bytes=200_000, **settings
    )
    store = ModelStore(repo, config)
    store.load_all()
    if prepare is not None:
        prepare(store)

    async def main() -> None:
        dataplane = DataPlane(store)
        listener = GrpcListener(dataplane, RejectionLog(logging.getLogger("test")))
        dataplane.listeners["grpc"] = lambda: listener.ready
        assert not dataplane.server_ready()  # registered, not serving yet
        await listener.start()
        target = f"127.0.0.1:{config.grpc_port}"
        client = grpcclient.InferenceServerClient(target)
        channel = grpc.aio.insecure_channel(target)
        try:
            await check(client, pb_grpc.GRPCInferenceServiceStub(channel), dataplane)
        finally:
            await client.close()
            await channel.close()
            await listener.stop()
            assert dataplane.listeners_ready() == {"grpc": False}
            assert not dataplane.server_ready()
            await dataplane.close()

    asyncio.run(main())


def _pixels(n: int = 5) -> np.ndarray:
    return load("digits").x_test[:n].reshape(n, 1, 8, 8).astype(np.float32)


def _input(name: str, x: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_metadata_and_answers_equal_to_onnxruntime(repo: ModelRepository) -> None:
    x = _pixels()

    async def check(client, stub, dataplane) -> None:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("digits-cnn")
        assert not await client.is_model_ready("broken")
        meta = await client.get_server_metadata(as_json=True)
        assert meta["name"] == "slimserve" and "model_repository" in meta["extensions"]
        model = await client.get_model_metadata("digits-cnn", as_json=True)
        assert model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [
            {"name": "pixels", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
        ]
        result = await client.infer("digits-cnn", [_input("pixels", x)], request_id="r7")
        assert result.get_response().id == "r7"
        variant = result.get_response().parameters["variant"].string_param
        session = ort.InferenceSession(repo.get("digits-cnn").variant_path(variant))
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(None, {"pixels": x}), strict=True):
            np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        # typed contents in, typed contents out, the same numbers
        typed = pb.ModelInferRequest(model_name="digits-cnn", id="t")
        tensor = typed.inputs.add(name="pixels", datatype="FP32", shape=x.shape)
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        answer = await stub.ModelInfer(typed)
        assert not answer.raw_output_contents
        probabilities = np.array(answer.outputs[1].contents.fp32_contents).reshape(-1, 10)
        np.testing.assert_allclose(probabilities, result.as_numpy("probabilities"), atol=0)
        assert list(answer.outputs[0].contents.int64_contents) == list(result.as_numpy("label"))
        # a client that compresses its requests (tritonclient's compression_algorithm)
        for algorithm in ("gzip", "deflate"):
            packed = await client.infer(
                "digits-cnn", [_input("pixels", x)], compression_algorithm=algorithm
            )
            np.testing.assert_array_equal(
                packed.as_numpy("probabilities"), result.as_numpy("probabilities")
            )

    serve(repo, check)


def test_outputs_versions_and_variants_are_addressed_as_over_http(repo: ModelRepository) -> None:
    x = _pixels(3)
    version = str(repo.get("digits-cnn").version)

    async def check(client, stub, dataplane) -> None:
        asked = [grpcclient.InferRequestedOutput("label")]
        result = await client.infer(
            "digits-cnn", [_input("pixels", x)], model_version=version, outputs=asked
        )
        assert [o.name for o in result.get_response().outputs] == ["label"]
        assert result.get_response().model_version == version
        fp32 = await client.infer("digits-cnn@fp32", [_input("pixels", x)])
        assert fp32.get_response().parameters["variant"].string_param == "fp32"
        named = await client.infer(
            "digits-cnn", [_input("pixels", x)], parameters={"variant": "fp32"}
        )
        np.testing.assert_array_equal(
            named.as_numpy("probabilities"), fp32.as_numpy("probabilities")
        )
        with pytest.raises(InferenceServerException) as missing:
            await client.infer("digits-cnn", [_input("pixels", x)], model_version="99")
        assert missing.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as unknown:
            await client.infer(
                "digits-cnn",
                [_input("pixels", x)],
                outputs=[grpcclient.InferRequestedOutput("logits")],
            )
        assert unknown.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "requested unknown ['logits']" in unknown.value.message()

    serve(repo, check)


def test_bad_requests_get_their_status_code_and_message(repo: ModelRepository) -> None:
    async def check(client, stub, dataplane) -> None:
        async def status(model: str, *inputs) -> tuple[str, str]:
            with pytest.raises(InferenceServerException) as caught:
                await client.infer(model, list(inputs))
            return caught.value.status(), caught.value.message()

        x = _pixels(2)
        assert await status("digits-cnn", _input("pixels", x[:, 0])) == (
            "StatusCode.INVALID_ARGUMENT",
            "input 'pixels' of model 'digits-cnn': expected shape [-1, 1, 8, 8], got [2, 8, 8]",
        )
        assert await status("digits-cnn", _input("pixels", x.astype(np.float64), "FP64")) == (
            "StatusCode.INVALID_ARGUMENT",
            "input 'pixels' of model 'digits-cnn': expected datatype FP32, got FP64",
        )
        code, message = await status("nope", _input("pixels", x))
        assert code == "StatusCode.NOT_FOUND" and "model 'nope'" in message
        code, message = await status("broken", _input("features", np.zeros((1, 4), np.float32)))
        assert code == "StatusCode.FAILED_PRECONDITION" and "broken" in message
        short = pb.ModelInferRequest(model_name="digits-cnn")
        short.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 8, 8])
        short.raw_input_contents.append(b"\0" * 255)
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await stub.ModelInfer(short)
        assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert raw.value.details() == (
            "input 'pixels': shape [1, 1, 8, 8] of FP32 needs 256 bytes, raw_input_contents[0] has 255"
        )
        nan = x.copy()
        nan[1, 0, 2, 3] = np.nan
        code, message = await status("digits-cnn", _input("pixels", nan))
        assert (
            code == "StatusCode.INVALID_ARGUMENT" and "NaN or infinity at flat index 83" in message
        )
        # over SLIMSERVE_MAX_BODY_BYTES (200,000 here): gRPC refuses it before reading it
        big = np.zeros((1000, 1, 8, 8), np.float32)  # 256,000 bytes
        code, message = await status("digits-cnn", _input("pixels", big))
        assert code == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in message
        # every failure counted under protocol="grpc"; the server still answers
        assert await client.is_server_ready()

    before = _count(outcome="invalid_input")
    serve(repo, check)
    assert _count(outcome="invalid_input") - before == 4


def _count(**labels: str) -> float:
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if (
                sample.name == "slimserve_requests_total"
                and sample.labels.get("protocol") == "grpc"
            ) and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_statistics_repository_and_config(repo: ModelRepository) -> None:
    async def check(client, stub, dataplane) -> None:
        before = await client.get_inference_statistics("digits-cnn", as_json=True)
        requests = [client.infer("digits-cnn", [_input("pixels", _pixels(4))]) for _ in range(8)]
        await asyncio.gather(*requests)
        after = await client.get_inference_statistics("digits-cnn", as_json=True)
        (old,), (new,) = before.get("model_stats", [{}]), after["model_stats"]
        done = int(new["inference_stats"]["success"]["count"]) - int(
            old.get("inference_stats", {}).get("success", {}).get("count", 0)
        )
        assert done == 8
        assert int(new["inference_count"]) - int(old.get("inference_count", 0)) == 32
        executions = int(new["execution_count"]) - int(old.get("execution_count", 0))
        assert 1 <= executions <= 8
        with pytest.raises(InferenceServerException) as unknown:
            await client.get_inference_statistics("nope")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        index = (await client.get_model_repository_index(as_json=True))["models"]
        states = {m["name"]: m["state"] for m in index}
        assert states == {"broken": "UNAVAILABLE", "digits-cnn": "READY", "iris-knn": "READY"}
        with pytest.raises(InferenceServerException) as refused:
            await client.load_model("digits-cnn")
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "SLIMSERVE_MODEL_CONTROL=explicit" in refused.value.message()
        config = (await client.get_model_config("digits-cnn", as_json=True))["config"]
        assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == ["1", "8", "8"]
        with pytest.raises(InferenceServerException) as shm:
            await client.get_system_shared_memory_status()
        assert shm.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "send tensors in the request itself" in shm.value.message()

    before = _count(outcome="success", model="digits-cnn")
    serve(repo, check)
    assert _count(outcome="success", model="digits-cnn") - before == 8


def test_explicit_load_and_unload(repo: ModelRepository) -> None:
    async def check(client, stub, dataplane) -> None:
        await client.unload_model("iris-knn")
        assert not await client.is_model_ready("iris-knn")
        await client.load_model("iris-knn")
        assert await client.is_model_ready("iris-knn")
        with pytest.raises(InferenceServerException) as override:
            await client.load_model("iris-knn", config='{"max_batch_size": 4}')
        assert override.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "parameters ['config'] are not supported" in override.value.message()

    serve(repo, check, model_control="explicit")


def test_streaming_answers_each_request_or_its_error(repo: ModelRepository) -> None:
    async def check(client, stub, dataplane) -> None:
        async def requests():
            for i in range(6):
                x = _pixels(2) if i != 3 else _pixels(2)[:, 0]
                yield {
                    "model_name": "digits-cnn",
                    "inputs": [_input("pixels", x)],
                    "request_id": str(i),
                }

        answers = {}
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                answers["error"] = str(error)
            else:
                answers[result.get_response().id] = result.as_numpy("label").shape
        assert answers.pop("error").endswith("expected shape [-1, 1, 8, 8], got [2, 8, 8]")
        assert answers == {str(i): (2,) for i in (0, 1, 2, 4, 5)}

    serve(repo, check)


def test_a_full_queue_is_unavailable_with_the_retry_hint(repo: ModelRepository) -> None:
    """A model whose runs take 50 ms and whose queue holds one sample: of 16 calls at once,
    some are refused with UNAVAILABLE, the queue named, and Retry-After's seconds in the
    trailing metadata (``retry-after``, and gRPC's ``grpc-retry-pushback-ms``)."""

    def slow(store: ModelStore) -> None:
        batcher = store.resolve("digits-cnn").batcher
        run = batcher._run

        def slowly(feeds, *args):
            time.sleep(0.05)
            return run(feeds, *args)

        batcher._run = slowly

    async def check(client, stub, dataplane) -> None:
        request = pb.ModelInferRequest(model_name="digits-cnn")
        request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 8, 8])
        request.raw_input_contents.append(_pixels(1).tobytes())

        async def one():
            try:
                await stub.ModelInfer(request)
                return None
            except grpc.aio.AioRpcError as exc:
                return exc

        errors = [e for e in await asyncio.gather(*(one() for _ in range(16))) if e is not None]
        assert 0 < len(errors) < 16
        for error in errors:
            assert error.code() is grpc.StatusCode.UNAVAILABLE, error
            assert "queue full" in error.details() and "retry later" in error.details()
            trailers = dict(error.trailing_metadata() or ())
            assert trailers["retry-after"] == "2"
            assert trailers["grpc-retry-pushback-ms"] == "2000"

    serve(
        repo,
        check,
        slow,
        max_batch_size=1,
        max_queue_size=1,
        retry_after_s=2,
        inline_run_us=0,
        load_variants=False,
    )
