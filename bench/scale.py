"""Scale: train.py on a manifest the size of VoxCeleb2-dev (1,092,009 training utterances, 5,994 speakers).

    .venv/bin/python -m bench.scale                   # the data once (~40 s), then both measurements (~8 min)
    .venv/bin/python -m bench.scale --only train      # start-up times and the tree's peak PSS
    .venv/bin/python -m bench.scale --only workers    # what one DataLoader worker copies over an epoch

The prepared directory (exp/bench/scale/data, ~190 MB) is synthetic: train.csv, speakers.json and vad.json with
VoxCeleb2-dev's row and speaker counts and its id shape (speaker/video/00001.wav), every row pointing at one of
the 320 real files of the `long` bench corpus (bench/common.py: 4-12 s) with that file's length and VAD
intervals. Disk stays small, and every crop train.py draws is a real seek-read.

1. train.py itself, in a child: fbank upstream, SUPERB's x-vector + AM-softmax at their default sizes,
   --num_workers 4, --log_step 1, no dev list, no W&B. Seconds from its exec to its banner (data loaded, model
   built) and to its 1st and 10th update (its `step N/...` lines, timestamped as they arrive), and the peak PSS
   of the whole process tree, overall and from the 1st update on: Pss of /proc/<pid>/smaps_rollup summed over
   train.py and every descendant, every 0.2 s. PSS, not RSS: forked workers share their parent's pages, which
   RSS would count once per process.
2. One DataLoader worker over a whole epoch (`--only workers`, in a child): load the training set as train.py
   does, fork as the DataLoader does, and in the fork run TrainDataset.__getitem__ on every index of epoch 0 in
   the sampler's order, with only the audio read stubbed out (the interval lookup, the RNG and the label
   stay). The fork's USS (its private pages) before and after that pass is what each worker of a long run
   ends up copying of the parent's per-row metadata: reading a Python object writes its reference count, so
   a page read from is a page copied. After the pass the fork also runs one full garbage collection, which
   writes the header of every container object it inherited (a long-lived worker runs one sooner or later).
   A 12-update run touches ~120 rows, so the first measurement cannot show this; its peak from the 1st update
   on plus workers x (growth) is the tree a long run reaches.

Nothing is asserted; the figures are printed (and written with --json_out).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from bench.common import LONG, ROOT, WORK, LoadMonitor, machine_banner, our_python, peak_rss, prepare_corpus

# VoxCeleb2-dev as SUPERB-style recipes train on it: 1,092,009 utterances of 5,994 speakers in 145,569 videos.
VOX2_DEV_ROWS, VOX2_DEV_SPEAKERS, VOX2_DEV_VIDEOS = 1_092_009, 5_994, 145_569
SCALE = WORK / "scale"
STEP_LINE = re.compile(r"^step (\d+)/\d+ ")
BANNER_LINE = re.compile(r"^training \S+ -> ")  # print_banner's first line: after build_run, before the first batch
VIDEO_CHARS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


def write_scale_data(out: Path, rows: int, speakers: int) -> dict:
    """train.csv, speakers.json and vad.json of `rows` utterances of `speakers` speakers over the `long` corpus's
    files (prepared once). Rewritten only when the request differs from the one recorded in scale.json."""
    spec = {"rows": rows, "speakers": speakers, "base": str(LONG.data_dir), "layout": 1}
    marker = out / "scale.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    t0 = time.monotonic()
    prepare_corpus(LONG)
    from asv.manifest import read_train_csv

    base = read_train_csv(LONG.data_dir / "train.csv")
    base_vad = json.loads((LONG.data_dir / "vad.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # Speakers get rows // speakers rows each (the first rows % speakers one more); about rows / videos rows per
    # video, each video an 11-character YouTube-like id, as VoxCeleb's are.
    per_video = max(1, round(rows / VOX2_DEV_VIDEOS))
    names = [f"id{k + 1:05d}" for k in range(speakers)]
    counts = np.full(speakers, rows // speakers)
    counts[: rows % speakers] += 1
    files = rng.integers(len(base), size=rows)  # which real file each row reads
    intervals_json = [json.dumps(base_vad["intervals"][u.id]) for u in base]
    r = 0
    with open(out / "train.csv", "w", newline="") as f_csv, open(out / "vad.json", "w") as f_vad:
        writer = csv.writer(f_csv)
        writer.writerow(["id", "wav_path", "spk", "num_samples"])
        # vad.json is written as it goes: the whole intervals dict would cost the bench ~0.4 GB.
        f_vad.write(f'{{"gain_db": {json.dumps(base_vad["gain_db"])}, "vad": {json.dumps(base_vad["vad"])}, ')
        f_vad.write('"intervals": {')
        for spk, count in zip(names, counts.tolist(), strict=True):
            videos = ["".join(v) for v in rng.choice(VIDEO_CHARS, size=(-(-count // per_video), 11))]
            for j in range(count):
                utt_id = f"{spk}/{videos[j // per_video]}/{j % per_video + 1:05d}.wav"
                src = base[files[r]]
                writer.writerow([utt_id, src.wav_path, spk, src.num_samples])
                f_vad.write(("" if r == 0 else ", ") + f'"{utt_id}": {intervals_json[files[r]]}')
                r += 1
        f_vad.write("}}")
    (out / "speakers.json").write_text(json.dumps({s: i for i, s in enumerate(sorted(names))}, indent=0))
    info = {
        "spec": spec,
        "files": len(base),
        "seconds": round(time.monotonic() - t0, 1),
        "mb": {p: round((out / p).stat().st_size / 1e6, 1) for p in ("train.csv", "vad.json", "speakers.json")},
    }
    marker.write_text(json.dumps(info, indent=1))
    return info


def memory_kb(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss and USS (Private_Clean + Private_Dirty) of a process in kB, from /proc/<pid>/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


class TreePss:
    """PSS of a process and of each of its descendants, sampled every `every` seconds: a list of (seconds since
    start, the root's kB, the others' kB)."""

    def __init__(self, pid: int, every: float = 0.2):
        import psutil

        self.proc, self.every, self.t0 = psutil.Process(pid), every, time.monotonic()
        self.samples: list[tuple[float, int, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break
            pss = []
            for p in procs:
                try:
                    pss.append(memory_kb(p.pid)["pss"])
                except (OSError, KeyError, ValueError):  # exited between the listing and the read
                    pss.append(0)
            self.samples.append((time.monotonic() - self.t0, pss[0], pss[1:]))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[float, int, list[int]]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def peak(samples: list[tuple[float, int, list[int]]], since: float = 0.0) -> dict:
    """The sample with the largest tree total from `since` seconds on."""
    t, main, others = max((x for x in samples if x[0] >= since), key=lambda x: x[1] + sum(x[2]))
    return {"tree_kb": main + sum(others), "main_kb": main, "others_kb": others, "at_s": round(t, 1)}


def measure_train(data_dir: Path, steps: int, workers: int) -> dict:
    """Run train.py on data_dir; times (s from exec) of its banner and of every update, and the tree's peak PSS."""
    exp_dir = SCALE / "exp"
    shutil.rmtree(exp_dir, ignore_errors=True)
    args = [our_python(), "train.py", "--upstream", "fbank", "--data_dir", str(data_dir), "--exp_dir", str(exp_dir)]
    args += ["--num_workers", str(workers), "--total_steps", str(steps), "--log_step", "1"]
    args += ["--eval_dev", "false", "--wandb_mode", "disabled"]
    log = SCALE / "train.log"
    # Unbuffered, so each line's arrival time is when train.py printed it.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cpu0, self0 = os.times(), time.process_time()
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tree = TreePss(proc.pid)
    lines = []
    with open(log, "w") as out:
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
            out.write(f"{lines[-1][0]:8.2f} {line}")
    rc = proc.wait()
    end = time.monotonic() - t0
    cpu = os.times()
    # train.py waits for its workers, so the children's CPU time covers the whole tree.
    cpu_s = cpu.children_user - cpu0.children_user + cpu.children_system - cpu0.children_system
    samples = tree.stop()
    sampler_cpu_s = time.process_time() - self0  # this process's share of the machine while train.py ran
    if rc != 0:
        tail = "\n".join(text for _, text in lines[-25:])
        raise SystemExit(f"error: train.py exited with {rc}; last lines of {log}:\n{tail}")
    updates = {int(m.group(1)): t for t, text in lines if (m := STEP_LINE.match(text))}
    return {
        "command": " ".join(args[1:]),
        "banner_s": next((round(t, 2) for t, text in lines if BANNER_LINE.match(text)), None),
        "update_s": {k: round(t, 2) for k, t in sorted(updates.items())},
        "end_s": round(end, 2),
        "cpu_s": round(cpu_s, 1),
        # Loading peaks in train.py alone; from the first update on, the workers hold their share.
        "peak_pss": peak(samples),
        "peak_pss_training": peak(samples, since=updates[1]) if 1 in updates else None,
        "pss_samples": len(samples),
        "sampler_cpu_s": round(sampler_cpu_s, 1),
    }


