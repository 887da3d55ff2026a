# The two README commands: `make demo` (set up + train the tiny HOPE on the demo corpus, export,
# evaluate, sample, plot) and `make test` (set up + run the default test suite). Both are idempotent.
# The Transformer++ demo: `make demo CONFIG=configs/tiny.yaml`; both on one plot: `make demo-compare`.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
CONFIG  ?= configs/hope_tiny.yaml
DEMO    ?= configs/demo.yaml
DATA    ?= data/demo
RUNS    ?= runs
EXPORTS ?= exports
NAME    := $(basename $(notdir $(CONFIG)))
RUN     ?= $(RUNS)/demo_$(NAME)
EXPORT  ?= $(EXPORTS)/demo_$(NAME)
PROMPT  ?= The history of
# extra key=value overrides for the demo's training runs, and extra nl.evaluate flags (tests shrink both)
DEMO_ARGS ?=
EVAL_ARGS ?=

.PHONY: setup demo demo-compare test test-all gpu-wheels bench clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q --no-build-isolation deepspeed==0.19.8
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) data_prep/prepare_demo.py --root $(DATA)
	$(PY) train.py --config $(CONFIG) --config $(DEMO) data.dir=$(DATA)/tokens run.dir=$(RUN) $(DEMO_ARGS)
	$(PY) -m nl.export --run $(RUN) --output $(EXPORT)
	$(PY) -m nl.evaluate --model $(EXPORT) --data $(DATA)/tokens $(EVAL_ARGS)
	$(PY) -m nl.generate --model $(EXPORT) --prompt "$(PROMPT)" --max-new-tokens 40 --seed 0
	$(PY) -m nl.plot $(RUN) --output $(RUN)/loss.png
	@echo "Done. Loss curves: $(RUN)/loss.png  metrics: $(RUN)/metrics.jsonl  config: $(RUN)/config.yaml  checkpoints: $(RUN)/checkpoints/  exported model: $(EXPORT)/"

# HOPE and the Transformer++ on the same tokens (same budget layer, same data order), one figure + table
demo-compare: setup
	$(PY) data_prep/prepare_demo.py --root $(DATA)
	$(PY) train.py --config configs/hope_tiny.yaml --config $(DEMO) data.dir=$(DATA)/tokens run.dir=$(RUNS)/demo_hope_tiny $(DEMO_ARGS)
	$(PY) train.py --config configs/tiny.yaml --config $(DEMO) data.dir=$(DATA)/tokens run.dir=$(RUNS)/demo_tiny $(DEMO_ARGS)
	$(PY) -m nl.plot $(RUNS)/demo_hope_tiny $(RUNS)/demo_tiny --output $(RUNS)/demo_compare.png --table $(RUNS)/demo_compare.md

# One intra-op thread per process unless set: the distributed tests run 2 ranks per test on the 2 cores, and
# torch's default threads oversubscribe them (default suite 1,164 s vs 812 s with one thread, 2026-12-01).
TEST_ENV = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
# Test files run on TEST_WORKERS pytest-xdist processes, a file's tests all on one (its module fixtures, e.g. the
# shared training runs, are built once): one per core of the 2-core VMs (default suite 1,875 s -> 1,211 s,
# docs/BENCHMARKS.md "The default test suite"). TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
PYTEST = $(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST) -m "not slow"

test-all: setup
	$(PYTEST)

# Wheels of the pure-Python packages a GPU image without package access tends to lack, in .whl/ (git-ignored),
# which benchmarks/gpu_session.sh installs before its checks. antlr4's runtime (omegaconf's parser) is an sdist
# only: built into a wheel here.
gpu-wheels: setup
	mkdir -p .whl
	$(VENV)/bin/pip download -q --no-deps --only-binary=:all: -d .whl omegaconf==2.3.0 fla-core==0.6.0
	$(VENV)/bin/pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

bench: setup
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py

clean-demo:
	rm -rf $(DATA) $(RUNS)/demo_hope_tiny $(RUNS)/demo_tiny $(RUNS)/demo_compare.png $(RUNS)/demo_compare.md \
		$(EXPORTS)/demo_hope_tiny $(EXPORTS)/demo_tiny $(RUN) $(EXPORT)
