"""Text and sequence models behind the real server: strings in (tritonclient's BYTES, JSON and
binary; /embed; /classify), the server's own tokenizer, answers equal to in-process
onnxruntime, /forecast in the series' units, and a clear 400 for every kind of bad text."""

from __future__ import annotations

import json
import shutil
import struct

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tritonclient.http as triton

from service.core.repository import ModelRepository
from tests.conftest import TEXT_SAMPLE
from tests.e2e.conftest import start_server, stop_server

text = pytest.importorskip("export.torch_zoo.text")
pytestmark = pytest.mark.slow

MODELS = ("text-minilm", "news-minilm", "sunspots-lstm")
SIMILAR = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("The girl is carrying a baby.", "A woman is holding a small child in her arms."),
    ("Stock markets fell sharply today.", "Shares dropped after the rate decision."),
]


@pytest.fixture(scope="module")
def server(zoo_repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("text-server")
    for name in MODELS:
        shutil.copytree(zoo_repo.root / name, work / "models" / name)
    srv = start_server(work / "models", work)
    yield srv
    stop_server(srv.process)


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(f"{server.host}:{server.port}") as c:
        yield c


def _local(server, name: str, variant: str = "fp32"):
    model = server.repo.get(name)
    session = ort.InferenceSession(
        str(model.variant_path(variant)), providers=["CPUExecutionProvider"]
    )
    limit = model.manifest.tokenizer["max_length"]

    def run(texts: list[str]) -> list[np.ndarray]:
        return session.run(None, text.tokenize(texts, length=limit))

    return run


def _embed(client, texts: list[str], binary: bool, model: str = "text-minilm@fp32"):
    data = triton.InferInput("text", [len(texts)], "BYTES")
    data.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    wanted = [triton.InferRequestedOutput("sentence_embedding", binary_data=binary)]
    return client.infer(model, [data], outputs=wanted).as_numpy("sentence_embedding")


def test_metadata_says_the_model_takes_text(client) -> None:
    meta = client.get_model_metadata("text-minilm")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [
        {"name": "sentence_embedding", "datatype": "FP32", "shape": [-1, 384]}
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_strings_give_unit_embeddings_equal_to_in_process(
    client, server, binary
) -> None:
    texts = [t for pair in SIMILAR for t in pair] + ["", "word " * 40]
    served = _embed(client, texts, binary)
    assert served.shape == (len(texts), 384) and served.dtype == np.float32
    assert np.allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    [local] = _local(server, "text-minilm")(texts)
    assert np.allclose(served, local, atol=2e-5)
    # the default variant (per-channel INT8) stays close to the FP32 answers
    default = _embed(client, texts, binary, model="text-minilm")
    assert ((default * local).sum(axis=1) > 0.97).all()  # the card: mean 0.99, min 0.97


def test_similar_sentences_score_higher_than_unrelated_ones(client) -> None:
    emb = _embed(client, [t for pair in SIMILAR for t in pair], True).reshape(3, 2, 384)
    for i in range(3):
        similar = float(emb[i, 0] @ emb[i, 1])
        for j in range(3):
            if j != i:
                assert similar > float(emb[i, 0] @ emb[j, 1]) + 0.2, (i, j)


def test_embed_endpoint_equals_v2(client, server) -> None:
    texts = ["A man is eating food.", "Shares dropped after the rate decision."]
    r = httpx.post(f"{server.url}/embed", json={"model": "text-minilm@fp32", "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dimensions"] == 384 and body["variant"] == "fp32"
    assert np.allclose(np.array(body["embeddings"]), _embed(client, texts, True), atol=1e-6)


def test_news_classifier_served_accuracy_equals_the_card(server) -> None:
    from export.corpora import text_corpus
    from export.torch_zoo.language import CORPUS, _sample

    test = _sample(text_corpus(CORPUS, "test"), TEXT_SAMPLE, 0)
    manifest = server.repo.get("news-minilm").manifest
    served = []
    for i in range(0, len(test.texts), 40):
        r = httpx.post(
            f"{server.url}/classify",
            json={"model": "news-minilm@fp32", "texts": test.texts[i : i + 40], "truncate": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        served += [p["label"] for p in r.json()["predictions"]]
    assert set(served) <= set(manifest.labels) and "alt.atheism" in manifest.labels
    names = [test.label_names[y] for y in test.labels]
    accuracy = float(np.mean([s == n for s, n in zip(served, names, strict=True)]))
    card = manifest.variants["fp32"].details["measurement"]["metrics"]["accuracy"]
    assert accuracy == pytest.approx(card, abs=1e-9)
    [labels, _] = _local(server, "news-minilm")(test.texts[:40])
    assert served[:40] == [manifest.labels[i] for i in labels]


def test_forecast_in_the_series_units_equals_in_process(server) -> None:
    from export.corpora import sunspots

    series = sunspots().values
    session = ort.InferenceSession(
        str(server.repo.get("sunspots-lstm").variant_path("fp32")),
        providers=["CPUExecutionProvider"],
    )
    for length in (24, 120, 300):
        history = series[-length:].tolist()
        r = httpx.post(
            f"{server.url}/forecast",
            json={"model": "sunspots-lstm@fp32", "history": history},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        [want] = session.run(None, {"history": np.array([history], dtype=np.float32)})
        assert body["horizon"] == 12 and np.allclose(body["forecast"], want[0], atol=1e-3)
    # beyond the model's 12 months: its forecast fed back as history, step by step
    r = httpx.post(
        f"{server.url}/forecast",
        json={"model": "sunspots-lstm@fp32", "history": [history, history], "horizon": 30},
        timeout=30,
    )
    body = r.json()
    assert (body["steps"], len(body["forecast"]), len(body["forecast"][0])) == (3, 2, 30)
    [step2] = session.run(
        None, {"history": np.array([history + body["forecast"][0][:12]], dtype=np.float32)}
    )
    assert np.allclose(body["forecast"][0][12:24], step2[0], atol=1e-3)


def _v2(server, model: str, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", content=body, headers=headers or {}, timeout=30
    )


def _binary_text(items: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in items)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [len(items)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("numbers", "expected 2 strings for shape [2]"),
        ("empty", "has no elements"),
        ("too long", "text 1 is 502 tokens long, more than the 256 the model takes"),
        ("invalid utf-8", "text 0 is not valid UTF-8"),
        ("truncate not a boolean", "parameter 'truncate' must be true or false"),
        ("token ids", "has no input 'input_ids'"),
    ],
)
def test_bad_text_gets_a_clear_400(server, case, words) -> None:
    def doc(data, shape=None, datatype="BYTES", name="text", parameters=None) -> bytes:
        tensor = {"name": name, "shape": shape or [len(data)], "datatype": datatype, "data": data}
        return json.dumps({"inputs": [tensor], "parameters": parameters or {}}).encode()

    body, headers = {
        "numbers": (doc([1, 2]), None),
        "empty": (doc([], [0]), None),
        "too long": (doc(["fine", "word " * 500]), None),
        "invalid utf-8": _binary_text([b"\xc3\x28 not utf-8", b"fine"]),
        "truncate not a boolean": (doc(["a"], parameters={"truncate": "yes"}), None),
        "token ids": (doc([[101, 102]], [1, 2], "INT64", "input_ids"), None),
    }[case]
    r = _v2(server, "text-minilm", body, headers)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    ("endpoint", "body", "words"),
    [
        ("embed", {"model": "text-minilm", "texts": []}, "'texts': List should have at least 1"),
        ("embed", {"model": "text-minilm", "texts": ["a", 3]}, "'texts.1': Input should be a"),
        ("embed", {"model": "news-minilm", "texts": ["a"]}, "/embed serves embedding models"),
        ("classify", {"model": "news-minilm", "rows": [[1.0]]}, "takes text: send 'texts'"),
        ("classify", {"model": "news-minilm"}, "expected either 'rows' (numbers) or 'texts'"),
        ("embed", {"model": "text-minilm", "texts": ["w " * 300]}, "or ask for truncation"),
        ("forecast", {"model": "sunspots-lstm", "history": []}, "'history.list[float]': List"),
        ("forecast", {"model": "sunspots-lstm", "history": [[1, 2], [3]]}, "different lengths"),
        ("forecast", {"model": "text-minilm", "history": [1.0]}, "/forecast serves forecasting"),
    ],
)
def test_friendly_text_and_forecast_errors_are_400(server, endpoint, body, words) -> None:
    r = httpx.post(f"{server.url}/{endpoint}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


def test_truncation_on_request_keeps_the_first_tokens(client, server) -> None:
    long = "The shuttle launch was delayed. " + "word " * 400
    r = httpx.post(
        f"{server.url}/embed",
        json={"model": "text-minilm@fp32", "texts": [long], "truncate": True},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    [local] = _local(server, "text-minilm")([long])  # the tokenizer cut at 256 in process
    assert np.allclose(r.json()["embeddings"], local, atol=2e-5)


def test_locust_text_scenario_runs_without_failures(server, tmp_path) -> None:
    from tests.e2e.test_locust_smoke import run_locust

    rows = run_locust(server, tmp_path, "TextUser")
    assert {"embed", "classify text", "forecast", "v2 infer text-minilm"} <= set(rows)
    assert int(rows["Aggregated"]["Failure Count"]) == 0


# ------------------------------------------------------------------------------- batch jobs


@pytest.fixture(scope="module")
def posts(tmp_path_factory: pytest.TempPathFactory):
    """60 short news posts as JSON Lines (one too long, one not text) and as CSV."""
    from export.corpora import text_corpus

    folder = tmp_path_factory.mktemp("posts")
    docs = [" ".join(t.split()[:60]) for t in text_corpus("20newsgroups", "test").texts[:60]]
    rows = [{"id": i, "text": t} for i, t in enumerate(docs)]
    rows[7]["text"] = "word " * 400  # over news-minilm's 128 tokens
    rows[11]["text"] = 5  # not text
    jsonl = folder / "posts.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = folder / "posts.csv"
    table = pa.table({"doc": [str(r["text"]) for r in rows], "n": list(range(len(rows)))})
    pacsv.write_csv(table, csv)
    return folder, jsonl, csv, docs


def _scores(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_job_scores_a_text_column_like_in_process(server, posts) -> None:
    from service.batch import JobConfig, run_job

    folder, jsonl, _, docs = posts
    out = folder / "topics.jsonl"
    summary = run_job(
        JobConfig("news-minilm", jsonl, out, repo=server.repo.root,
                  variant="fp32", progress=False, max_error_rate=0.1, overwrite=True)
    )  # fmt: skip
    assert (summary.rows, summary.errors) == (60, 2)
    errors = _scores(folder / "topics.jsonl.errors.jsonl")
    assert [e["row"] for e in errors] == [7, 11]
    assert "the text is 402 tokens long, more than the 128" in errors[0]["reason"]
    assert "pass --truncate" in errors[0]["reason"] and "is not text" in errors[1]["reason"]
    scored = _scores(out)
    kept = [i for i in range(60) if i not in (7, 11)]
    assert [r["row"] for r in scored] == kept
    [labels, probabilities] = _local(server, "news-minilm")([docs[i] for i in kept])
    assert [r["label"] for r in scored] == labels.tolist()
    assert np.allclose([r["probabilities"] for r in scored], probabilities, atol=1e-5)
    assert scored[0]["label_name"] == server.repo.get("news-minilm").manifest.labels[labels[0]]


@pytest.mark.parametrize("engine", ["local", "http"])
def test_batch_job_truncates_when_asked_and_reads_a_named_csv_column(server, posts, engine):
    from service.batch import JobConfig, run_job

    folder, _, csv, _ = posts
    out = folder / f"vectors-{engine}.parquet"
    summary = run_job(
        JobConfig("text-minilm", csv, out, repo=server.repo.root, engine=engine, url=server.url,
                  features=("doc",), id_column="n", truncate=True, variant="fp32",
                  progress=False, overwrite=True)
    )  # fmt: skip
    assert (summary.rows, summary.errors) == (60, 0)  # "5" is text in a CSV; long ones cut
    table = pq.read_table(out)
    vectors = np.array(table.column("sentence_embedding").to_pylist(), dtype=np.float32)
    assert vectors.shape == (60, 384)
    assert table.column("n").to_pylist() == [str(i) for i in range(60)]  # CSV ids are text
    source = [str(v) for v in pacsv.read_csv(csv).column("doc").to_pylist()]
    [local] = _local(server, "text-minilm")(source)
    assert np.allclose(vectors, local, atol=2e-5)
