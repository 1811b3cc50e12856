"""Write the CRD schemas tests/unit/test_deploy.py checks deploy/ against (kept in the repo,
so the check runs offline). Run again to move to newer releases (any machine with pip and npm):

    pip download kserve==0.21.0 --no-deps -d /tmp/kserve
    npm pack @kubernetes-models/prometheus-operator@4.0.0 && tar xzf kubernetes-models-*.tgz
    python deploy/schemas/derive.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl package

- ``inferenceservice.json``: KServe's ``serving.kserve.io/v1beta1`` InferenceService as its
  Python SDK publishes it (the SDK's models are generated from the CRD's OpenAPI schema; Apache
  2.0): every field's type, required fields, and no field the API does not have. Kubernetes'
  own types inside it (containers, resources, ...) are accepted as objects: kubernetes-validate
  checks those where they appear in core manifests.
- ``servicemonitor.json``: prometheus-operator's ``monitoring.coreos.com/v1`` ServiceMonitor CRD
  schema as ``@kubernetes-models/prometheus-operator`` 4.0.0 ships it (MIT).
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_SCALARS = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}


def _models(wheel: Path) -> dict[str, tuple[dict[str, str], dict[str, str], list[str]]]:
    """Each SDK model: (python name -> type, python name -> JSON name, required names)."""
    models = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.startswith("kserve/models/v") or not name.endswith(".py"):
                continue
            source = zf.read(name).decode()
            tree = ast.parse(source)
            for node in tree.body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found: dict[str, Any] = {}
                for item in node.body:
                    if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                        if item.targets[0].id in ("openapi_types", "attribute_map"):
                            found[item.targets[0].id] = ast.literal_eval(item.value)
                required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", source)
                models[node.name] = (found["openapi_types"], found["attribute_map"], required)
    return models


def _type(kind: str, models: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if kind in _SCALARS:
        return {"type": _SCALARS[kind]}
    if kind.startswith("list["):
        return {"type": "array", "items": _type(kind[5:-1], models, defs)}
    if kind.startswith("dict("):
        return {"type": "object", "additionalProperties": _type(kind[5:-1].split(", ", 1)[1], models, defs)}
    if kind in models:
        if kind not in defs:
            defs[kind] = {}  # recursion guard
            types, names, required = models[kind]
            defs[kind] = {
                "type": "object",
                "properties": {names[k]: _type(t, models, defs) for k, t in types.items()},
                "required": [names[k] for k in required],
                "additionalProperties": False,
            }
        return {"$ref": f"#/definitions/{kind}"}
    return {}  # a Kubernetes type (V1Container, ...), an int-or-string, or 'object'


def inference_service(wheel: Path) -> dict[str, Any]:
    models = _models(wheel)
    defs: dict[str, Any] = {}
    root = _type("V1beta1InferenceService", models, defs)
    return {"$schema": "http://json-schema.org/draft-07/schema#", **root, "definitions": defs}


def service_monitor(package: Path) -> dict[str, Any]:
    source = (package / "monitoring.coreos.com" / "v1" / "ServiceMonitor.js").read_text()
    start = source.index("const schema = ") + len("const schema = ")
    schema: dict[str, Any] = json.JSONDecoder().raw_decode(source[start:])[0]
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: kubernetes-validate's
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


if __name__ == "__main__":
    wheel, package = Path(sys.argv[1]), Path(sys.argv[2])
    for name, doc in [
        ("inferenceservice.json", inference_service(wheel)),
        ("servicemonitor.json", service_monitor(package)),
    ]:
        (HERE / name).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HERE / name}")
