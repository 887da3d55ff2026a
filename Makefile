# The two README commands: `make demo` (set up + train the tiny model on the demo corpus)
# and `make test` (set up + run the default test suite). Both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/tiny
EXPORT ?= exports/tiny

.PHONY: setup demo test test-all bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q --no-build-isolation deepspeed==0.19.8
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) data_prep/prepare_demo.py --root data/demo
	$(PY) train.py --config configs/tiny.yaml run.dir=$(RUN)
	$(PY) -m nl.export --run $(RUN) --output $(EXPORT)
	$(PY) -m nl.evaluate --model $(EXPORT) --data data/demo/tokens
	@echo "Done. Metrics: $(RUN)/metrics.jsonl  config: $(RUN)/config.yaml  checkpoints: $(RUN)/checkpoints/  exported model: $(EXPORT)/"

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py

clean-demo:
	rm -rf data/demo runs/tiny exports/tiny
