#!/usr/bin/env bash
# Build .venv from requirements.txt and pyproject.toml, once. Re-running is a no-op while both are
# unchanged (the stamp records their hash), so `make demo` and `make test` can both depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.stamp
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
  exit 0
fi
echo "[setup] building .venv from requirements.txt"
# Each step prints its time, so a slow setup says where it went.
step() { echo "[setup] $1 (${SECONDS} s so far)"; }
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # No GPU: take the CPU build of torch (about 1 GB instead of about 6 GB of CUDA libraries).
  # Where a local CPU wheel exists (find-links), pip picks it; elsewhere this is PyPI's default build.
  echo "[setup] no nvidia-smi: installing torch 2.13.0 (CPU build where available)"
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q "torch>=2.8,<2.15"
  step "torch installed"
fi
# The asv package itself, editable: its dependencies are requirements.txt (pyproject.toml), plus the test
# tools and the ONNX export (the "dev" and "onnx" extras). One pip run, so nothing is resolved twice.
.venv/bin/python -m pip install -q -e ".[dev,onnx]"
step "requirements, asv and its extras installed"
# PyPI's torchaudio 2.11 ships its C++ extension built against CUDA torch; next to a CPU torch its
# import fails on libc10_cuda.so. torchaudio treats the extension as optional, and nothing this
# project uses needs it (kaldi fbank/mfcc, resample, the wav2vec2 builders are pure Python), so drop
# it in that case only.
if ! .venv/bin/python -c "import torchaudio" 2>/dev/null; then
  lib=$(.venv/bin/python -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('torchaudio').origin),'lib'))")
  echo "[setup] torchaudio's C++ extension does not load next to this torch build; removing $lib/*.so (optional parts only)"
  rm -f "$lib"/*.so
  .venv/bin/python -c "import torchaudio, torchaudio.compliance.kaldi" \
    || { echo "[setup] torchaudio still fails to import; see README 'Install'"; exit 1; }
fi
.venv/bin/python -c "import asv.upstream" >/dev/null 2>&1 || true
step "imports checked"
echo "$want" > $STAMP
echo "[setup] .venv ready ($(.venv/bin/python -c 'import torch,torchaudio;print("torch",torch.__version__,"torchaudio",torchaudio.__version__)'))"
