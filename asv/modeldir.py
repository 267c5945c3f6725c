"""The shareable model directory: what `evaluate.py --export_model DIR` writes and `asv.load_model(DIR)` reads.

    DIR/
      model.json              format_version, upstream, embedding, audio, decision threshold, provenance and
                              the sha256 of every file below but the card (what loading checks)
      config.yaml             the run's resolved TrainConfig: its model section rebuilds the network
      embedder.safetensors    featurizer + downstream weights (no loss head); with a fine-tuned upstream also
                              its weights, with LoRA adapters (--upstream_adapter lora) theirs only, as upstream.*
                              tensors (the checkpoint's own embedder file; adapters merge into the upstream on loading)
      calibration.json        cosine -> LLR map with the list it was fitted on (asv/calibration.py); absent
                              when the run had no calibration list
      results.json            {list: results.json of this checkpoint} as evaluate.py scored it
      README.md               the model card (upstream, recipe, training data, metrics, selection protocol)
      embedder.onnx           optional (python -m asv export_onnx): wav (1, T) -> embedding (1, E), asv/onnx_export.py

model.json, abridged:

    {"format_version": 1, "library": "superb-asv",
     "upstream": {"name": "fbank", "ckpt": null, "ckpt_sha256": null, "normalize": false, "fine_tuned": false,
                  "adapter": null},
     "embedding": {"downstream": "xvector", "dim": 512, "scoring": "cosine ..."},
     "audio": {"sample_rate": 16000, "test_effects": true, "min_samples": 2401},
     "threshold": {"value": 0.87, "source": "EER threshold on 'dev' ..."},
     "source": {"run": "demo", "step": 500, "selection": "...", "exported_at": "..."},
     "files": {"config.yaml": "<sha256>", "embedder.safetensors": "<sha256>", ...}}

The frozen upstream is named, never copied: weight-free names (fbank, mfcc, ...) need nothing, s3prl hub
names download their weights as in training, and a local checkpoint (*_local / *_custom) is looked for at
the recorded path or where `upstream_ckpt=` points, and must match the recorded sha256. Nothing here is a
pickle: safetensors, JSON and YAML only. Every problem on loading is one CheckpointError line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from asv.calibration import Calibration
from asv.config import TrainConfig, load_train_config
from asv.errors import CheckpointError, ConfigError, one_line
from asv.extract import Embedder

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
CARD = "README.md"
SCORING = "cosine of the embeddings; several enrollment files: the mean of their unit-length embeddings, renormalised"


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _is_local(ckpt: str | None) -> bool:
    """A checkpoint given as a path (not a URL or a Hugging Face hub id such as facebook/wav2vec2-base)."""
    return bool(ckpt) and not str(ckpt).startswith(("http://", "https://")) and Path(ckpt).exists()


def export_model(
    ckpt: Path,
    out_dir: Path,
    results: dict[str, dict],
    selection: str,
    training: dict,
    calibration: Calibration | None,
    threshold: dict | None,
    upstream_cache: dict | None = None,
) -> Path:
    """Write the model directory for checkpoint `ckpt` (see the module docstring); returns its path.

    `results`: {list name: that list's results.json at this checkpoint}; `selection`: how this checkpoint
    was chosen, in words; `training`: what the model card says about the training data; `threshold`:
    {"value", "source"} of the decision threshold, or None."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    cfg = load_train_config(ckpt / "config.yaml")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MODEL_JSON).is_file():
        raise ConfigError(f"--export_model {out_dir} exists and is not a model directory; choose a new path")
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.yaml", "embedder.safetensors"):
        shutil.copyfile(ckpt / name, tmp / name)
    if calibration is not None:
        calibration.save(tmp / "calibration.json")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    up = cfg.model
    embedder = Embedder(ckpt, "cpu", upstream_cache)
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "superb-asv",
        "task": "speaker verification",
        "upstream": {
            "name": up.upstream,
            "ckpt": up.upstream_ckpt,
            "ckpt_sha256": sha256_path(Path(up.upstream_ckpt)) if _is_local(up.upstream_ckpt) else None,
            "normalize": up.upstream_normalize,
            "fine_tuned": up.upstream_trainable,
            # LoRA's settings when the upstream trained adapters: the recorded base checkpoint is then required too.
            "adapter": None if up.upstream_adapter == "none" else adapter_settings(up),
        },
        "embedding": {"downstream": up.downstream, "dim": embedder.embed_dim, "scoring": SCORING},
        "audio": {
            "sample_rate": 16000,
            "test_effects": cfg.data.test_effects,
            "min_samples": embedder.min_samples,
        },
        "threshold": threshold,
        "source": {
            "run": ckpt.parent.name,
            "ckpt_dir": str(ckpt),
            "step": json.loads((ckpt / "train_state.json").read_text())["step"],
            "selection": selection,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    meta["files"] = {p.name: sha256_path(p) for p in sorted(tmp.iterdir())}
    (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=1))
    (tmp / CARD).write_text(model_card(meta, cfg, results, training, calibration))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def adapter_settings(model_cfg) -> dict:
    """model.json's record of an upstream's adapters: kind, rank, alpha, dropout and the target layers asked for."""
    return {
        "kind": model_cfg.upstream_adapter,
        "rank": model_cfg.lora_rank,
        "alpha": model_cfg.lora_alpha,
        "dropout": model_cfg.lora_dropout,
        "target_modules": model_cfg.lora_target_modules,  # None: the upstream family's defaults (asv/adapters.py)
    }


def add_file(model_dir: Path, name: str, extra: dict | None = None) -> None:
    """Record a file written into an exported directory later (embedder.onnx) in model.json, with its hash."""
    path = Path(model_dir) / MODEL_JSON
    meta = json.loads(path.read_text())
    meta["files"][name] = sha256_path(Path(model_dir) / name)
    meta.update(extra or {})
    path.write_text(json.dumps(meta, indent=1))


@dataclass
class ModelDir:
    """A validated model directory: its model.json, the TrainConfig to build from, calibration, threshold."""

    path: Path
    meta: dict
    cfg: TrainConfig
    calibration: Calibration | None

    @property
    def threshold(self) -> tuple[float | None, str]:
        t = self.meta.get("threshold")
        if not t:
            return None, f"no threshold: {self.path} was exported without a dev or calibration list"
        return float(t["value"]), f"{t['source']}, from {self.path / MODEL_JSON}"


def read_model_dir(path: str | Path, upstream_ckpt: str | None = None) -> ModelDir:
    """Validate everything `load_model` needs (version, files, hashes, config, calibration, upstream checkpoint),
    each failure one CheckpointError line naming the file and what to do. Weight names and shapes are checked
    when the model is built (asv/extract.py Embedder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    meta_path = path / MODEL_JSON
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} has no {MODEL_JSON}: not a model directory (python evaluate.py --ckpt_dir exp/<run>/step-<N> "
            "--export_model DIR writes one)"
        )
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{meta_path} is unreadable ({one_line(err)})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        hint = "upgrade superb-asv" if isinstance(version, int) and version > FORMAT_VERSION else "re-export it"
        raise CheckpointError(
            f"{meta_path}: format_version {version!r}, this code reads version {FORMAT_VERSION}; {hint}"
        )
    files, upstream = meta.get("files"), meta.get("upstream")
    if not isinstance(files, dict) or not isinstance(upstream, dict) or "name" not in upstream:
        raise CheckpointError(f"{meta_path} lacks its 'files' or 'upstream' entry; re-export the model")
    for required in ("config.yaml", "embedder.safetensors", "results.json"):
        if required not in files:
            raise CheckpointError(f"{meta_path} does not list {required}; re-export the model")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path} lacks {name}, which {MODEL_JSON} lists (an incomplete copy or download?)")
        if sha256_path(f) != digest:
            raise CheckpointError(
                f"{f} does not match the sha256 recorded in {MODEL_JSON} (modified or corrupted); re-download it"
            )
    try:
        cfg = load_train_config(path / "config.yaml")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if cfg.model.upstream != upstream["name"]:
        raise CheckpointError(
            f"{meta_path} names upstream {upstream['name']}, config.yaml {cfg.model.upstream}: mixed-up files"
        )
    ckpt = resolve_upstream_ckpt(upstream, upstream_ckpt, meta_path)
    cfg = replace(cfg, model=replace(cfg.model, upstream_ckpt=ckpt))
    calibration = Calibration.load(path / "calibration.json") if "calibration.json" in files else None
    return ModelDir(path, meta, cfg, calibration)


def resolve_upstream_ckpt(upstream: dict, override: str | None, meta_path: Path) -> str | None:
    """The upstream checkpoint to build from: `override`, else the recorded one; a local file must have the
    recorded sha256 (the featurizer and head were trained on exactly those upstream weights)."""
    recorded, digest = upstream.get("ckpt"), upstream.get("ckpt_sha256")
    ckpt = override or recorded
    if not ckpt:
        return None
    if digest is None:  # a URL or a hub id: s3prl fetches it as in training
        return ckpt
    if not Path(ckpt).exists():
        raise CheckpointError(
            f"{meta_path}: upstream {upstream['name']} needs its checkpoint {Path(recorded).name} (sha256 "
            f"{digest[:12]}...), not found at {ckpt}; pass upstream_ckpt=PATH (python -m asv: --upstream_ckpt PATH)"
        )
    if sha256_path(Path(ckpt)) != digest:
        raise CheckpointError(
            f"{ckpt} is not the upstream checkpoint this model was trained on (sha256 differs from {meta_path}); "
            "pass the original file"
        )
    return str(ckpt)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _batch(cfg: TrainConfig, results: dict) -> str:
    """The card's batch: the effective batch evaluate.py read from the checkpoint (labelled when not SUPERB's), or
    for a checkpoint older than that record, the per-process batch its config names."""
    head = next(iter(results.values()), {})
    if head.get("effective_batch") is None:
        acc = cfg.optim.gradient_accumulate
        return f"batch {cfg.data.batch_size}" + (f" x accumulation {acc}" if acc else "") + " per process"
    return head.get("effective_batch_note") or f"{head['effective_batch']} utterances per update (SUPERB's recipe)"


def model_card(meta: dict, cfg: TrainConfig, results: dict, training: dict, calibration: Calibration | None) -> str:
    """README.md of the model directory (a Hugging Face model card): what it is, how it was trained and
    selected, what it scores, and how to use it."""
    m, loss, src = cfg.model, cfg.loss, meta["source"]
    mixing = "two softmax-weighted sums (keys, values)" if m.downstream == "mhfa" else "softmax-weighted sum"
    up = meta["upstream"]
    kept = ", fine-tuned (weights included)" if up["fine_tuned"] else ", frozen (named, not included)"
    if up.get("adapter"):
        kept += f", with LoRA adapters (rank {m.lora_rank}, alpha {m.lora_alpha:g}; included, merged on loading)"
    layers = "all hidden states" if m.layer_selections is None else f"hidden states {m.layer_selections}"
    lines = [
        "---",
        "library_name: superb-asv",
        f"tags: [speaker-verification, superb, s3prl, {m.upstream}, {m.downstream}]",
        "---",
        "",
        f"# {src['run']}: SUPERB speaker verification, {m.upstream} + {m.downstream}",
        "",
        "Speaker embeddings scored by cosine, trained with the SUPERB ASV recipe re-implemented in superb-asv.",
        "",
        "## Model",
        "",
        f"- Upstream: `{m.upstream}`" + (f" (checkpoint `{Path(up['ckpt']).name}`)" if up["ckpt"] else "") + kept,
        f"- Featurizer: {mixing} of {layers}" + (", layer-normalised" if m.featurizer_normalize else ""),
        f"- Downstream: `{m.downstream}`, {meta['embedding']['dim']}-dimensional embeddings",
        f"- Loss: `{loss.loss}` (margin {loss.margin}, scale {loss.scale})",
        f"- Training: {src['step']} optimizer updates, {cfg.optim.optimizer} lr {cfg.optim.lr}, "
        f"{_batch(cfg, results)}, crops of at most {cfg.data.max_secs} s",
        f"- Test audio: {'gain -3 dB + VAD, as in training' if meta['audio']['test_effects'] else 'raw'}, 16 kHz mono",
        "",
        "## Training data",
        "",
        f"- {training.get('description', 'not recorded')}",
    ]
    summary = training.get("summary") or {}
    if summary:
        lines.append(
            f"- Dataset `{summary.get('dataset')}`: {summary.get('utterances')} utterances, "
            f"{summary.get('speakers')} speakers, {summary.get('hours')} h"
        )
    lines += [
        "",
        "## Checkpoint selection",
        "",
        f"Step {src['step']} of run `{src['run']}`: {src['selection']}.",
        "",
        "## Results at this checkpoint",
        "",
        "EER in percent; minDCF and actDCF normalised, C_miss = C_fa = 1; Cllr in bits. Cllr and actDCF read the",
        "calibrated LLRs"
        + (
            f", {calibration.describe()}: held-out numbers on every other list."
            if calibration
            else "; this model has no calibration, so they are absent."
        ),
        "",
        "| trials | # trials | EER % | minDCF@0.01 | minDCF@0.05 | min Cllr | Cllr | actDCF@0.01 | actDCF@0.05 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        note = " (calibration list)" if calibration and name == calibration.list_name else ""
        lines.append(
            f"| {name}{note} | {r['num_trials']} | {r['eer']:.2f} | {r['min_dcf@0.01']:.4f} | {r['min_dcf@0.05']:.4f} "
            f"| {_fmt(r.get('min_cllr'), '.4f')} | {_fmt(r.get('cllr'), '.4f')} | {_fmt(r.get('act_dcf@0.01'), '.4f')} "
            f"| {_fmt(r.get('act_dcf@0.05'), '.4f')} |"
        )
    thr = meta.get("threshold")
    lines += [
        "",
        f"Decision threshold: {thr['value']:.4f} ({thr['source']})." if thr else "No decision threshold recorded.",
        "",
        "## Use",
        "",
        "```python",
        "import asv  # superb-asv",
        "",
        'model = asv.load_model("PATH_OR_HUB_ID")',
        'model.verify("enroll.wav", "test.wav")  # score, llr, p_same, same_speaker',
        'model.verify(["enroll1.wav", "enroll2.wav"], "test.wav")  # several enrollment files',
        'emb = model.embed(["a.wav", "b.wav"])  # (2, dim)',
        "```",
        "",
        "```bash",
        "python -m asv verify --model PATH_OR_HUB_ID --enroll a.wav b.wav --test c.wav",
        "python -m asv score --model PATH_OR_HUB_ID --trials trials.txt --out scores.txt",
        "```",
        "",
        f"Files and their format: `{MODEL_JSON}` (format_version {meta['format_version']}) and superb-asv's "
        "asv/modeldir.py.",
        "",
    ]
    return "\n".join(lines)