def _no_audio(path, intervals, max_samples, rng, gain_db=0.0):
    """read_crop without the file: its first use of the intervals stays (they are what the worker touches)."""
    np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    return np.zeros(1, dtype=np.float32)


def worker_pass(data_dir: Path) -> dict:
    """In this process: load the training set as train.py does, then fork one worker-like child that fetches every
    item of an epoch without reading audio; its memory before and after (run with --child workers)."""
    import asv.datasets
    from asv.config import TrainConfig
    from asv.datasets import EpochSampler, load_train_set

    data = TrainConfig().data
    before = memory_kb()
    t0, cpu0 = time.monotonic(), time.process_time()
    dataset, _, stats = load_train_set(data_dir, data.min_secs, data.max_secs, seed=0)
    load_s, load_cpu_s = time.monotonic() - t0, time.process_time() - cpu0
    gc.collect()  # what is left is what the DataLoader's workers inherit
    loaded = memory_kb()
    peak_kb = peak_rss() // 1024
    asv.datasets.read_crop = _no_audio
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: exactly the lookups a DataLoader worker makes for an epoch's keys
        try:
            os.close(read_end)
            # The sampler's order as one array: a real worker receives its indices through a queue, and a list of
            # 1.09 M ints held here would count as the worker's own growth.
            keys = EpochSampler(len(dataset), seed=0)
            order = np.fromiter((i for _, i in keys), dtype=np.int64, count=len(dataset))
            report = {"start": memory_kb()}
            t = time.monotonic()
            for i in order:
                dataset[(0, int(i))]
            report["pass_s"] = time.monotonic() - t
            report["after_pass"] = memory_kb()
            gc.collect()
            report["after_gc"] = memory_kb()
            os.write(write_end, json.dumps(report).encode())
        except BaseException:
            traceback.print_exc()
        finally:  # never return into the parent's code
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    if not text:
        raise SystemExit("error: the forked worker failed before reporting (its traceback is above)")
    report = json.loads(text)
    return {
        "rows": stats["utterances"],
        "load_s": round(load_s, 2),
        "load_cpu_s": round(load_cpu_s, 2),
        "main_before_kb": before,
        "main_loaded_kb": loaded,
        "main_peak_rss_kb": peak_kb,
        "worker": report,
    }


