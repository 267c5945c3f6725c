"""Shared by the benches: machine banner, demo data, s3prl's view of it, child processes with memory tracking."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from asv.corpora import worker_count

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "exp/bench"
# s3prl's VoxCeleb1SV treats speakers id10270..id10309 as the test set (hard-coded) and everything else as
# dev; the demo's test speakers are id10001.., so its view of the corpus renames them into that range.
S3PRL_FIRST_TEST_ID = 10270


@dataclass(frozen=True)
class Corpus:
    """Prepared data (prepare.py's output), the VoxCeleb1-layout tree it was read from, and its trial list's
    name (trials/<name>.csv there, <root>/trials.txt in VoxCeleb format). `generate` holds the
    asv.synth.generate_corpus arguments of a bench-only corpus (the demo's own comes from prepare.py)."""

    name: str
    data_dir: Path
    root: Path
    trial_list: str
    generate: dict = field(default_factory=dict)


# prepare.py --dataset demo: data/demo (train.csv, vad.json, trials/demo_test.csv) from the tree it generates.
DEMO = Corpus("demo", ROOT / "data/demo", ROOT / "data/demo_corpus", "demo_test")
# VoxCeleb1-like lengths (4-12 s; VoxCeleb1's mean is 8.2 s, min 4 s): nearly every training batch of 10 is
# padded to SUPERB's 8 s crop, as on the real corpus, so updates/s carries over to a projection of the full run.
LONG = Corpus(
    "long",
    ROOT / "data/bench_long",
    ROOT / "data/bench_long_corpus",
    "trials",
    dict(num_train_speakers=40, num_test_speakers=20, videos_per_speaker=2, utts_per_video=4, num_trials=1000)
    | dict(min_seconds=4.0, max_seconds=12.0),
)
# A handful of 3-4 s utterances: gpu_check.sh --cpu's dry run.
TINY = Corpus(
    "tiny",
    ROOT / "data/bench_tiny",
    ROOT / "data/bench_tiny_corpus",
    "trials",
    dict(num_train_speakers=6, num_test_speakers=4, videos_per_speaker=1, utts_per_video=4, num_trials=24)
    | dict(min_seconds=3.0, max_seconds=4.0),
)
CORPORA = {c.name: c for c in (DEMO, LONG, TINY)}


def machine_banner() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = worker_count(None)  # the cores this process may run on
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    gpu = f"\ngpu: {gpu_description()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {cpu}; {usable} usable cores ({os.cpu_count()} online); load average {load}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; python {platform.python_version()}"
        + gpu
    )


def gpu_description() -> str:
    """GPU model, memory, driver and the CUDA version torch was built with (nvidia-smi for the driver)."""
    props = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB; driver {driver}; CUDA {torch.version.cuda}"


class LoadMonitor:
    """The 1-minute load average, sampled every few seconds while a bench runs: on a shared machine other
    jobs' CPU use shows up here, and a figure measured under load says so."""

    def __init__(self, every: float = 5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"min": min(self.samples), "mean": sum(self.samples) / len(self.samples), "max": max(self.samples)}

    @staticmethod
    def describe(load: dict) -> str:
        return (
            f"1-min load average during the run: min {load['min']:.1f}, mean {load['mean']:.1f}, max "
            f"{load['max']:.1f} on {os.cpu_count()} cores (above the core count, other jobs shared the CPU)"
        )


def prepare_corpus(corpus: Corpus = DEMO) -> None:
    """Generate (once) and prepare a bench corpus; prepare.py's own marker makes a second call a no-op.

    Bench corpora keep every training speaker (--dev_speakers 0), as s3prl's view of them does."""
    args = [sys.executable, "prepare.py", "--dataset", "demo"]
    if corpus.name != "demo":
        from asv.synth import generate_corpus

        marker = corpus.root / "bench_corpus.json"
        if not marker.is_file() or json.loads(marker.read_text()) != corpus.generate:
            shutil.rmtree(corpus.root, ignore_errors=True)
            generate_corpus(corpus.root, **corpus.generate)
            marker.write_text(json.dumps(corpus.generate))
        args = [sys.executable, "prepare.py", "--dataset", "voxceleb1", "--dataset_root", str(corpus.root)]
        args += ["--trials", str(corpus.root / "trials.txt"), "--out_dir", str(corpus.data_dir), "--dev_speakers", "0"]
    subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def select_trials(trials: list, max_utts: int | None) -> list:
    """Trials, in list order, that keep the unique utterances at most max_utts (None: all): a subset whose
    embedding work is bounded, for benches on real-size upstreams."""
    if max_utts is None:
        return trials
    seen, kept = set(), []
    for t in trials:
        new = {t.wav_path1, t.wav_path2} - seen
        if len(seen) + len(new) <= max_utts:
            seen |= new
            kept.append(t)
    return kept


def s3prl_view(
    work: Path, max_trials: int | None = None, corpus: Corpus = DEMO, pairs: set | None = None
) -> tuple[Path, Path]:
    """(dataset_root, cache_dir) that s3prl's SuperbASV stage 0 parses offline, over the same corpus files.

    dataset_root links dev/wav to the corpus's and each test speaker into s3prl's test-id range; cache_dir
    holds the two files stage 0 would download: iden_split.txt (every utterance, split 1 = train for
    dev speakers, 3 for test speakers) and voxceleb1_test_v2.txt (the trial list, renamed ids): its first
    max_trials lines, or those whose (utt1, utt2) paths relative to test/wav are in `pairs`.
    """
    root, cache = work / "s3prl_corpus", work / "s3prl_cache"
    if root.exists():
        shutil.rmtree(root)
    (root / "test/wav").mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    (root / "dev").mkdir()
    (root / "dev/wav").symlink_to(corpus.root / "dev/wav", target_is_directory=True)
    test_speakers = sorted(p.name for p in (corpus.root / "test/wav").iterdir())
    if len(test_speakers) > 40:
        raise ValueError("s3prl's VoxCeleb1SV has room for 40 test speakers (id10270..id10309)")
    rename = {spk: f"id{S3PRL_FIRST_TEST_ID + k}" for k, spk in enumerate(test_speakers)}
    for spk, new in rename.items():
        (root / "test/wav" / new).symlink_to(corpus.root / "test/wav" / spk, target_is_directory=True)

    def renamed(rel: str) -> str:
        spk, rest = rel.split("/", 1)
        return f"{rename.get(spk, spk)}/{rest}"

    dev, test = corpus.root / "dev/wav", corpus.root / "test/wav"
    lines = [f"1 {p.relative_to(dev)}" for p in sorted(dev.rglob("*.wav"))]
    lines += [f"3 {renamed(str(p.relative_to(test)))}" for p in sorted(test.rglob("*.wav"))]
    (cache / "iden_split.txt").write_text("".join(line + "\n" for line in lines))
    trials = (corpus.root / "trials.txt").read_text().splitlines()[:max_trials]
    if pairs is not None:
        trials = [t for t in trials if tuple(t.split()[1:]) in pairs]
    out = [f"{lab} {renamed(a)} {renamed(b)}" for lab, a, b in (t.split() for t in trials)]
    (cache / "voxceleb1_test_v2.txt").write_text("".join(line + "\n" for line in out))
    return root, cache


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
    """Run `args` from the repository root with output to `log`; return (wall seconds, memory peaks).
    An `env` value of None removes that variable from the child's environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=child_env)
        memory = TreeMemory(proc.pid)
        rc = proc.wait()
        memory.stop()
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"error: {' '.join(args[:4])} ... exited with {rc}; last lines of {log}:\n{tail}")
    return time.monotonic() - t0, memory


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: exact, where sampling can miss a peak. Linux's VmHWM
    (its address space's own peak); getrusage's ru_maxrss would do elsewhere, but on Linux it survives exec and so
    reports the bench process's peak in every child it starts, when that is larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def our_python() -> str:
    """The project's own venv where it exists: our side must not need (nor import) the s3prl runner's extras."""
    python = ROOT / ".venv/bin/python"
    return str(python if python.exists() else sys.executable)
