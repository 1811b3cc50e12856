"""The serving side must never need torch or scikit-learn (STYLE.md: the two halves)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "service").rglob("*.py")
)


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_service_module_does_not_import_training_libraries(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in ('torch', 'sklearn', 'skl2onnx', 'onnxscript') if m in sys.modules)\n"
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
