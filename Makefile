# esclab: every target sets itself up first (a .venv with the locked packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

# The demo: a small synthetic ESC-50 (conf/experiment/demo.yaml).
DEMO_OVERRIDES := experiment=demo
# Extra overrides for repro/demo/params, e.g. make repro ARGS="dataset.archive=/path/to/ESC-50-master.zip"
ARGS ?=

.PHONY: setup browser postgres repro demo results test params bench mlflow-server

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-nodeps.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## repro: the main job, the whole pipeline on the real ESC-50 (downloads ~600 MB)
repro: setup
	python -m esclab.params $(ARGS)
	dvc repro

## demo: the same pipeline on a small synthetic ESC-50, offline, in minutes
demo: setup
	python -m esclab.params $(DEMO_OVERRIDES) $(ARGS)
	dvc repro

## results: record the workspace's pipeline run in reports/results/ (if it is a row there), rewrite README's Results table
results: setup
	esclab results --config-dir . --config-name params $(ARGS)

# Debian's Chromium and its chromedriver, for the tests that look at the MLflow UI (tests/test_mlflow_ui.py) and
# drive esclab serve's page (tests/test_serve.py): installed where this user may (root, as in CI); elsewhere those
# tests are skipped, or fail under CI=true.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "make: no chromium/chromedriver here; the browser tests will be skipped (apt-get install chromium chromium-driver)"

# Debian's PostgreSQL, for the test that runs `make mlflow-server` on a database of its own
# (tests/test_mlflow_postgres.py starts its own cluster; the Debian service is not started here): installed where
# this user may (root, as in CI); elsewhere that test is skipped, or fails under CI=true.
postgres:
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
		echo "make: no PostgreSQL here; the shared-server test will be skipped (apt-get install postgresql)"

## test: the whole test suite
test: setup browser postgres
	pytest

## params: regenerate params.yaml from conf/ after editing conf/
params: setup
	python -m esclab.params $(ARGS)

# A team's shared MLflow server: runs, params and metrics in PostgreSQL, artifacts uploaded through the server
# (--serve-artifacts) to a folder or a bucket, so a client needs nothing but MLFLOW_TRACKING_URI=http://<host>:<port>.
# The database is made once (README, "A shared MLflow server"); keep its password out of the command line, in the
# server's ~/.pgpass or $PGPASSWORD. For example:
#   make mlflow-server MLFLOW_BACKEND=postgresql://mlflow@db.lab:5432/mlflow MLFLOW_ARTIFACTS=s3://lab-mlflow/artifacts
MLFLOW_BACKEND ?= postgresql://mlflow@127.0.0.1:5432/mlflow
# a folder on the server, or s3://bucket/prefix (the server's AWS credentials; MLFLOW_S3_ENDPOINT_URL for MinIO)
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
# 0.0.0.0: every interface; 127.0.0.1 keeps it on this machine
MLFLOW_HOST ?= 0.0.0.0
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 4
# the names clients reach it by, beyond localhost and private IPs, which MLflow allows without this (e.g. mlflow.lab)
MLFLOW_ALLOWED_HOSTS ?=

## mlflow-server: a team's tracking server on PostgreSQL with served artifacts (MLFLOW_BACKEND, MLFLOW_ARTIFACTS, ...)
mlflow-server: setup
	mlflow server --backend-store-uri "$(MLFLOW_BACKEND)" --serve-artifacts --artifacts-destination "$(MLFLOW_ARTIFACTS)" \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
		$(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts "$(MLFLOW_ALLOWED_HOSTS)")

# Benchmark sizes that finish in minutes on 2 CPU cores; a GPU takes the full ones, e.g.
#   make bench BENCH_STEP= BENCH_CV="trainer=gpu_fast train.channels_last=true"
BENCH_STEP ?= --n-mels 64 --frames 128 --steps 10 --threads 1
BENCH_FAMILIES ?= --families wav2vec2,whisper,ast,resnet50 --steps 2 --warmup 1
BENCH_CV   ?= --clips-per-class 5 --folds 1 --epochs 2
BENCH_DDP  ?= --threads 1 --clips-per-class 10 dataset.synthetic.duration=1.0 dataset.synthetic.sample_rate=16000 \
	features.sample_rate=16000 features.duration=1.0 features.n_fft=512 features.hop_length=128 features.n_mels=32

## bench: features stage, embedding stage, training step (cnn4's switches, the fine-tuning recipes), 5-fold wall-clock, DDP on the CPU, the demo under another instruction set (prints, writes reports/bench/*.json)
bench: setup
	python bench/features.py
	python bench/embed.py
	python bench/train_step.py $(BENCH_STEP)
	python bench/train_step.py $(BENCH_FAMILIES) --out reports/bench/train_step_families.json
	python bench/cv_wallclock.py $(BENCH_CV)
	python bench/ddp.py $(BENCH_DDP)
	python bench/isa.py
