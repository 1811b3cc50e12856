"""all-MiniLM-L6-v2 exported as one graph (token ids -> unit-norm embeddings) matches
sentence-transformers and the torch module, at several batch sizes and sequence lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export.torch_zoo import text

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A woman is holding a small child in her arms.",
    "Stock markets fell sharply after the interest rate decision.",
    "Shares dropped when the central bank raised rates.",
]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    text.export_encoder(text.load_minilm(), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_graph_has_dynamic_batch_and_sequence_axes(session) -> None:
    inputs = {i.name: (i.shape, i.type) for i in session.get_inputs()}
    assert inputs == {
        "input_ids": (["batch", "sequence"], "tensor(int64)"),
        "attention_mask": (["batch", "sequence"], "tensor(int64)"),
    }
    [out] = session.get_outputs()
    assert (out.name, out.shape) == ("sentence_embedding", ["batch", text.EMBEDDING_SIZE])


def test_it_matches_sentence_transformers_on_real_sentences(session) -> None:
    feeds = text.tokenize(SENTENCES)
    [got] = session.run(None, feeds)
    expected = text.reference_embeddings()(SENTENCES)
    assert _cosines(got, expected).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("batch", "length"), [(1, 3), (2, 17), (7, 64), (16, 256)])
def test_it_matches_the_torch_module_at_any_batch_and_length(session, batch, length) -> None:
    import torch

    rng = np.random.default_rng(batch * 1000 + length)
    ids = rng.integers(1000, 30000, (batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for row in range(1, batch):  # padded rows of various lengths
        mask[row, rng.integers(1, length + 1) :] = 0
    with torch.no_grad():
        want = text.load_minilm()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    [got] = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert got.shape == (batch, text.EMBEDDING_SIZE)
    assert _cosines(got, want).min() >= 0.9999


def test_similar_sentences_are_closer_than_unrelated_ones(session) -> None:
    [e] = session.run(None, text.tokenize(SENTENCES))
    sim = e @ e.T
    assert sim[0, 1] > max(sim[0, 2], sim[0, 4]) + 0.2  # eating / eating vs baby, stocks
    assert sim[2, 3] > max(sim[2, 0], sim[2, 5]) + 0.2  # child / child
    assert sim[4, 5] > max(sim[4, 0], sim[4, 2]) + 0.2  # rates / rates


def test_tokenize_truncates_at_the_models_length_and_pads_to_the_longest() -> None:
    feeds = text.tokenize(["short", "word " * 1000])
    assert feeds["input_ids"].shape == (2, 256) and feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"][0].sum() == 3  # [CLS] short [SEP]
    assert feeds["attention_mask"][1].sum() == 256
    assert text.max_length(text.minilm_dir()) == 256
    assert Path(text.minilm_dir(), "tokenizer.json").is_file()


def test_int8_dynamic_needs_per_channel_weights_to_keep_the_embeddings(session, tmp_path) -> None:
    """Dynamic INT8 with one scale per weight tensor bends MiniLM's embeddings (mean cosine to
    FP32 about 0.94 on these documents); one scale per output channel keeps them (0.99)."""
    from export.compress import quantize_dynamic
    from export.corpora import text_corpus

    src = tmp_path / "model.onnx"
    text.export_encoder(text.load_minilm(), src)
    docs = text_corpus("20newsgroups", "test").texts[:48]
    feeds = text.tokenize(docs)
    [fp32] = session.run(None, feeds)
    means = {}
    for per_channel in (False, True):
        dst = tmp_path / f"int8-{per_channel}.onnx"
        details = quantize_dynamic("text-minilm", src, dst, per_channel=per_channel)
        assert details["weights"] == f"int8, per {'channel' if per_channel else 'tensor'}"
        int8 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        [got] = int8.run(None, feeds)
        means[per_channel] = float(_cosines(got, fp32).mean())
        if per_channel:
            assert _cosines(got, fp32).min() >= 0.97
            assert dst.stat().st_size < 0.7 * src.stat().st_size
    assert means[True] >= 0.99 and means[True] > means[False] + 0.02
