# Two commands for a fresh machine (see README):
#   make demo   set up .venv and write the HTML report for the bundled photos to out/
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.convscope-installed

.PHONY: demo test bench bench-quick lint clean

$(STAMP): pyproject.toml tests/requirements-peers.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the local CPU build. An unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	# peers the tests compare against, without their dependencies (see tests/requirements-peers.txt)
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -r tests/requirements-peers.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/convscope report --out out
	@echo "open out/report.html"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --update-readme

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

lint: $(STAMP)
	$(BIN)/pip install -q ruff mypy && $(BIN)/ruff check src tests benchmarks && $(BIN)/mypy

clean:
	rm -rf $(VENV) out .pytest_cache
