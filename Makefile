# pixelmill: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pixelmill-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast sweep chaos lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/pixelmill demo

test: install
	$(PY) -m pytest -m "not sweep and not chaos" $(PYTEST_ARGS)

sweep: install
	$(PY) -m pytest -m sweep $(PYTEST_ARGS)

# The full fault sweep: every example flow killed at PIXELMILL_CHAOS_KILLS seeded points
# (default 10) and resumed, plus the storage-fault points; tallies in chaos-report.jsonl.
chaos: install
	rm -f chaos-report.jsonl
	PIXELMILL_CHAOS_REPORT=$(CURDIR)/chaos-report.jsonl $(PY) -m pytest -m "chaos or sweep" tests/chaos $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not sweep and not chaos" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pixelmill tests benchmarks

bench: install
	$(PY) benchmarks/bulk_edit.py
	$(PY) benchmarks/retrieval_scan.py
	$(PY) benchmarks/pairs.py
	$(PY) benchmarks/finetune.py

clean:
	rm -rf pixelmill-demo .pixelmill .pytest_cache
