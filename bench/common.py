"""Shared by the benches: machine banner, demo data, s3prl's view of it, child processes with memory tracking."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data/demo"  # prepare.py --dataset demo: train.csv, vad.json, trials/demo_test.csv
CORPUS = ROOT / "data/demo_corpus"  # the generated VoxCeleb1-layout tree it reads
WORK = ROOT / "exp/bench"
TRIAL_LIST = "demo_test"
# s3prl's VoxCeleb1SV treats speakers id10270..id10309 as the test set (hard-coded) and everything else as
# dev; the demo's test speakers are id10001.., so its view of the corpus renames them into that range.
S3PRL_FIRST_TEST_ID = 10270


def machine_banner() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {cpu}; {usable} usable cores ({os.cpu_count()} online); load average {load}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; python {platform.python_version()}"
    )


def prepare_demo() -> None:
    """prepare.py --dataset demo (idempotent: a second run only checks its marker)."""
    subprocess.run([sys.executable, "prepare.py", "--dataset", "demo"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def s3prl_view(work: Path, max_trials: int | None = None, corpus: Path = CORPUS) -> tuple[Path, Path]:
    """(dataset_root, cache_dir) that s3prl's SuperbASV stage 0 parses offline, over the same demo files
    (`corpus`: a tree generate_corpus wrote, by default the demo's).

    dataset_root links dev/wav to the demo's and each test speaker into s3prl's test-id range; cache_dir
    holds the two files stage 0 would download: iden_split.txt (every utterance, split 1 = train for
    dev speakers, 3 for test speakers) and voxceleb1_test_v2.txt (the demo trial list, renamed ids).
    """
    root, cache = work / "s3prl_corpus", work / "s3prl_cache"
    if root.exists():
        shutil.rmtree(root)
    (root / "test/wav").mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir()
    (root / "dev/wav").symlink_to(corpus / "dev/wav", target_is_directory=True)
    test_speakers = sorted(p.name for p in (corpus / "test/wav").iterdir())
    if len(test_speakers) > 40:
        raise ValueError("s3prl's VoxCeleb1SV has room for 40 test speakers (id10270..id10309)")
    rename = {spk: f"id{S3PRL_FIRST_TEST_ID + k}" for k, spk in enumerate(test_speakers)}
    for spk, new in rename.items():
        (root / "test/wav" / new).symlink_to(corpus / "test/wav" / spk, target_is_directory=True)

    def renamed(rel: str) -> str:
        spk, rest = rel.split("/", 1)
        return f"{rename.get(spk, spk)}/{rest}"

    dev, test = corpus / "dev/wav", corpus / "test/wav"
    lines = [f"1 {p.relative_to(dev)}" for p in sorted(dev.rglob("*.wav"))]
    lines += [f"3 {renamed(str(p.relative_to(test)))}" for p in sorted(test.rglob("*.wav"))]
    (cache / "iden_split.txt").write_text("".join(line + "\n" for line in lines))
    trials = (corpus / "trials.txt").read_text().splitlines()[:max_trials]
    out = [f"{lab} {renamed(a)} {renamed(b)}" for lab, a, b in (t.split() for t in trials)]
    (cache / "voxceleb1_test_v2.txt").write_text("".join(line + "\n" for line in out))
    return root, cache


def warm_page_cache(paths) -> None:
    """Read every file once so neither side pays the first disk read (the side run first would)."""
    for p in paths:
        Path(p).read_bytes()


class TreeMemory:
    """Peak RSS of a process and of its whole tree (DataLoader workers included), sampled every 0.2 s.

    The tree figure adds each process's RSS, so pages shared between a forked worker and its parent
    count more than once: an upper bound on the memory the run needs.
    """

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_main = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                main = self.proc.memory_info().rss
                tree = main
                for child in self.proc.children(recursive=True):
                    try:
                        tree += child.memory_info().rss
                    except psutil.Error:  # a worker that just exited
                        pass
            except psutil.Error:
                break
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, tree)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_child(args: list[str], log: Path, env: dict | None = None) -> tuple[float, TreeMemory]:
    """Run `args` from the repository root with output to `log`; return (wall seconds, memory peaks)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        memory = TreeMemory(proc.pid)
        rc = proc.wait()
        memory.stop()
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"error: {' '.join(args[:4])} ... exited with {rc}; last lines of {log}:\n{tail}")
    return time.monotonic() - t0, memory


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
