"""``python -m service.batch``: score a file with a model of the repository.

Exit codes: 0 done; 1 the job stopped part-way (``--resume`` continues it); 2 it could not
start (bad option, missing input, unknown model, unwritable output); 3 done, but more rows were
bad than ``--max-error-rate`` allows; 130 / 143 interrupted by Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .engines.base import ENGINES
from .errors import BatchError
from .job import JobConfig, run_job
from .readers import DEFAULT_CHUNK_ROWS, INPUT_FORMATS
from .writers import OUTPUT_FORMATS

EXAMPLES = """examples:
  python -m service.batch --model digits-mlp --input digits.parquet --output scores.parquet
  python -m service.batch --model digits-cnn --input pngs/ --output labels.csv
  python -m service.batch --model iris-knn --input flowers.csv --output out.jsonl \\
      --features 'sepal_*,petal_*' --id-column plant
  python -m service.batch --model digits-mlp --input big.csv --output out.parquet --resume
  python -m service.batch --model digits-mlp --input x.npy --output y.npz \\
      --engine http --url http://127.0.0.1:3000 --concurrency 8
  python -m service.batch --model digits-mlp --input s3-mounted/x.parquet --output out/ \\
      --engine ray --ray-address ray://head:10001
"""


def _features(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {value!r}")
    return names


def _rate(value: str) -> float:
    try:
        rate = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a share like 0.01 or 1%, got {value!r}"
        ) from None
    return rate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.batch",
        description="Score a file (CSV, Parquet, JSON Lines, NPY, NPZ, or a folder of PNG images) "
        "with a model of the repository, in chunks, resumably, with bad rows set aside.",
        epilog=EXAMPLES + "\n" + (__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _what_to_run(p)
    _input_and_output(p)
    _running(p)
    _http_engine(p)
    _ray_engine(p)
    return p


def _what_to_run(p: argparse.ArgumentParser) -> None:
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--model", required=True, help="model name in the repository (or on the server)"
    )
    what.add_argument("--version", type=int, help="model version [default: the latest]")
    what.add_argument(
        "--variant", help="model variant, e.g. fp32 [default: the manifest's default]"
    )
    what.add_argument(
        "--truncate",
        action="store_true",
        help="text models: keep the first tokens of a text longer than the model takes "
        "[default: such a row is an error, the others are scored]",
    )
    what.add_argument(
        "--repo", type=Path, help="model repository [default: SLIMSERVE_MODEL_REPOSITORY or models]"
    )
    what.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: onnxruntime in this process; http: a running slimserve; ray: Ray Data "
        "[default: local]",
    )


def _input_and_output(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--input", type=Path, required=True, help="input file, or a folder of .png images"
    )
    io.add_argument(
        "--output",
        type=str,  # a Path would drop the "/" that asks for a folder
        required=True,
        help="output file; a path ending in / keeps one part file per chunk in that folder",
    )
    io.add_argument("--input-format", choices=INPUT_FORMATS, help="[default: from the suffix]")
    io.add_argument("--output-format", choices=OUTPUT_FORMATS, help="[default: from the suffix]")
    io.add_argument(
        "--features",
        type=_features,
        help="feature columns in order, comma-separated; globs allowed (px_*) "
        "[default: the column named like the model's input, else every column but the id]",
    )
    io.add_argument(
        "--id-column", help="a column carried to the output [default: 'id' when present]"
    )
    io.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="CSV without a header line (columns are column_0, column_1, ...)",
    )
    io.add_argument(
        "--errors",
        type=Path,
        dest="errors_path",
        help="bad rows as JSON Lines [default: OUTPUT.errors.jsonl]",
    )
    io.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")


def _running(p: argparse.ArgumentParser) -> None:
    run = p.add_argument_group("running")
    run.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"input rows per chunk, the unit of commit and resume [default: {DEFAULT_CHUNK_ROWS}]",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        help="rows per onnxruntime call or request "
        "[default: measured best (local, ray), 512 (http)]",
    )
    run.add_argument(
        "--max-error-rate",
        type=_rate,
        default=0.01,
        help="exit 3 when a larger share of rows is bad (0.01 or 1%%) [default: 0.01]",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted job after its last committed chunk",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace an existing output or unfinished job"
    )
    run.add_argument(
        "--threads",
        type=int,
        help="onnxruntime intra-op threads [default: SLIMSERVE_INTRA_OP_THREADS]",
    )
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true", help="log what happens")


def _http_engine(p: argparse.ArgumentParser) -> None:
    http = p.add_argument_group("http engine")
    http.add_argument("--url", help="server [default: http://SLIMSERVE_HOST:SLIMSERVE_PORT]")
    http.add_argument("--concurrency", type=int, default=4, help="requests in flight [default: 4]")
    http.add_argument(
        "--retries",
        type=int,
        default=5,
        help="retries of a request after a 503 or a connection error, with backoff [default: 5]",
    )
    http.add_argument(
        "--retry-backoff",
        type=float,
        default=0.5,
        dest="retry_backoff_s",
        help="seconds before the first retry, doubled each time (or the server's Retry-After) "
        "[default: 0.5]",
    )
    http.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        dest="timeout_s",
        help="seconds per request [default: 60]",
    )


def _ray_engine(p: argparse.ArgumentParser) -> None:
    ray = p.add_argument_group("ray engine")
    ray.add_argument(
        "--ray-address", help="a running cluster (ray://host:10001 or auto) [default: a local Ray]"
    )
    ray.add_argument(
        "--ray-actors", type=int, help="onnxruntime actors [default: the cluster's CPUs - 1]"
    )
    ray.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray [default: all]")


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    verbose = args.pop("verbose")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("slimserve.runtime").setLevel(logging.WARNING)
    try:
        run_job(JobConfig(**args))
    except BatchError as exc:
        print(f"{'error: ' if exc.exit_code else ''}{exc.message}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
