"""deploy/grafana-dashboard.json asks only for what the running server exports: every metric a
query names is on the real server's /metrics, with every label the query groups by."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b(slimserve_[a-z_]+)\b")
_BY = re.compile(r"\bby \(([^)]*)\)")


def _queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    queries += [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return queries


def test_every_dashboard_query_names_metrics_and_labels_the_server_exports(server):
    body = {
        "inputs": [
            {"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 128}
        ]
    }
    assert httpx.post(f"{server.url}/v2/models/digits-cnn/infer", json=body).status_code == 200
    exported: dict[str, set[str]] = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("slimserve_"):
            name, _, rest = line.partition("{")
            labels = set(re.findall(r'(\w+)="', rest)) if rest else set()
            exported.setdefault(name.split(" ")[0], set()).update(labels)
    queries = _queries()
    assert len(queries) >= 12
    for query in queries:
        names = _METRIC.findall(query)
        assert names, query
        for name in names:
            assert name in exported, f"{name} (in {query!r}) is not on /metrics"
            for group in _BY.findall(query):
                wanted = {g.strip() for g in group.split(",")}
                assert wanted <= exported[name], (
                    f"{query!r}: {name} has no {wanted - exported[name]}"
                )
