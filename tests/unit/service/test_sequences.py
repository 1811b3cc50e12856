"""Text in: the server's tokenizer (strings and UTF-8 bytes, limits, truncation) and how texts
of different lengths share batches (buckets, padding to the longest, answers in order)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.core.tokenizer import TextEncoder, TokenizerSpec, truncation
from service.serving.batcher import DynamicBatcher
from service.serving.sequences import bucket_of, groups, infer_texts

text = pytest.importorskip("export.torch_zoo.text")  # the package ships tokenizer.json


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    spec = TokenizerSpec("tokenizer.json", 32, 0, "input_ids", "attention_mask")
    return TextEncoder(text.minilm_dir() / "tokenizer.json", spec, "tiny-text")


class Pooler:
    """A fake encoder graph: answers each row's token count and the batch's padded width,
    and records the shape of every batch it runs."""

    def __init__(self, delay: float = 0.0) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.delay = delay

    def __call__(self, feeds):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.shape == mask.shape and ((ids == 0) == (mask == 0)).all()
        self.shapes.append(ids.shape)
        if self.delay:
            time.sleep(self.delay)
        width = np.full(len(ids), ids.shape[1], dtype=np.int64)
        return [mask.sum(axis=1).astype(np.int64), width]


def _batcher(model: Pooler, encoder: TextEncoder, **kw) -> DynamicBatcher:
    return DynamicBatcher(model, "tiny-text", max_batch_size=64, pad=encoder.pad, **kw)


def test_strings_and_utf8_bytes_give_the_same_tokens(encoder) -> None:
    words = "Café au lait, s'il vous plaît"
    assert encoder.encode([words]) == encoder.encode(np.array([words.encode()], dtype=object))
    [ids] = encoder.encode(["hello world"])
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == 4  # [CLS] hello world [SEP]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"\xff\xfe broken", "is not valid UTF-8 (invalid start byte at byte 0)"),
        (7, "text 1 is int; expected a string"),
        (None, "text 1 is NoneType; expected a string"),
    ],
)
def test_what_is_not_text_is_refused_naming_the_text(encoder, value, words) -> None:
    with pytest.raises(InvalidInput, match="input 'text' of model 'tiny-text'") as caught:
        encoder.encode(np.array(["fine", value], dtype=object))
    assert words in str(caught.value)


def test_a_text_over_the_limit_is_refused_unless_truncation_is_asked(encoder) -> None:
    long = "word " * 100
    with pytest.raises(InvalidInput, match="text 1 is 102 tokens long, more than the 32"):
        encoder.encode(["short", long])
    [short, cut] = encoder.encode(["short", long], truncate=True)
    assert len(cut) == 32 and cut[-1] == 102  # still ends with [SEP]
    assert truncation({"truncate": True}, "m") is True and truncation({}, "m") is False
    with pytest.raises(InvalidInput, match="parameter 'truncate' must be true or false"):
        truncation({"truncate": "yes"}, "m")


def test_feeds_are_padded_with_the_pad_id_and_a_zero_mask(encoder) -> None:
    feeds = encoder.feeds([[101, 7, 102], [101, 102]])
    assert feeds["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert feeds["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert encoder.feeds([[101, 102]], width=5)["input_ids"].shape == (1, 5)


def test_buckets_are_powers_of_two_capped_at_the_limit() -> None:
    assert [bucket_of(n, 256) for n in (1, 16, 17, 33, 200, 256)] == [16, 16, 32, 64, 256, 256]
    assert bucket_of(100, 128) == 128 and bucket_of(300, 128) == 128
    ids = [[0] * 5, [0] * 40, [0] * 6]
    assert groups(ids, 256, "bucket") == {16: [0, 2], 64: [1]}
    assert groups(ids, 256, "longest") == {0: [0, 1, 2]}


def _texts(*words: int) -> np.ndarray:
    return np.array([" ".join(["word"] * n) for n in words], dtype=object)


def test_one_request_of_mixed_lengths_is_split_by_bucket_and_answered_in_order(encoder) -> None:
    model = Pooler()
    batcher = _batcher(model, encoder)
    texts = _texts(3, 25, 1, 20, 2)
    outputs, tokens = asyncio.run(infer_texts(encoder, batcher, texts, False, "bucket", 5.0))
    whole = encoder.feeds(tokens)
    assert outputs[0].tolist() == [5, 27, 3, 22, 4]  # tokens of each text, in request order
    assert sorted(model.shapes) == [(2, 27), (3, 5)]  # each bucket padded to its longest
    assert whole["input_ids"].shape == (5, 27)  # the request padded to its longest (shadows)


@pytest.mark.parametrize(
    ("mode", "widths"), [("bucket", {5, 27}), ("longest", {27}), ("max", {32})]
)
def test_concurrent_texts_share_batches_by_mode(encoder, mode, widths) -> None:
    model = Pooler(delay=0.01)
    batcher = _batcher(model, encoder)
    lengths = [3, 25, 1, 2, 3, 2, 1, 20]

    async def main():
        return await asyncio.gather(
            *(infer_texts(encoder, batcher, _texts(n), False, mode, 5.0) for n in lengths)
        )

    answers = asyncio.run(main())
    assert [int(a[0][0][0]) for a in answers] == [n + 2 for n in lengths]
    seen = {w for _, w in model.shapes}
    assert seen <= widths | {n + 2 for n in lengths}  # the first one runs alone
    if mode == "bucket":  # the short texts never padded to the long ones
        short = [a for a, n in zip(answers, lengths, strict=True) if n < 10]
        assert all(int(a[0][1][0]) <= 16 for a in short)
    if mode == "max":
        assert seen == {32}
