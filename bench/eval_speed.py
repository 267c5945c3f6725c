"""Evaluation speed and memory, side by side: s3prl's own SuperbASV stage 3 vs our evaluation, each in its own process.

    make bench                                        # setup + both benches (fbank)
    .venv-bench/bin/python -m bench.eval_speed         # this one (a few minutes on fbank)
    .venv-bench/bin/python -m bench.eval_speed --quick # smoke run (300 trials, one repetition)
    .venv-bench/bin/python -m bench.eval_speed --ckpt_dir exp/<run>/step-<N>   # trained weights
    .venv-bench/bin/python -m bench.eval_speed --upstream hubert_local \
        --upstream_ckpt exp/bench/upstreams/base/hubert.pt --max_utts 40 --repeats 1   # HuBERT Base (95 M)

Same data (the trial list's unique test utterances, raw audio as SuperbASV scores them), same upstream
(fbank, or any s3prl hub name with the same --upstream_ckpt), the same featurizer/x-vector weights in both
models (ours are copied into s3prl's Featurizer, SuperbXvector and AM-softmax, whose parameter names
match). s3prl runs its real stage 3 (`SuperbASV().run(start=3)`: batch 1, per-trial cosine loop, 2 DataLoader
workers by default); ours runs what evaluate.py runs: Embedder + embed_checkpoints (length-sorted batches of at
most --eval_max_frames samples, evaluate.py's workers for the device) + trial_scores. Each run of each side is a
fresh child process (`--child`; ours on .venv's interpreter, which has none of s3prl's runner extras), so one
side's imports and memory never reach the other's: each reports its own peak RSS (VmHWM). With
--checkpoints N, N checkpoints of one upstream (SUPERB scores every saved one): s3prl's stage 3 evaluates each in
turn, ours embeds them in one pass. Each side's time covers building the model, reading the audio and scoring the
trials; each side's model build is also timed on its own, and the steady-state rate leaves it out (it is paid once
per checkpoint, whatever the list's size). Our run also times its upstream forward (asv.forward
.embedding_features) inside itself. Both EERs are printed (same weights: they must agree within 0.01 point) and
every trial's score compared, and every embedding: the cosine between s3prl's stage-3 embedding of each test
utterance and ours. Our run records the fp32 precision flags (asv.forward.fp32_precision) in force when its
x-vector's forward starts, from a hook on the downstream, and those in force outside it. Last line:
`ratio=<ours/s3prl>` (steady-state utterances/s).
"""

from __future__ import annotations

import os

# s3prl's test loop iterates a tqdm bar per checkpoint and per trial; a disabled bar still iterates.
# (Not in training: s3prl's training loop counts its steps on the bar itself, see bench/train_speed.py.)
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench.common import (  # noqa: E402
    CORPORA,
    ROOT,
    WORK,
    Corpus,
    LoadMonitor,
    machine_banner,
    our_python,
    peak_rss,
    prepare_corpus,
    run_child,
    s3prl_view,
    select_trials,
)

# s3prl's DataLoader workers (--s3prl_workers; its own default is 6, more processes than this bench's 2 cores).
# Ours default to evaluate.py's own choice per device (asv.extract.eval_workers).
S3PRL_WORKERS = 2
# Issue 11's targets on a 2-core CPU with a real-size upstream: >= 1.3x s3prl, within 1.15x of the upstream
# forward alone (fbank, issue 4: >= 1.6x s3prl). Issue 21: peak RSS of one checkpoint <= 1.25x s3prl's.
TARGET_VS_S3PRL, TARGET_VS_UPSTREAM, FBANK_TARGET_VS_S3PRL, TARGET_RSS = 1.3, 1.15, 1.6, 1.25
EER_TOLERANCE = 0.01  # percentage points, for the same weights
# Cosine scores of the same weights on both sides: float rounding of embeddings that agree to cosine 0.99999
# (asv/batch_exact.py's bound) moves a score by at most ~1e-5.
SCORE_TOLERANCE = 1e-5


