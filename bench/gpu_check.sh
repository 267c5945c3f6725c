#!/usr/bin/env bash
# Issue 11's GPU check: s3prl's SuperbASV runner fp32 vs ours fp32 vs ours with a bf16 upstream, on full-size
# random HuBERT Base and WavLM Large, training at SUPERB's batch and evaluation, in <= 8 minutes on one
# H100/H200 (bench/gpu_check.py says what it measures; bench/README.md how to run it on the device machine).
#
#   bash bench/fetch_wheels.sh            # here: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash bench/gpu_check.sh               # there, with .whl carried: installs them into /tmp/site first
#   bash bench/gpu_check.sh --cpu         # dry run on this machine's venvs: tiny upstreams, CPU, no wheels
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
  MODE=cpu
  shift
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [[ $MODE == gpu ]]; then
  PY=python3  # the image's interpreter, the one with torch
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: .whl/ holds no wheels: run 'bash bench/fetch_wheels.sh' first and carry .whl to this machine" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  # s3prl's runner needs the extras of .venv-bench (bench/setup.sh), which sees .venv's packages too.
  PY=.venv-bench/bin/python
  if [[ ! -x $PY ]]; then
    echo "error: $PY is missing: run 'bash bench/setup.sh' (or 'make bench') first" >&2
    exit 1
  fi
fi
# Every import the check needs, before minutes of work: a missing wheel fails here, in one line.
if ! "$PY" -c "import bench.s3prl_shim as s; s.install(); import s3prl.problem, asv.upstream, simple_parsing, soundfile, librosa, accelerate" 2>/tmp/gpu_check_preflight.log; then
  echo "error: the check's imports fail on $PY (see /tmp/gpu_check_preflight.log); on the GPU machine, re-run bench/fetch_wheels.sh here and carry .whl" >&2
  tail -3 /tmp/gpu_check_preflight.log >&2
  exit 1
fi
exec "$PY" -m bench.gpu_check --mode "$MODE" "$@"
