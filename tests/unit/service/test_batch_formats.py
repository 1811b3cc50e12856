"""Batch jobs: every input format round-trips into every output format, in order, chunk by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from service.batch import JobConfig, run_job
from service.batch.model import from_repository
from service.batch.png import encode_png, read_png
from service.batch.readers import InputOptions, open_reader
from service.core.repository import ModelRepository
from tests.batch_models import publish_classifier
from tests.conftest import publish_identity

ROWS, WIDTH = 23, 4


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    publish_identity(repo, "ident", WIDTH)
    return repo


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    """Rows of exact binary fractions (every format writes them without rounding) and ids."""
    rng = np.random.default_rng(7)
    x = (rng.integers(0, 64, (ROWS, WIDTH)) / 16).astype(np.float32)
    ids = np.arange(ROWS) * 10 + 1000
    return x, ids


def write_input(fmt: str, folder: Path, x: np.ndarray, ids: np.ndarray) -> tuple[Path, dict]:
    """The rows in ``fmt``; returns the path and the job options it needs."""
    columns = {f"f{j}": x[:, j] for j in range(x.shape[1])}
    if fmt == "csv":
        path = folder / "in.csv"
        pacsv.write_csv(pa.table({"id": ids, **columns}), path)
    elif fmt == "parquet":
        path = folder / "in.parquet"
        pq.write_table(pa.table({"id": ids, **columns}), path, row_group_size=7)
    elif fmt == "parquet-list":  # one list column named like the model's input
        path = folder / "in-list.parquet"
        values = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
        pq.write_table(pa.table({"id": ids, "x": values}), path)
    elif fmt == "jsonl":
        path = folder / "in.jsonl"
        lines = [
            json.dumps({"id": int(i), **{k: float(v[n]) for k, v in columns.items()}})
            for n, i in enumerate(ids)
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl-arrays":
        path = folder / "in-arrays.jsonl"
        path.write_text("".join(json.dumps(r.tolist()) + "\n" for r in x))
        return path, {"ids": False}
    elif fmt == "npy":
        path = folder / "in.npy"
        np.save(path, x)
        return path, {"ids": False}
    elif fmt == "npz":
        path = folder / "in.npz"
        np.savez(path, x=x, id=ids)
    else:
        raise AssertionError(fmt)
    return path, {"ids": True}


def read_output(path: Path) -> dict[str, np.ndarray]:
    """An output file as columns (vectors as 2-D arrays)."""
    fmt = path.suffix.lstrip(".")
    if fmt == "parquet":
        table = pq.read_table(path)
        return {n: np.array(table[n].to_pylist()) for n in table.column_names}
    if fmt == "csv":
        table = pacsv.read_csv(path)
        out: dict[str, list] = {}
        for name in table.column_names:
            base, _, index = name.rpartition("_")
            key = base if index.isdigit() and base else name
            out.setdefault(key, []).append(table[name].to_numpy())
        return {k: v[0] if len(v) == 1 else np.stack(v, axis=1) for k, v in out.items()}
    if fmt == "jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}
    if fmt == "npy":
        records = np.load(path)
        return {k: records[k] for k in records.dtype.names}
    if fmt == "npz":
        with np.load(path) as archive:
            return {k: archive[k] for k in archive.files}
    raise AssertionError(fmt)


def job(repo: ModelRepository, model: str, source: Path, target: Path | str, **kw) -> JobConfig:
    kw.setdefault("chunk_rows", 5)
    kw.setdefault("batch_size", 3)
    return JobConfig(model=model, input=source, output=target, repo=repo.root, progress=False, **kw)


IN_FORMATS = ["csv", "parquet", "parquet-list", "jsonl", "jsonl-arrays", "npy", "npz"]
OUT_FORMATS = ["parquet", "csv", "jsonl", "npy", "npz"]


@pytest.mark.parametrize("fmt", IN_FORMATS)
def test_every_input_format_round_trips_through_the_identity_model(repo, data, tmp_path, fmt):
    x, ids = data
    source, info = write_input(fmt, tmp_path, x, ids)
    summary = run_job(job(repo, "ident", source, tmp_path / "out.parquet"))
    out = read_output(tmp_path / "out.parquet")
    assert summary.rows == ROWS and summary.predicted == ROWS and summary.errors == 0
    assert summary.chunks == 5  # 23 rows in chunks of 5
    np.testing.assert_array_equal(out["row"], np.arange(ROWS))
    np.testing.assert_array_equal(out["y"], x)
    if info["ids"]:
        assert out["id"].astype(str).tolist() == [str(i) for i in ids]
    else:
        assert "id" not in out
    assert (tmp_path / "out.parquet.errors.jsonl").read_text() == ""
    assert not (tmp_path / "out.parquet.partial").exists()


@pytest.mark.parametrize("fmt", OUT_FORMATS)
def test_every_output_format_holds_row_id_and_predictions(repo, data, tmp_path, fmt):
    x, ids = data
    source, _ = write_input("parquet", tmp_path, x, ids)
    target = tmp_path / f"out.{fmt}"
    run_job(job(repo, "ident", source, target))
    out = read_output(target)
    assert list(out) == ["row", "id", "y"]
    np.testing.assert_array_equal(out["row"], np.arange(ROWS))
    np.testing.assert_array_equal(out["id"], ids)
    np.testing.assert_array_equal(out["y"], x)


def test_csv_to_csv_keeps_text_ids_and_expands_vectors(repo, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text('name,a,b,c,d\nfirst,1,2,3,4\n"se,cond",5,6,7,8.5\n')
    target = tmp_path / "out.csv"
    run_job(job(repo, "ident", source, target, id_column="name"))
    assert target.read_text().splitlines() == [
        '"row","name","y_0","y_1","y_2","y_3"',
        '0,"first",1,2,3,4',
        '1,"se,cond",5,6,7,8.5',
    ]


def test_features_by_name_glob_and_order_and_the_other_columns_ignored(repo, tmp_path):
    table = pa.table(
        {
            "note": ["a", "b"],
            "px_2": [3.0, 30.0],
            "px_1": [2.0, 20.0],
            "k": [1, 2],
            "px_0": [1.0, 10.0],
            "w": [9.0, 9.0],
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    run_job(job(repo, "ident", source, tmp_path / "a.jsonl", features=("w", "px_*"), id_column="k"))
    out = read_output(tmp_path / "a.jsonl")
    assert out["k"].tolist() == [1, 2]
    # glob hits come in file order: px_2, px_1, px_0
    assert out["y"].tolist() == [[9.0, 3.0, 2.0, 1.0], [9.0, 30.0, 20.0, 10.0]]


def test_classifier_outputs_label_probabilities_and_label_names(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    publish_classifier(repo, "clf", labels=["cat", "dog", "eel"])
    x = np.random.default_rng(0).random((9, 4)).astype(np.float32)
    source = tmp_path / "in.npy"
    np.save(source, x)
    run_job(job(repo, "clf", source, tmp_path / "out.jsonl"))
    out = read_output(tmp_path / "out.jsonl")
    assert list(out) == ["row", "label", "probabilities", "label_name"]
    assert out["label_name"].tolist() == [["cat", "dog", "eel"][i] for i in out["label"]]
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-6)


def test_a_clustering_models_label_is_its_cluster(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    publish_classifier(repo, "km", task="clustering")
    source = tmp_path / "in.npy"
    np.save(source, np.eye(4, dtype=np.float32))
    run_job(job(repo, "km", source, tmp_path / "out.parquet"))
    assert list(read_output(tmp_path / "out.parquet")) == ["row", "cluster", "probabilities"]


def test_png_folder_of_digit_images(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    publish_classifier(repo, "img", row_shape=(1, 4, 4), preprocessing={"range": [0.0, 16.0]})
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 4, 4)) / 255
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"d{i}.png").write_bytes(encode_png(image))
    # an image twice the size is averaged down block by block
    (folder / "d5-big.png").write_bytes(encode_png(np.kron(images[0], np.ones((2, 2)))))
    (folder / "notes.txt").write_text("not an image")
    run_job(job(repo, "img", folder, tmp_path / "out.npz"))
    out = read_output(tmp_path / "out.npz")
    assert out["file"].tolist() == ["d0.png", "d1.png", "d2.png", "d3.png", "d4.png", "d5-big.png"]
    from tests.batch_models import reference_outputs

    expected = reference_outputs(
        repo.get("img"), np.concatenate([images, images[:1]]).reshape(6, 1, 4, 4) * 16
    )
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"], rtol=1e-5)


def test_png_decoder_reads_what_pillow_writes(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (9, 11)).astype(np.uint8)
    for mode in ("L", "RGB", "RGBA", "P", "I;16", "1"):
        picture = image_module.fromarray(grey, "L").convert(mode)
        path = tmp_path / f"{mode.replace(';', '')}.png"
        picture.save(path)
        if mode == "I;16":
            expected = np.asarray(picture, dtype=np.float64) / 65535
        else:
            expected = np.asarray(picture.convert("L"), dtype=np.float64) / 255
        np.testing.assert_allclose(read_png(path.read_bytes()), expected, atol=1 / 255)


def test_parquet_chunks_cross_row_groups_and_start_anywhere(repo, tmp_path):
    x = np.arange(400, dtype=np.float32).reshape(100, 4)
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({f"f{j}": x[:, j] for j in range(4)}), source, row_group_size=33)
    model = from_repository(repo, "ident")
    reader = open_reader(InputOptions(source, chunk_rows=15), model)
    chunks = list(reader.chunks(3))  # resume-style: from the fourth chunk
    assert [(c.start, c.stop) for c in chunks] == [(45, 60), (60, 75), (75, 90), (90, 100)]
    np.testing.assert_array_equal(np.concatenate([c.x for c in chunks]), x[45:])
    reader.close()


def test_csv_and_json_lines_seek_to_their_chunks(repo, tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("a,b,c,d\n" + "".join(",".join(map(str, r)) + "\n" for r in x.tolist()))
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in x.tolist()))  # no newline after the last
    model = from_repository(repo, "ident")
    reader = open_reader(InputOptions(csv_path, chunk_rows=4), model)
    assert reader.total_rows == 10 and reader.n_chunks == 3
    chunk = list(reader.chunks(2))[0]
    np.testing.assert_array_equal(chunk.x, x[8:])
    assert chunk.rows.tolist() == [8, 9]
    reader.close()
    reader = open_reader(InputOptions(jsonl, chunk_rows=4), model)
    assert reader.total_rows == 10
    np.testing.assert_array_equal(list(reader.chunks(2))[0].x, x[8:])
    reader.close()


def test_folder_output_keeps_one_file_per_chunk(repo, data, tmp_path):
    x, ids = data
    source, _ = write_input("npz", tmp_path, x, ids)
    folder = tmp_path / "dataset"
    run_job(job(repo, "ident", source, f"{folder}/"))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["_SUCCESS", "_errors.jsonl"] + [f"part-{i:06d}.parquet" for i in range(5)]
    table = pq.read_table(folder)  # pyarrow skips _ files: the folder is one dataset
    np.testing.assert_array_equal(np.array(table["y"].to_pylist()), x)
    np.testing.assert_array_equal(table["id"].to_numpy(), ids)


def test_empty_input_gives_an_empty_output_with_its_header(repo, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("a,b,c,d\n")
    target = tmp_path / "out.csv"
    summary = run_job(job(repo, "ident", source, target))
    assert summary.rows == 0
    assert target.read_text().splitlines() == ['"row","y_0","y_1","y_2","y_3"']
