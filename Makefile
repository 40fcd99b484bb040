# One install step serves `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python >= 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedmqtt simulate --devices 10 --rounds 10 --partition dirichlet:0.5 --uplink int8 --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

# The edit loop: everything but the end-to-end runs, the slow accuracy tests and the multi-process service tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not e2e" --ignore=tests/test_coordinator_service.py --ignore=tests/test_faults.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/codecs.py --json benchmarks/results/codecs.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
