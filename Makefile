# Every target works on a fresh clone and is idempotent: the venv is (re)installed only
# when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FLASK := $(VENV)/bin/flask --app wsgi
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install run worker migrate test lint bench bench-quick fuzz clean

install: $(STAMP)

# llama.cpp is built portable: a native (-march=native) build crashes with a general
# protection fault on these machines. torch==2.13.0 resolves to the CPU wheel on disk.
$(STAMP): pyproject.toml examples/existing_app/faq_backend/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -e examples/existing_app/faq_backend
	touch $@

migrate: $(STAMP)
	mkdir -p instance
	$(FLASK) db upgrade

run: migrate
	$(FLASK) models build-defaults --if-missing
	$(FLASK) bootstrap
	$(VENV)/bin/gunicorn -c gunicorn.conf.py

# The batch worker (app/inference/batches/worker.py): consumes the batch queue on the gateway's
# REDIS_URL and database; run as many as you like, on any host that reaches both.
worker: migrate
	$(PY) -m app.inference.batches.worker

test: $(STAMP)
	$(PY) -m pytest

# The benchmark peers (FastAPI twin, load generator, plots) are an extra; LiteLLM gets its
# own venv from the harness.
$(BENCH_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

# Over an hour: every system, every scenario, then the local-model, audit and companion benchmarks
# (tuning, two instances, liveness, RAG, the 30-minute soak) and a random-seed fuzz run.
bench: $(BENCH_STAMP)
	$(PY) -m bench.run --all
	$(PY) -m bench.inference_bench
	$(PY) -m bench.audit_bench
	$(PY) -m bench.tuning
	$(PY) -m bench.two_instances
	$(PY) -m bench.liveness
	$(PY) -m bench.rag_bench
	$(PY) -m bench.batch_bench
	$(PY) -m bench.request_cpu
	$(PY) -m bench.soak
	$(MAKE) fuzz

# Schemathesis with a random seed and 100 examples per operation (CI runs a fixed seed and 10);
# a failure prints its seed, so `FUZZ_SEED=<seed> make fuzz` replays it.
fuzz: $(STAMP)
	TEST_REDIS_URL=$${TEST_REDIS_URL:-redis://127.0.0.1:6379/11} FUZZ_SEED=$${FUZZ_SEED:-random} \
	  FUZZ_MAX_EXAMPLES=$${FUZZ_MAX_EXAMPLES:-100} $(PY) -m pytest tests/test_fuzz.py

# About 2 minutes: a smoke run of the harness (results in bench/results/quick/, not committed).
bench-quick: $(BENCH_STAMP)
	$(PY) -m bench.run --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) instance .pytest_cache
