#!/usr/bin/env bash
# Build .venv-bench: a venv that sees every package of .venv (torch, s3prl, ...) through a .pth file and
# adds the extras s3prl's SuperbASV runner needs (bench/requirements.txt). Packages installed here come
# first on sys.path, so they shadow .venv's (setuptools<81 over .venv's newer one) without touching .venv.
# Idempotent: a stamp holds the hash of this script, the requirements and .venv's own stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-bench
STAMP=$VENV/.stamp
[[ -x .venv/bin/python ]] || { echo "[bench] .venv missing: run 'make setup' first"; exit 1; }
want=$({ cat bench/setup.sh bench/requirements.txt; cat .venv/.stamp 2>/dev/null || true; } | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
  exit 0
fi
echo "[bench] building $VENV (s3prl runner extras from bench/requirements.txt)"
rm -rf "$VENV"
# Same base interpreter as .venv, so .venv's compiled packages (torch) load here.
.venv/bin/python -m venv "$VENV"
base_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
bench_site=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# A plain path line appends .venv's site-packages after this venv's own (its .pth files are not run:
# the only one there is setuptools' distutils hack, which this venv's setuptools brings itself).
echo "$base_site" > "$bench_site/_superb_asv_base_venv.pth"
$VENV/bin/python -m pip install -q -r bench/requirements.txt
# The runner imports all of s3prl.problem; fail here rather than in the middle of a bench.
$VENV/bin/python -c "import bench.s3prl_shim as s; s.install(); import s3prl.problem" \
  || { echo "[bench] s3prl.problem does not import in $VENV"; exit 1; }
echo "$want" > "$STAMP"
echo "[bench] $VENV ready: $($VENV/bin/python -m pip freeze --path "$bench_site" | tr '\n' ' ')"
