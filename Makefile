# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv once (make setup).
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint clean-demo

setup:
	@bash tools/setup_venv.sh

# Generate + prepare the embedded demo corpus, train on fbank, evaluate every checkpoint, print the table.
demo: setup
	$(PY) tools/demo.py

# The full suite, slow end-to-end tests included (CI runs exactly this).
test: setup
	$(PY) -m pytest -q tests

# Unit tests only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean-demo:
	rm -rf data/demo data/demo_corpus exp/demo