def our_checkpoint(
    work: Path, ckpt_dir: str | None, corpus: Corpus, upstream: str, upstream_ckpt: str | None, seed: int = 0
):
    """A checkpoint directory evaluate.py's Embedder reads (config.yaml + embedder.safetensors), and its
    full state (with the AM-softmax head). Default: SUPERB's model on `upstream`, random weights from `seed`."""
    from asv.config import TrainConfig, load_train_config, parse, save_config
    from asv.models import build_speaker_model
    from asv.upstream import build_upstream

    if ckpt_dir:
        cfg = load_train_config(Path(ckpt_dir) / "config.yaml")
        state = load_file(Path(ckpt_dir) / "embedder.safetensors")
        head_file = Path(ckpt_dir) / "model.safetensors"  # the head only matters for the copy's completeness
        if head_file.is_file():
            state.update({k: v for k, v in load_file(head_file).items() if k.startswith("head.")})
        if cfg.model.tunes_upstream:
            raise SystemExit(f"error: {ckpt_dir} fine-tuned its upstream; the bench compares frozen upstreams")
    else:
        flags = ["--upstream", upstream, "--data_dir", str(corpus.data_dir)]
        cfg, _ = parse(TrainConfig, flags + (["--upstream_ckpt", str(upstream_ckpt)] if upstream_ckpt else []))
        num_classes = len(json.loads((corpus.data_dir / "speakers.json").read_text()))
        frozen = build_upstream(upstream, upstream_ckpt)  # before seeding: loading it may draw random numbers
        torch.manual_seed(seed)
        state = build_speaker_model(cfg.model, cfg.loss, frozen, num_classes).state_dict()
    out = work / ("ours_ckpt" if seed == 0 else f"ours_ckpt_{seed}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}, out / "embedder.safetensors")
    return out, cfg, state


def s3prl_upstream(cfg) -> dict:
    """SuperbASV's build_upstream section for our config's upstream."""
    up = dict(name=cfg.model.upstream, normalize=cfg.model.upstream_normalize)
    return up | (dict(path_or_url=str(cfg.model.upstream_ckpt)) if cfg.model.upstream_ckpt else {})


def s3prl_checkpoint(problem, target: Path, cfg, state: dict, step: int = 0) -> None:
    """target/train/step_<step> in s3prl's checkpoint format (model/ + task/), holding our weights."""
    with open(target / "spk2int.pkl", "rb") as f:
        encoder = pickle.load(f)
    m = cfg.model
    model_args = dict(
        build_model=dict(upstream_trainable=False),
        model_output_size=len(encoder),
        build_upstream=s3prl_upstream(cfg),
        build_featurizer=dict(layer_selections=m.layer_selections, normalize=m.featurizer_normalize),
        build_downstream=dict(
            output_size=m.embed_dim,
            hidden_size=m.hidden_size,
            aggregation_size=m.aggregation_size,
            dropout_p=m.dropout_p,
            batch_norm=m.batch_norm,
        ),
    )
    model = problem.build_model(**model_args)
    # Our SpeakerModel's featurizer/downstream/head are s3prl-named; strict loads prove the copy is complete.
    for name, module in (("featurizer", model.featurizer), ("downstream", model.downstream)):
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
    task_args = dict(
        build_task=dict(loss_type=cfg.loss.loss, loss_conf=dict(margin=cfg.loss.margin, scale=cfg.loss.scale)),
        encoder=encoder,
    )
    task = problem.build_task(model=model, **task_args)
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    if head and head["W"].shape == task.loss.W.shape:
        task.loss.load_state_dict(head)
    ckpt = target / "train" / f"step_{step}"
    shutil.rmtree(ckpt, ignore_errors=True)
    problem.save_model({}, ckpt / "model", model_args, model)
    problem.save_task({}, ckpt / "task", task_args, task)


def s3prl_child(spec: dict) -> dict:
    """One timed run of s3prl's stage 3 (+ its trivial stage-4 report) on step_0 .. step_<N-1>, in a process of its
    own, as `python -m s3prl.main SuperbASV --start 3` runs it: seconds (total, and of its model builds alone), EER %
    and every trial's score (in its test_trial.csv's order) per checkpoint, peak RSS."""
    from bench import s3prl_shim

    s3prl_shim.install()
    import s3prl.task.speaker_verification_task as sv
    import yaml
    from omegaconf import OmegaConf
    from s3prl.problem import SuperbASV

    from asv.config import load_train_config

    cfg = load_train_config(Path(spec["ckpts"][0]) / "config.yaml")
    target, checkpoints = Path(spec["target"]), len(spec["ckpts"])
    scores, compute_eer = [], sv.compute_eer

    def recording(labels, trial_scores):  # its test_reduction scores the trials, in test_trial.csv's order
        scores.append([float(x) for x in trial_scores])
        return compute_eer(labels, trial_scores)

    sv.compute_eer = recording
    embeddings, reduction = [], sv.SpeakerVerification.test_reduction

    def recording_reduction(self, cached_results, _dump_dir):  # stage 3 hands it every embedding of a checkpoint
        results = self.parse_cached_results(cached_results)
        names, vectors = results["unique_name"], results["spk_embedding"]
        embeddings.append({name: v.tolist() for name, v in zip(names, vectors, strict=True)})
        return reduction(self, cached_results, _dump_dir)

    sv.SpeakerVerification.test_reduction = recording_reduction
    problem = SuperbASV()
    overrides = dict(
        target_dir=str(target),
        cache_dir=spec["cache"],
        start=3,
        device=spec["device"],
        num_workers=spec["s3prl_workers"],
        test_ckpt_steps=list(range(checkpoints)),
        prepare_data=dict(dataset_root=spec["root"]),
        build_upstream=s3prl_upstream(cfg),
    )
    config = OmegaConf.merge(OmegaConf.create(problem.default_config()), overrides)
    config = OmegaConf.to_container(config, resolve=True, throw_on_missing=True)
    builds, load = [], type(problem).load_model_and_task

    def timed_load(*args, **kwargs):  # stage 3 builds the model (upstream included) and loads step_<N> here
        t = time.perf_counter()
        out = load(problem, *args, **kwargs)
        builds.append(time.perf_counter() - t)
        return out

    problem.load_model_and_task = timed_load
    t0 = time.perf_counter()
    problem.run(**config)
    seconds = time.perf_counter() - t0
    eers = [
        100.0 * yaml.safe_load((target / f"evaluate/test_trial/step_{k}/result.yaml").read_text())["EER"]
        for k in range(checkpoints)
    ]
    return {
        "seconds": seconds,
        "build_seconds": sum(builds),
        "eers": eers,
        "scores": scores,
        "embeddings": embeddings,
        "peak_rss": peak_rss(),
    }


def ours_child(spec: dict) -> dict:
    """One timed run of ours in a process of its own, set up as evaluate.py's main sets up its own: seconds (total,
    of building the Embedders, of the upstream's forward inside the run), EER %, every trial's score and every
    utterance's embedding per checkpoint, the fp32 precision flags in the downstream's forward and outside it, and
    peak RSS. Then, with `extra_precision`, the same run with that upstream precision."""
    from accelerate import Accelerator

    import asv.extract
    from asv.extract import Embedder, audio_lengths, embed_checkpoints
    from asv.forward import fp32_precision
    from asv.metrics import compute_eer
    from asv.scoring import trial_scores

    utts, trials = spec_items(spec)
    labels = [t.label for t in trials]
    accelerator = Accelerator(mixed_precision="no", cpu=spec["device"] == "cpu")
    upstream_seconds, features = [0.0], asv.extract.embedding_features

    def timed(*args, **kwargs):  # the one function our embedding runs the upstream through
        t = time.perf_counter()
        out = features(*args, **kwargs)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        upstream_seconds[0] += time.perf_counter() - t
        return out

    asv.extract.embedding_features = timed

    def run(precision: str | None) -> dict:
        upstream_seconds[0] = 0.0
        t0 = time.perf_counter()
        upstream_cache: dict = {}
        embedders = [Embedder(Path(c), accelerator.device, upstream_cache) for c in spec["ckpts"]]
        in_downstream: list[dict] = []
        for embedder in embedders:
            embedder.upstream_precision = precision or embedder.upstream_precision
            record_fp32_precision(embedder.model.downstream, in_downstream)
        build = time.perf_counter() - t0
        lengths = audio_lengths([p for _, p in utts])
        vectors = embed_checkpoints(
            embedders,
            utts,
            lengths,
            cache_files=[None] * len(embedders),
            effects=False,
            accelerator=accelerator,
            max_frames=spec["eval_max_frames"],
            num_workers=spec["workers"],
        )
        scores = [trial_scores(v, trials) for v in vectors]
        eers = [100.0 * compute_eer(x, labels)[0] for x in scores]
        seconds, scores = time.perf_counter() - t0, [[float(x) for x in v] for v in scores]
        return dict(
            seconds=seconds,
            build_seconds=build,
            upstream_seconds=upstream_seconds[0],
            eers=eers,
            scores=scores,
            embeddings=[{p: x.tolist() for p, x in v.items()} for v in vectors],
            downstream_precision={"in_downstream": in_downstream, "outside": fp32_precision()},
        )

    out = run(None) | {"peak_rss": peak_rss()}
    if spec["extra_precision"]:
        out["extra"] = run(spec["extra_precision"])
    return out


def spec_items(spec: dict):
    """(unique utterances, trials) of the spec's trial selection, read as the parent read them."""
    from asv.manifest import read_trials_csv, unique_utterances

    corpus = CORPORA[spec["corpus"]]
    trials = read_trials_csv(corpus.data_dir / "trials" / f"{corpus.trial_list}.csv")[: spec["max_trials"]]
    trials = select_trials(trials, spec["max_utts"])
    return unique_utterances(trials), trials


def record_fp32_precision(module: torch.nn.Module, seen: list[dict]) -> None:
    """Append to `seen` the fp32 precision flags (asv.forward.fp32_precision) in force each time `module`'s forward
    starts, each distinct setting once: what the real call ran under, whatever wraps it."""
    from asv.forward import fp32_precision

    def hook(_module, _args):
        flags = fp32_precision()
        if flags not in seen:
            seen.append(flags)

    module.register_forward_pre_hook(hook)


def describe_precision(flags: list[dict] | dict) -> str:
    """`cudnn.conv ieee, cuda.matmul ieee`; several settings recorded in turn are joined by ` / `."""
    settings = [flags] if isinstance(flags, dict) else flags
    return " / ".join(", ".join(f"{k} {v}" for k, v in s.items()) for s in settings) or "none recorded"


def run_side(side: str, spec_file: Path, work: Path, r: int) -> dict:
    """bench.eval_speed --child SIDE in a fresh process; its figures come back through a JSON file."""
    out = work / f"{side}_run{r}.json"
    out.unlink(missing_ok=True)
    python = sys.executable if side == "s3prl" else our_python()
    args = [python, "-m", "bench.eval_speed", "--child", side, "--spec", str(spec_file), "--child_out", str(out)]
    _, memory = run_child(args, work / f"{side}_run{r}.log")
    return json.loads(out.read_text()) | {"peak_rss_tree": memory.peak_tree}


def score_differences(s3prl_scores, our_scores, trials, target: Path) -> tuple[float, float, int]:
    """(largest |s3prl - ours| over every trial and checkpoint, smallest gap between a target's and a non-target's
    score of s3prl's on one checkpoint, how many target/non-target pairs the two sides order differently, summed
    over the checkpoints): s3prl's scores come in its test_trial.csv's order, whose wav paths link to the same
    files. An EER depends on the scores only through that order, so with no such pair the EERs must be equal."""

    def key(a, b) -> tuple[str, str]:
        return file_key(a), file_key(b)

    ours_at = {key(t.wav_path1, t.wav_path2): i for i, t in enumerate(trials)}
    with open(target / "test_trial.csv") as f:
        order = np.array([ours_at[key(r["wav_path1"], r["wav_path2"])] for r in csv.DictReader(f)])
    labels = np.array([t.label for t in trials])[order] == 1
    delta, closest, swapped = 0.0, float("inf"), 0
    for s3, ours in zip(s3prl_scores, our_scores, strict=True):
        a, b = np.asarray(s3, dtype=np.float64), np.asarray(ours, dtype=np.float64)[order]
        delta = max(delta, float(np.abs(a - b).max()))
        by_score = np.argsort(a, kind="mergesort")
        change = labels[by_score][1:] != labels[by_score][:-1]  # neighbours of opposite labels bound every such gap
        if change.any():
            closest = min(closest, float(np.diff(a[by_score])[change].min()))
        swapped += swapped_pairs(a, b, labels)
    return delta, closest, swapped


def file_key(path: str) -> str:
    """The file a wav path names (relative ones from the repository root), through s3prl's view's links."""
    return str((ROOT / path).resolve())


def embedding_cosines(s3prl_embeddings: list[dict], our_embeddings: list[dict], target: Path) -> dict:
    """Cosine between s3prl's embedding of each test utterance and ours, over every checkpoint: min, mean, and
    how many embeddings were compared. s3prl keys its embeddings by its own utterance ids, which its test_trial.csv
    maps to wav paths linking to the same files as ours."""
    path_of = {}
    with open(target / "test_trial.csv") as f:
        for r in csv.DictReader(f):
            path_of[r["id1"]], path_of[r["id2"]] = file_key(r["wav_path1"]), file_key(r["wav_path2"])
    cosines = []
    for s3, ours in zip(s3prl_embeddings, our_embeddings, strict=True):
        ours_at = {file_key(p): v for p, v in ours.items()}
        if sorted(ours_at) != sorted(path_of[name] for name in s3):
            raise SystemExit("error: s3prl's stage 3 and ours embedded different utterances")
        a = np.array([s3[name] for name in s3], dtype=np.float64)  # (N, E)
        b = np.array([ours_at[path_of[name]] for name in s3], dtype=np.float64)
        cosines.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    cosines = np.concatenate(cosines)
    return {"min": float(cosines.min()), "mean": float(cosines.mean()), "embeddings": len(cosines)}


def eer_verdict(eer_difference: float, max_score_difference: float, swapped: int) -> str:
    """Whether same-weights EERs agree: within EER_TOLERANCE, or apart only because every score agrees to float
    rounding and target/non-target pairs closer than that rounding swapped order (random weights score many trials
    alike; one swap on a short list moves the EER by more than the tolerance)."""
    if eer_difference <= EER_TOLERANCE:
        return "match"
    if max_score_difference <= SCORE_TOLERANCE and swapped:
        return f"match: {swapped} target/non-target pair(s) swapped within the scores' float rounding"
    return "MISMATCH"


def swapped_pairs(a: np.ndarray, b: np.ndarray, is_target: np.ndarray, chunk: int = 512) -> int:
    """Target/non-target pairs ordered differently (or tied on one side only) by scores a and by scores b."""
    ta, tb, na, nb = a[is_target], b[is_target], a[~is_target], b[~is_target]
    n = 0
    for i in range(0, len(ta), chunk):
        n += int((np.sign(ta[i : i + chunk, None] - na) != np.sign(tb[i : i + chunk, None] - nb)).sum())
    return n


def relative_to_test_wav(path: str, corpus: Corpus) -> str:
    """A trial list's wav path (absolute, or relative to the repository root as prepare.py writes the demo's)
    relative to the corpus's test/wav, as the VoxCeleb-format trials.txt names it."""
    return str((ROOT / path).resolve().relative_to((corpus.root / "test/wav").resolve()))


def resolve_ckpt(path: str) -> str:
    """A step-<N> checkpoint directory, or a run directory (its newest checkpoint)."""
    from asv.rundir import list_checkpoints

    if (Path(path) / "train_state.json").is_file():
        return path
    ckpts = list_checkpoints(Path(path))
    if not ckpts:
        raise SystemExit(f"error: {path} is neither a checkpoint nor a run directory with checkpoints")
    return str(ckpts[-1][1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 trials, one repetition")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    parser.add_argument("--ckpt_dir", default=None, help="train.py checkpoint or run dir (default: random weights)")
    parser.add_argument("--upstream", default="fbank", help="s3prl hub name for random weights (not with --ckpt_dir)")
    parser.add_argument("--upstream_ckpt", default=None, help="checkpoint for *_local / *_custom upstreams")
    parser.add_argument("--corpus", choices=list(CORPORA), default="demo", help="bench/common.py's corpora")
    parser.add_argument("--max_trials", type=int, default=None, help="the first N trials of the list")
    parser.add_argument("--max_utts", type=int, default=None, help="trials (in list order) over at most N utterances")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (both sides)")
    parser.add_argument("--s3prl_workers", type=int, default=S3PRL_WORKERS, help="s3prl's DataLoader workers")
    parser.add_argument(
        "--workers", type=int, default=None, help="our DataLoader workers (default: evaluate.py's, per device)"
    )
    parser.add_argument("--eval_max_frames", type=int, default=400_000, help="our batch budget (evaluate.py's)")
    parser.add_argument("--extra_precision", default=None, help="also time ours with this --upstream_precision")
    parser.add_argument(
        "--checkpoints",
        type=int,
        default=1,
        help="evaluate this many checkpoints of the same upstream (random weights, seeds 0..N-1), as SUPERB's "
        "protocol scores every saved one: s3prl's stage 3 runs the upstream per checkpoint, evaluate.py once",
    )
    parser.add_argument("--json_out", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--child", choices=["s3prl", "ours"], help=argparse.SUPPRESS)  # one side, in its process
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        result = (s3prl_child if args.child == "s3prl" else ours_child)(spec)
        Path(args.child_out).write_text(json.dumps(result))
        return 0.0
    if args.checkpoints > 1 and args.ckpt_dir:
        parser.error("--checkpoints > 1 uses random weights; leave out --ckpt_dir")
    from bench import s3prl_shim

    s3prl_shim.install()  # before the first s3prl import
    from s3prl.problem import SuperbASV

    from asv.extract import eval_workers

    max_trials, repeats = (300, 1) if args.quick else (args.max_trials, args.repeats)
    corpus = CORPORA[args.corpus]
    work = WORK / ("eval_quick" if args.quick else "eval") / f"{corpus.name}-{args.upstream}"
    work.mkdir(parents=True, exist_ok=True)

    print(machine_banner())
    load = LoadMonitor()
    prepare_corpus(corpus)
    spec = dict(corpus=corpus.name, max_trials=max_trials, max_utts=args.max_utts)
    utts, trials = spec_items(spec)
    pairs = {(relative_to_test_wav(t.wav_path1, corpus), relative_to_test_wav(t.wav_path2, corpus)) for t in trials}
    root, cache = s3prl_view(work, corpus=corpus, pairs=pairs)
    target = work / "s3prl"
    # s3prl's stages 0-1 (its csv files and speaker encoder) in a child, as its CLI runs them.
    run_child(
        [sys.executable, "-m", "bench.runner", "s3prl", "SuperbASV", "--target_dir", str(target)]
        + ["--cache_dir", str(cache), "--prepare_data.dataset_root", str(root), "--build_upstream.name", "fbank"]
        + ["--device", "cpu", "--stop", "1"],
        work / "s3prl_prepare.log",
    )
    ckpt_dir = resolve_ckpt(args.ckpt_dir) if args.ckpt_dir else None
    problem = SuperbASV()
    ckpts = []
    for k in range(args.checkpoints):
        ckpt, cfg, state = our_checkpoint(work, ckpt_dir, corpus, args.upstream, args.upstream_ckpt, seed=k)
        s3prl_checkpoint(problem, target, cfg, state, step=k)
        ckpts.append(ckpt)
    up = cfg.model.upstream + (f" ({cfg.model.upstream_ckpt})" if cfg.model.upstream_ckpt else "")
    ours_workers = eval_workers(args.workers, torch.device(args.device))
    print(
        f"eval speed: {len(trials)} trials, {len(utts)} unique test utterances (raw audio, corpus {corpus.name}), "
        f"{up}, {'weights of ' + ckpt_dir if ckpt_dir else 'seeded random weights'} in both models; {args.device}; "
        f"s3prl batch 1 with {args.s3prl_workers} DataLoader workers, ours length-sorted batches of <= "
        f"{args.eval_max_frames} samples with {ours_workers} (evaluate.py's "
        + ("default" if args.workers is None else "--num_workers")
        + "); each side in a process of its own"
        + (
            f"; {args.checkpoints} checkpoints (utterances/s count each utterance once per checkpoint)"
            if args.checkpoints > 1
            else ""
        ),
        flush=True,
    )
    for _, path in utts:  # neither side pays the first disk read
        Path(path).read_bytes()
    spec |= dict(
        ckpts=[str(c) for c in ckpts],
        target=str(target),
        cache=str(cache),
        root=str(root),
        device=args.device,
        s3prl_workers=args.s3prl_workers,
        workers=ours_workers,
        eval_max_frames=args.eval_max_frames,
        extra_precision=None,
    )
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=1))

    runs: dict[str, list] = {"s3prl": [], "ours": []}
    n = len(utts) * args.checkpoints
    for r in range(repeats):  # interleaved, so drifting background load hits both alike
        runs["s3prl"].append(run_side("s3prl", spec_file, work, r))
        if r == repeats - 1 and args.extra_precision:  # the last of our children also times the extra precision
            spec_file.write_text(json.dumps(spec | dict(extra_precision=args.extra_precision), indent=1))
        runs["ours"].append(run_side("ours", spec_file, work, r))
        s3, ours = runs["s3prl"][-1], runs["ours"][-1]
        print(
            f"  run {r + 1}: s3prl {s3['seconds']:.1f} s (model build {s3['build_seconds']:.1f} s), ours "
            f"{ours['seconds']:.1f} s (build {ours['build_seconds']:.1f} s, upstream forward "
            f"{ours['upstream_seconds']:.1f} s), steady-state ours/s3prl "
            f"{(s3['seconds'] - s3['build_seconds']) / (ours['seconds'] - ours['build_seconds']):.2f}x; peak RSS "
            f"s3prl {s3['peak_rss'] / 1e9:.2f} GB, ours {ours['peak_rss'] / 1e9:.2f} GB (with DataLoader workers, "
            f"sampled: {s3['peak_rss_tree'] / 1e9:.2f}, {ours['peak_rss_tree'] / 1e9:.2f})",
            flush=True,
        )

    def best(side: str, key: str) -> float:
        return min(x[key] if key != "run" else x["seconds"] - x["build_seconds"] for x in runs[side])

    out: dict = {"utterances": n, "trials": len(trials)}
    for side in ("s3prl", "ours"):
        out[side] = {
            "utt_per_s": n / best(side, "run"),
            "utt_per_s_with_build": n / best(side, "seconds"),
            "build_seconds": best(side, "build_seconds"),
            "peak_rss": max(x["peak_rss"] for x in runs[side]),
            "peak_rss_tree": max(x["peak_rss_tree"] for x in runs[side]),
            "eers": runs[side][-1]["eers"],
            "eer": runs[side][-1]["eers"][0],
        }
    for side, label in (("s3prl", "s3prl SuperbASV stage 3"), ("ours", "ours (evaluate.py)     ")):
        x = out[side]
        print(
            f"{label} : {x['utt_per_s']:6.2f} utterances/s steady ({x['utt_per_s_with_build']:.2f} with its "
            f"{x['build_seconds']:.1f} s model build)  EER {x['eer']:.3f}%"
        )
    extra = runs["ours"][-1].get("extra")
    if extra is not None:
        key = f"ours_{args.extra_precision}"
        out[key] = {"utt_per_s": n / (extra["seconds"] - extra["build_seconds"]), "eer": extra["eers"][0]}
        print(
            f"ours, upstream {args.extra_precision:<5}  : {out[key]['utt_per_s']:6.2f} utterances/s steady  "
            f"EER {extra['eers'][0]:.3f}% (one run)"
        )
    gap = max(abs(a - b) for a, b in zip(out["s3prl"]["eers"], out["ours"]["eers"], strict=True))
    if args.checkpoints > 1:
        print(
            "EER per checkpoint, s3prl / ours: "
            + ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(out["s3prl"]["eers"], out["ours"]["eers"], strict=True))
        )
    out["eer_difference"] = gap
    # The embeddings' own check: every trial's score on both sides, matched by its two files.
    delta, closest, swapped = score_differences(runs["s3prl"][-1]["scores"], runs["ours"][-1]["scores"], trials, target)
    out["max_score_difference"], out["closest_scores"], out["swapped_pairs"] = delta, closest, swapped
    print(
        f"scores: max |s3prl - ours| {delta:.2e} over {len(trials)} trials x {args.checkpoints} checkpoint(s) "
        f"(tolerance {SCORE_TOLERANCE:g}); closest target/non-target scores {closest:.1e}; "
        f"{swapped} target/non-target pair(s) ordered differently"
    )
    print(f"EER difference {gap:.3f} points ({eer_verdict(gap, delta, swapped)}; tolerance {EER_TOLERANCE})")
    # The embeddings themselves, and the fp32 precision our downstream computed them in.
    s3prl_embeddings = runs["s3prl"][-1]["embeddings"]
    ours_runs = {"ours": ("fp32", runs["ours"][-1])}
    if extra is not None:
        ours_runs[f"ours_{args.extra_precision}"] = (f"upstream {args.extra_precision}", extra)
    for key, (label, run) in ours_runs.items():
        cos = out[key]["cosine_vs_s3prl"] = embedding_cosines(s3prl_embeddings, run["embeddings"], target)
        precision = out[key]["downstream_precision"] = run["downstream_precision"]
        print(
            f"embeddings, ours ({label}) vs s3prl's stage 3 (batch 1), same weights: cosine min {cos['min']:.8f} "
            f"(1 - cos {1 - cos['min']:.1e}), mean {cos['mean']:.8f} over {cos['embeddings']} embeddings; "
            f"fp32 precision in our x-vector's forward: {describe_precision(precision['in_downstream'])} "
            f"(outside it: {describe_precision(precision['outside'])})"
        )
    ours_run = min(runs["ours"], key=lambda x: x["seconds"] - x["build_seconds"])
    out["vs_upstream"] = (ours_run["seconds"] - ours_run["build_seconds"]) / ours_run["upstream_seconds"]
    print(
        f"ours steady-state time = {out['vs_upstream']:.2f}x its upstream forward inside the same run (target for a "
        f"real-size upstream <= {TARGET_VS_UPSTREAM}x)"
    )
    ratio = out["ours"]["utt_per_s"] / out["s3prl"]["utt_per_s"]
    target_ratio = FBANK_TARGET_VS_S3PRL if cfg.model.upstream == "fbank" else TARGET_VS_S3PRL
    print(f"ours/s3prl {ratio:.2f}x steady-state (target >= {target_ratio}x)")
    out["rss_ratio"] = out["ours"]["peak_rss"] / out["s3prl"]["peak_rss"]
    print(
        f"peak_rss_gb s3prl={out['s3prl']['peak_rss'] / 1e9:.2f} ours={out['ours']['peak_rss'] / 1e9:.2f} "
        f"ratio={out['rss_ratio']:.2f} (each side's own process, VmHWM; target for one checkpoint <= {TARGET_RSS}x)"
    )
    out.update(ratio=ratio, load=load.stop())
    print(LoadMonitor.describe(out["load"]))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
