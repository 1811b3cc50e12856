"""`bentoml build` packages the server with the repository and without training libraries."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.core.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bentoml_build_has_the_repository_and_only_serving_dependencies(
    zoo_repo: ModelRepository, tmp_path: Path
) -> None:
    context = tmp_path / "ctx"
    shutil.copytree(
        ROOT / "service", context / "service", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "bentofile.yaml", context / "bentofile.yaml")
    shutil.copytree(zoo_repo.root / "digits-cnn", context / "models" / "digits-cnn")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).with_name("bentoml")
    out = subprocess.run(
        [str(bentoml), "build"], cwd=context, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (bento,) = [
        p for p in (tmp_path / "home" / "bentos" / "slimserve").iterdir() if p.name != "latest"
    ]
    assert (bento / "src" / "models" / "digits-cnn" / "1" / "model.onnx").is_file()
    for room in ("service.py", "core/repository.py", "serving/dataplane.py", "http/bento.py"):
        assert (bento / "src" / "service" / room).is_file(), f"the Bento lacks service/{room}"
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "bentoml==1.4.39" in requirements
    assert "tokenizers" in requirements  # text models are tokenized by the server
    for name in ("hpack", "grpcio", "tritonclient"):  # the gRPC service
        assert name in requirements, f"the Bento lacks {name}"
    heavy_libraries = ("torch", "scikit-learn", "skl2onnx", "onnxscript", "transformers")
    for heavy in (*heavy_libraries, "sentence-transformers"):
        assert f"\n{heavy}==" not in requirements, f"the Bento would install {heavy}"
    assert "BENTOML_DO_NOT_TRACK" in (bento / "bento.yaml").read_text()
