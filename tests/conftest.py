import os
from pathlib import Path

import pytest

# The checkout root (pytest puts it on sys.path: pyproject's pythonpath); the scripts run from here.
ROOT = Path(__file__).resolve().parents[1]
# Tests never talk to W&B's servers.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread for this process and every script the tests start. The tests run tiny batches, where a
# second thread only adds synchronisation; on a busy machine its spin-waiting doubles the CPU a script burns
# (a 4-update train.py run: 23 CPU-s with 2 threads, 11 with 1, measured on 2 shared cores). Results do not
# depend on it: every comparison in the suite is between runs made with the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `make test-numerics` reruns the float-sensitive tests as on a CPU without AVX-512 (ATEN_CPU_CAPABILITY=avx2 or
# default). Such a CPU limits oneDNN too: with ATen's kernels limited alone, torch 2.13's bf16 attention still packs
# its operands for oneDNN's AVX-512 kernels and raises "pack_vnni2 is only supported when avx512 is supported".
# oneDNN reads the variable at its first use, after this (and every script a test starts inherits it).
if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """The tiny generated corpus of tests/test_pipeline.py (TINY_CORPUS), prepared once for the whole session
    under <tmp>/corpus and <tmp>/data; no test may modify it. Returns (data_dir, prepare.py's CompletedProcess),
    run with a progress line per item so its non-terminal output can be checked."""
    from tests.test_pipeline import TINY_CORPUS, run

    tmp = tmp_path_factory.mktemp("tiny_demo")
    args = ["prepare.py", "--dataset", "demo", "--dataset_root", str(tmp / "corpus"), "--out_dir", str(tmp / "data")]
    out = run([*args, *TINY_CORPUS], env={"ASV_PROGRESS_EVERY_S": "0"})
    return tmp / "data", out
