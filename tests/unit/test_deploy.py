"""deploy/ checked offline: every core manifest against Kubernetes' API schema (strict: no
unknown field), the CRDs (ServiceMonitor, KServe InferenceService) against their published
schemas kept in deploy/schemas/, and the manifests against each other (names, ports, probes)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = kubernetes_validate.latest_version()
CRDS = {
    "ServiceMonitor": "servicemonitor.json",
    "InferenceService": "inferenceservice.json",
}


def _load(name: str) -> dict:
    (doc,) = yaml.safe_load_all((DEPLOY / name).read_text())
    return doc


def _manifests() -> dict[str, dict]:
    return {p.name: _load(p.name) for p in sorted(DEPLOY.glob("*.yaml"))}


def _check(doc: dict) -> None:
    """Raise for a manifest the API (or its CRD's schema) would refuse."""
    if doc["kind"] in CRDS:
        schema = json.loads((DEPLOY / "schemas" / CRDS[doc["kind"]]).read_text())
        jsonschema.Draft7Validator(schema).validate(doc)
    elif doc["kind"] != "Kustomization":
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("*.yaml")))
def test_every_manifest_is_valid(name):
    _check(_load(name))


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("deployment.yaml", ["spec", "replica"], 2),  # a misspelt field
        (
            "deployment.yaml",
            ["spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"],
            "http",
        ),
        ("hpa.yaml", ["spec", "minReplicas"], "two"),
        ("service.yaml", ["spec", "ports", 0, "protocl"], "TCP"),
        ("servicemonitor.yaml", ["spec", "endpoints"], "http"),
        ("inferenceservice.yaml", ["spec", "predictr"], {}),
        ("inferenceservice.yaml", ["spec", "predictor", "minReplicas"], "one"),
    ],
)
def test_a_broken_manifest_is_caught(name, path, value):
    doc = copy.deepcopy(_load(name))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        _check(doc)


def test_an_inference_service_without_a_predictor_is_caught():
    doc = _load("inferenceservice.yaml")
    del doc["spec"]["predictor"]
    with pytest.raises(jsonschema.ValidationError, match="'predictor' is a required property"):
        _check(doc)


def test_the_manifests_agree_with_each_other_and_with_the_server():
    m = _manifests()
    deployment, service, hpa = m["deployment.yaml"], m["service.yaml"], m["hpa.yaml"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports == {"http": int(env["SLIMSERVE_PORT"]), "grpc": int(env["SLIMSERVE_GRPC_PORT"])}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    mount = container["volumeMounts"][0]
    assert env["SLIMSERVE_MODEL_REPOSITORY"] == mount["mountPath"] and mount["readOnly"]
    (volume,) = pod["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == m["models-pvc.yaml"]["metadata"]["name"]
    grace = int(env["SLIMSERVE_GRACEFUL_SHUTDOWN_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request
    monitor = m["servicemonitor.yaml"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    settings = {name for name in env if name.startswith("SLIMSERVE_")}
    from service.core.settings import Settings

    known = {f"SLIMSERVE_{f.upper()}" for f in Settings.model_fields}
    assert settings <= known, settings - known
    kustomize = m["kustomization.yaml"]
    crds = {name for name, doc in m.items() if doc.get("kind") in CRDS}
    assert set(kustomize["resources"]) == set(m) - crds - {"kustomization.yaml"}
