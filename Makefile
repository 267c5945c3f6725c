# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv once (make setup).
PY := .venv/bin/python

.PHONY: setup bench-setup demo test test-numerics test-fast lint lint-imports clean-demo bench

setup:
	@bash tools/setup_venv.sh

# Generate + prepare the embedded demo corpus, train on fbank, evaluate every checkpoint, print the table.
# DEMO_T0 is read when make starts, so the demo's closing line counts setup too.
DEMO_T0 := $(shell date +%s)
demo: setup
	$(PY) tools/demo.py --started $(DEMO_T0)

# s3prl's own runner needs extras .venv does not have (pandas, librosa, ...): bench/setup.sh puts them in
# .venv-bench, once (it is stamped: a no-op while bench/setup.sh, bench/requirements.txt and .venv are unchanged).
# The parity tests (tests/test_s3prl_parity.py) run s3prl's side there.
bench-setup: setup
	@bash bench/setup.sh

# The full suite, slow end-to-end tests and the s3prl parity tests included (CI runs exactly this).
# One process per core, at most 4 (each test file on one process, so its fixtures are built once).
test: setup bench-setup
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

# The float-sensitive tests (marker `numerics`) once more, as on a CPU without AVX-512: ATen's portable kernels,
# oneDNN's AVX2 ones and one thread each round differently from this machine's, so a tolerance fitted to one CPU's
# rounding fails here instead of on someone else's (CI runs it after `make test`). A marker that selects nothing
# makes pytest exit 5, and make fails on it like on a failing test.
NUMERICS_CPU := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1
test-numerics: setup bench-setup
	$(NUMERICS_CPU) $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile -m numerics tests

# Unit tests only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# The layering contracts of asv/ (import-linter, configured in pyproject.toml).
lint-imports: setup
	.venv/bin/lint-imports

clean-demo:
	rm -rf data/demo data/demo_corpus exp/demo

# Speed benches against s3prl's own SuperbASV runner, side by side on the demo data (bench/README.md). They run
# in .venv-bench (bench/setup.sh: .venv plus the runner's extra packages), so .venv never needs those.
BPY := .venv-bench/bin/python
bench: bench-setup
	$(BPY) -m bench.train_speed
	$(BPY) -m bench.eval_speed --ckpt_dir exp/bench/train/demo-fbank/ours
