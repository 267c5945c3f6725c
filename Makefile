# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv once (make setup).
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint clean-demo bench

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

# Speed benches against s3prl's own SuperbASV runner, side by side on the demo data (bench/README.md). They run
# in .venv-bench (bench/setup.sh: .venv plus the runner's extra packages), so .venv and the tests never need them.
BPY := .venv-bench/bin/python
bench: setup
	@bash bench/setup.sh
	$(BPY) -m bench.train_speed
	$(BPY) -m bench.eval_speed --ckpt_dir exp/bench/train/demo-fbank/ours
