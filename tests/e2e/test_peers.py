"""The peers the benchmark compares against (MLServer, KServe, PyTriton) answer the same v2
request with what onnxruntime computes in-process. Each needs its virtual environment under
.venv-peers/ (made by ``make bench``, or ``python -m loadtest.serving --servers <peer>``);
without it the test is skipped, saying so."""

from __future__ import annotations

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from loadtest.serving import peers
from loadtest.serving.servers import write_mlp_onnx
from service.core.repository import Manifest, ModelRepository, TensorSpec, Variant

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def small_mlp(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = ModelRepository(tmp_path_factory.mktemp("peers") / "models")
    staging = repo.staging_dir("mlp")
    write_mlp_onnx(staging / "model.onnx", (16, 32, 4))
    repo.publish(
        staging,
        Manifest(
            variants={"fp32": Variant("model.onnx")},
            name="mlp",
            version=0,
            task="classification",
            inputs=[TensorSpec("x", "FP32", (-1, 16))],
            outputs=[TensorSpec("probabilities", "FP32", (-1, 4))],
        ),
    )
    return repo


@pytest.mark.parametrize("kind", peers.PEERS)
def test_a_peer_answers_what_onnxruntime_computes(kind, small_mlp, tmp_path) -> None:
    if not peers.installed(kind):
        pytest.skip(f"no {kind} venv under {peers.PEER_ROOT} (make bench makes it)")
    x = np.random.default_rng(0).random((3, 16), dtype=np.float32)
    path = small_mlp.get("mlp").variant_path()
    [expected] = ort.InferenceSession(str(path)).run(None, {"x": x})
    server = peers.peer(kind, small_mlp.root, "mlp", tmp_path, tmp_path / "peer.log").start()
    try:
        body = {
            "inputs": [
                {"name": "x", "shape": [3, 16], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        r = httpx.post(f"{server.url}/v2/models/mlp/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        [out] = r.json()["outputs"]
        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
        assert out["name"] == "probabilities" and np.allclose(got, expected, atol=1e-6)
    finally:
        server.stop()
    assert server.left_behind == []
