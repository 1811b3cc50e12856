"""Batch jobs: bad rows go to the errors file with their reason; bad jobs stop before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.batch import JobConfig, SetupError, TooManyErrors, run_job
from service.batch.__main__ import main
from service.batch.png import encode_png
from service.core.repository import ModelRepository
from tests.batch_models import publish_classifier
from tests.conftest import publish_identity


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "models")
    publish_identity(repo, "ident", 4)
    return repo


def job(repo: ModelRepository, source: Path, target: Path, **kw) -> JobConfig:
    kw.setdefault("chunk_rows", 4)
    kw.setdefault("batch_size", 2)
    kw.setdefault("max_error_rate", 1.0)
    kw.setdefault("model", "ident")
    return JobConfig(input=source, output=target, repo=repo.root, progress=False, **kw)


def errors_of(target: Path) -> list[tuple[int, object, str]]:
    path = target.with_name(target.name + ".errors.jsonl")
    return [
        (e["row"], e["id"], e["reason"]) for e in map(json.loads, path.read_text().splitlines())
    ]


def test_bad_csv_rows_are_set_aside_with_row_id_and_reason(repo, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text(
        "id,a,b,c,d\n"
        "r0,1,2,3,4\n"
        "r1,1,2,3\n"  # a column short
        "r2,1,two,3,4\n"  # not a number
        "\n"  # an empty line
        "r4,1,2,nan,4\n"  # NaN
        "r5,1,,3,4\n"  # an empty value
        "r6,1,2,3,4,5\n"  # a column too many
        "r7,inf,2,3,4\n"  # infinity
        "r8,5,6,7,8\n"
    )
    target = tmp_path / "out.parquet"
    summary = run_job(job(repo, source, target))
    assert errors_of(target) == [
        (1, None, "4 columns, expected 5"),
        (2, "r2", "column 'b': 'two' is not a number"),
        (3, None, "empty line"),
        (4, "r4", "column 'c' is empty"),  # pyarrow reads "nan" as a missing value
        (5, "r5", "column 'b' is empty"),
        (6, None, "6 columns, expected 5"),
        (7, "r7", "column 'a': NaN or infinity; expected a finite number"),
    ]
    table = pq.read_table(target)
    assert table["row"].to_pylist() == [0, 8]
    assert table["id"].to_pylist() == ["r0", "r8"]
    assert np.array(table["y"].to_pylist()).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert (summary.rows, summary.predicted, summary.errors) == (9, 2, 7)


def test_bad_json_lines(repo, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(
        '{"id": 1, "v": [1, 2, 3, 4]}\n'
        '{"id": 2, "v": [1, 2, 3]}\n'
        "{not json}\n"
        '{"id": 4}\n'
        '{"id": 5, "v": [1, "x", 3, 4]}\n'
        '{"id": 6, "v": [1, 2, 3, NaN]}\n'
        '{"id": 7, "v": [5, 6, 7, 8]}\n'
    )
    target = tmp_path / "out.jsonl"
    run_job(job(repo, source, target))
    reasons = errors_of(target)
    assert [(r, i) for r, i, _ in reasons] == [(1, 2), (2, None), (3, 4), (4, 5), (5, None)]
    assert reasons[0][2] == "column 'v' holds 3 values, expected 4"
    assert reasons[1][2].startswith("not valid JSON")
    assert reasons[2][2] == "column 'v' is missing"
    assert reasons[3][2] == "value 1: 'x' is not a number"
    assert reasons[4][2].startswith("not valid JSON")  # NaN is not JSON
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["row"], r["id"], r["y"]) for r in rows] == [
        (0, 1, [1, 2, 3, 4]),
        (6, 7, [5, 6, 7, 8]),
    ]


def test_bad_parquet_values(repo, tmp_path):
    table = pa.table(
        {
            "id": [10, 11, None, 13, 14],
            "v": pa.array(
                [[1.0, 2, 3, 4], [1.0, 2], [1.0, 2, 3, 4], None, [1.0, float("nan"), 3, 4]]
            ),
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(table, source)
    target = tmp_path / "out.npz"
    run_job(job(repo, source, target))
    assert errors_of(target) == [
        (1, 11, "column 'v' holds 2 values, expected 4"),
        (2, None, "id column 'id' is empty"),
        (3, 13, "column 'v' is empty"),
        (4, 14, "column 'v': NaN or infinity; expected a finite number"),
    ]
    with np.load(target) as out:
        assert out["row"].tolist() == [0] and out["id"].tolist() == [10]


def test_bad_png_files(tmp_path):
    repo = ModelRepository(tmp_path / "models")
    publish_classifier(repo, "img", row_shape=(1, 4, 4))
    folder = tmp_path / "pngs"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(np.zeros((4, 4))))
    (folder / "b.png").write_bytes(b"GIF89a")
    (folder / "c.png").write_bytes(encode_png(np.zeros((5, 4))))
    (folder / "d.png").write_bytes(encode_png(np.ones((4, 4)))[:40])
    target = tmp_path / "out.csv"
    run_job(job(repo, folder, target, model="img"))
    assert errors_of(target) == [
        (1, "b.png", "not a PNG file (no PNG signature)"),
        (2, "c.png", "image is 4x5 pixels; the model takes 4x4 (or a multiple)"),
        (3, "d.png", "no image data (IDAT chunk): the file is truncated or incomplete"),
    ]


def test_the_error_share_decides_the_exit_code(repo, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("a,b,c,d\n1,2,3,4\n1,2,3\n5,6,7,8\n1,2,3,4\n")
    with pytest.raises(
        TooManyErrors, match=r"1 of 4 rows were bad \(25.00%\), more than --max-error-rate 10.00%"
    ):
        run_job(job(repo, source, tmp_path / "a.csv", max_error_rate=0.1))
    assert (tmp_path / "a.csv").read_text().count("\n") == 4  # the output is complete anyway
    assert run_job(job(repo, source, tmp_path / "b.csv", max_error_rate=0.25)).errors == 1
    code = main(
        [
            "--model",
            "ident",
            "--repo",
            str(repo.root),
            "--input",
            str(source),
            "--output",
            str(tmp_path / "c.csv"),
            "--max-error-rate",
            "10%",
            "--no-progress",
        ]
    )
    assert code == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"input": "missing.csv"}, "input {tmp}/missing.csv does not exist"),
        ({"model": "nope"}, "model 'nope' is not in the repository {tmp}/models (models: ident)"),
        (
            {"output": "no/such/dir/out.csv"},
            "output {tmp}/no/such/dir/out.csv: the folder {tmp}/no/such/dir does not exist",
        ),
        (
            {"output": "out.txt"},
            "output {tmp}/out.txt: cannot tell the format from the suffix '.txt'",
        ),
        (
            {"features": ("a", "b")},
            "input {tmp}/in.csv: model 'ident' takes 4 numbers per row (input 'x' FP32[-1, 4]); the feature columns ['a', 'b'] (2 columns) give 2",
        ),
        ({"features": ("zz*",)}, "input {tmp}/in.csv: no column matches feature 'zz*'"),
        ({"id_column": "key"}, "input {tmp}/in.csv: no id column 'key'"),
        ({"variant": "int8"}, "model 'ident' version 1 has no variant 'int8'; it has ['fp32']"),
        ({"max_error_rate": 2.0}, "--max-error-rate: expected 0..1, got 2.0"),
        ({"engine": "spark"}, "--engine 'spark': expected one of local, http, ray"),
    ],
)
def test_a_job_that_cannot_start_says_why(repo, tmp_path, change, message):
    source = tmp_path / "in.csv"
    source.write_text("a,b,c,d\n1,2,3,4\n")
    settings = {"model": "ident", "input": source, "output": tmp_path / "out.csv", **change}
    for key in ("input", "output"):
        if isinstance(settings[key], str):
            settings[key] = tmp_path / settings[key]
    with pytest.raises(SetupError) as info:
        run_job(job(repo, settings.pop("input"), settings.pop("output"), **settings))
    assert info.value.message.startswith(message.format(tmp=tmp_path))
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.csv.partial").exists()


def test_the_command_line_prints_one_line_and_exits_2(repo, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    source = tmp_path / "in.npy"
    np.save(source, np.zeros((2, 4), np.float32))
    common = ["--repo", str(repo.root), "--no-progress"]
    cases = [
        (
            [
                "--model",
                "ident",
                "--input",
                str(tmp_path / "nope.npy"),
                "--output",
                str(tmp_path / "o.csv"),
            ],
            f"error: input {tmp_path}/nope.npy does not exist",
        ),
        (
            ["--model", "nope", "--input", str(source), "--output", str(tmp_path / "o.csv")],
            f"error: model 'nope' is not in the repository {repo.root} (models: ident)",
        ),
    ]
    import os

    if os.geteuid() != 0:  # root writes anywhere
        cases.append(
            (
                [
                    "--model",
                    "ident",
                    "--input",
                    str(source),
                    "--output",
                    str(tmp_path / "ro" / "o.csv"),
                ],
                f"error: output {tmp_path}/ro/o.csv: the folder {tmp_path}/ro is not writable (permissions)",
            )
        )
    for argv, expected in cases:
        assert main(argv + common) == 2
        err = capsys.readouterr().err
        assert err.strip() == expected
        assert "Traceback" not in err


def test_an_existing_output_is_kept_unless_overwrite(repo, tmp_path):
    source = tmp_path / "in.npy"
    np.save(source, np.ones((3, 4), np.float32))
    target = tmp_path / "out.csv"
    target.write_text("precious\n")
    with pytest.raises(SetupError, match="already exists; pass --overwrite to replace it"):
        run_job(job(repo, source, target))
    assert target.read_text() == "precious\n"
    run_job(job(repo, source, target, overwrite=True))
    assert target.read_text().startswith('"row","y_0"')