def run_worker_pass(data_dir: Path) -> dict:
    """worker_pass in a fresh .venv child, so that nothing this bench process holds is inherited or counted."""
    out = SCALE / "workers.json"
    out.unlink(missing_ok=True)
    cmd = [our_python(), "-m", "bench.scale", "--child", "workers", "--data_dir", str(data_dir), "--json_out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def mib(kb: float) -> str:
    return f"{kb / 1024:,.0f} MiB"


def gib(kb: float) -> str:
    return f"{kb / 2**20:.2f} GiB"


def summary(info: dict, train: dict | None, workers: dict | None, n_workers: int) -> str:
    spec = info["spec"]
    out = [
        f"data: {spec['rows']:,} rows of {spec['speakers']:,} speakers over {info['files']} real files "
        f"(train.csv {info['mb']['train.csv']} MB, vad.json {info['mb']['vad.json']} MB)"
    ]
    if train:
        u = train["update_s"]
        out += [
            f"train.py {train['command']}",
            f"  from exec: banner (data loaded, model built) {train['banner_s']:.1f} s, 1st update "
            f"{u.get(1, float('nan')):.1f} s, 10th update {u.get(10, float('nan')):.1f} s, exit {train['end_s']:.1f} s "
            f"({train['cpu_s']:.0f} CPU-s in the tree)",
        ]
        for what, p in (("", train["peak_pss"]), (" from the 1st update on", train["peak_pss_training"])):
            others = p["others_kb"]
            out.append(
                f"  peak PSS of the process tree{what}: {gib(p['tree_kb'])} at {p['at_s']} s (train.py "
                f"{gib(p['main_kb'])}, {len(others)} other processes {gib(sum(others))}"
                + (f": {', '.join(mib(k) for k in others)})" if others else ")")
            )
        out.append(
            f"  {train['pss_samples']} samples, {train['sampler_cpu_s']:.0f} CPU-s of this bench's own while sampling"
        )
    if workers:
        w, rows = workers["worker"], workers["rows"]
        grow_pass = w["after_pass"]["uss"] - w["start"]["uss"]
        grow_gc = w["after_gc"]["uss"] - w["start"]["uss"]
        loaded = workers["main_loaded_kb"]["rss"] - workers["main_before_kb"]["rss"]
        out += [
            f"training set in one process: load_train_set {workers['load_s']:.1f} s "
            f"({workers['load_cpu_s']:.1f} CPU-s) for {rows:,} rows, "
            f"+{mib(loaded)} RSS held ({loaded * 1024 / rows:.0f} B/row), peak RSS while loading "
            f"{mib(workers['main_peak_rss_kb'])}",
            f"one forked worker over a full epoch ({w['pass_s']:.0f} s of lookups): USS {mib(w['start']['uss'])} -> "
            f"{mib(w['after_pass']['uss'])} (+{grow_pass * 1024 / rows:.0f} B/row), then {mib(w['after_gc']['uss'])} "
            "after a full gc",
        ]
        if train and train["peak_pss_training"]:
            training = train["peak_pss_training"]["tree_kb"]
            out.append(
                f"a long run's tree: {gib(training)} from the 1st update on + {n_workers} workers x {mib(grow_gc)} = "
                f"{gib(training + n_workers * grow_gc)} (loading's peak: {gib(train['peak_pss']['tree_kb'])})"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=VOX2_DEV_ROWS, help="training utterances in the manifest")
    parser.add_argument("--speakers", type=int, default=VOX2_DEV_SPEAKERS)
    parser.add_argument("--workers", type=int, default=4, help="train.py --num_workers")
    parser.add_argument("--steps", type=int, default=12, help="train.py --total_steps")
    parser.add_argument("--only", choices=["train", "workers"], help="one of the two measurements")
    parser.add_argument("--json_out", type=Path, help="also write every figure here")
    parser.add_argument("--child", choices=["workers"], help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "workers":
        args.json_out.write_text(json.dumps(worker_pass(args.data_dir)))
        return

    print(machine_banner(), flush=True)
    data_dir = SCALE / "data"
    info = write_scale_data(data_dir, args.rows, args.speakers)
    print(f"data in {data_dir} ({info['seconds']} s to write when it was written)", flush=True)
    load = LoadMonitor()
    train = measure_train(data_dir, args.steps, args.workers) if args.only != "workers" else None
    workers = run_worker_pass(data_dir) if args.only != "train" else None
    load = load.stop()
    print(summary(info, train, workers, args.workers))
    print(LoadMonitor.describe(load))
    if args.json_out:
        args.json_out.write_text(json.dumps({"data": info, "train": train, "workers": workers, "load": load}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
