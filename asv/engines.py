"""What runs a frozen SSL upstream's forward when evaluation embeds on a CPU: PyTorch (s3prl's modules) or ONNX
Runtime (the same modules traced once into an ONNX graph, asv/onnx_export.py).

Both compute each utterance alone, as s3prl's evaluation does; their hidden states agree to float order (max
relative difference 2.5e-6 on a full-size random HuBERT Base, 3-20 s utterances; tests/test_engines.py checks the
families). On the CPU of this project's machines onnxruntime's kernels ran that forward 1.2-1.5x faster than
PyTorch's (2-core AMD EPYC; bench/README.md). The graph costs an export, once per upstream and machine (51-61 s
for HuBERT Base there); it is cached under --onnx_cache_dir, keyed by the upstream's weights and the versions that
shape the graph, so later evaluations of any checkpoint of that upstream load it in seconds.

`auto` (evaluate.py's default) takes onnxruntime on a CPU for a wav2vec 2.0 / HuBERT / WavLM upstream in fp32 when
onnxruntime is installed and the graph is cached or the audio to embed pays for the export, and PyTorch otherwise
(GPUs, other upstreams, short lists, --upstream_precision bf16/fp16). Each choice is announced in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from asv.errors import ConfigError, UpstreamError, one_line

# --engine choices.
ENGINES = {
    "auto": "onnxruntime where it pays (a CPU, an SSL upstream in fp32, a cached graph or enough audio), else torch",
    "torch": "s3prl's PyTorch modules",
    "onnxruntime": "the upstream traced once into an ONNX graph, run by onnxruntime on the CPU",
}
DEFAULT_ONNX_CACHE = "~/.cache/superb-asv/onnx"
# auto exports a graph that is not cached yet only for at least this much audio. The export of HuBERT Base took
# 51-61 s on a 2-core AMD EPYC, and onnxruntime saved ~25 % of PyTorch's ~0.2 s per second of audio there, so it
# pays from ~17-20 min of audio on; export time and savings both grow with the model, so the break-even does
# not move much with its size. Every VoxCeleb1 list is 11 h.
AUTO_EXPORT_MIN_SECONDS = 30 * 60
# Bumped whenever asv/onnx_export.py's upstream graph changes what it computes: older cached graphs are not reused.
GRAPH_VERSION = 1
SAMPLE_RATE = 16000


def check_engine(name: str) -> None:
    if name not in ENGINES:
        raise ConfigError(f"--engine {name}: choose one of {', '.join(ENGINES)}")


def exportable(upstream) -> str | None:
    """None if onnxruntime can run this upstream's forward, else why not (in words)."""
    from asv.onnx_export import SSL_EXPERTS

    module = getattr(upstream, "module", upstream)
    expert = getattr(module, "upstream", None)
    if type(expert).__module__ not in SSL_EXPERTS or getattr(expert, "numpy_wav_normalize", False):
        return f"upstream {getattr(module, 'name', type(expert).__name__)} is not a wav2vec 2.0 / HuBERT / WavLM expert"
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        return f"onnxruntime or onnxscript is not installed ({one_line(err)}; pip install -e '.[onnx]')"
    return None


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def upstream_fingerprint(upstream) -> str:
    """sha256 of what the graph is a function of: every weight and buffer of the upstream, its class and settings,
    and the versions of torch, s3prl and this graph (a cached graph of other weights or code is never reused).
    Computed once per loaded module (~1 s per 100 M parameters): a frozen upstream's weights do not change."""
    module = getattr(upstream, "module", upstream)
    if module not in _fingerprints:
        _fingerprints[module] = _fingerprint(module)
    return _fingerprints[module]


def _fingerprint(module) -> str:
    import s3prl

    h = hashlib.sha256()
    meta = {
        "graph": GRAPH_VERSION,
        "torch": torch.__version__,
        "s3prl": getattr(s3prl, "__version__", "?"),
        "class": f"{type(module.upstream).__module__}.{type(module.upstream).__name__}",
        "normalize": bool(module.normalize),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class OnnxUpstream:
    """A frozen upstream as an onnxruntime session: per utterance, the hidden states S3PRLUpstream returns for it
    alone (batch 1). Threads: torch's intra-op count; no spinning between calls, since the featurizer and x-vector
    run in PyTorch right after each one."""

    def __init__(self, path: Path, min_samples: int, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # warnings about unused initializers are noise
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.min_samples = Path(path), min_samples

    def states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """wav (1, T) on the CPU, T >= min_samples -> [(1, T', D)] per hidden state."""
        out = self.session.run(None, {"wav": np.ascontiguousarray(wav.numpy(), dtype=np.float32)})[0]
        return list(torch.from_numpy(out).unbind(0))

    def forward(self, wav: torch.Tensor, wav_len: torch.Tensor):
        """What asv.batch_exact.batch1_upstream_forward returns for a padded batch, from the session."""
        outs = [self.states(wav[i : i + 1, : int(n)]) for i, n in enumerate(wav_len)]
        hs = [torch.nn.utils.rnn.pad_sequence([o[k][0] for o in outs], batch_first=True) for k in range(len(outs[0]))]
        frames = torch.tensor([o[0].size(1) for o in outs])
        return hs, [frames.clone() for _ in hs]


def onnx_upstream(upstream, min_samples: int, cache_dir: str | Path, announce=print) -> OnnxUpstream:
    """The cached graph of this upstream (exported first if it is not there yet), as a session."""
    from asv.onnx_export import export_upstream

    module = getattr(upstream, "module", upstream)
    path, meta = graph_files(module, cache_dir)
    if not cached(module, cache_dir):
        cache = path.parent
        cache.mkdir(parents=True, exist_ok=True)
        announce(f"exporting upstream {getattr(module, 'name', '')} to ONNX once (cached in {cache}) ...")
        t0 = time.perf_counter()
        tmp = cache / f"{path.stem}.{os.getpid()}.tmp.onnx"
        try:
            lo, hi = export_upstream(module, tmp, min_samples)
            tmp.replace(path)  # a graph is complete or absent, also with several processes exporting at once
        finally:
            tmp.unlink(missing_ok=True)
        meta.write_text(json.dumps({"min_samples": lo, "max_samples": hi, "export_seconds": time.perf_counter() - t0}))
    info = json.loads(meta.read_text())
    return OnnxUpstream(path, info["min_samples"])


def graph_files(upstream, cache_dir: str | Path) -> tuple[Path, Path]:
    """(graph, its metadata) of this upstream in the cache, whether they exist yet or not."""
    cache, key = Path(os.path.expanduser(str(cache_dir))), upstream_fingerprint(upstream)
    return cache / f"{key}.onnx", cache / f"{key}.json"


def cached(upstream, cache_dir: str | Path) -> bool:
    return all(f.is_file() for f in graph_files(upstream, cache_dir))


def choose(
    engine: str, upstream, device, precision: str, audio_seconds: float, cache_dir: str | Path
) -> tuple[str, str]:
    """(engine, why) for embedding `audio_seconds` of audio with this upstream on `device`; `engine` onnxruntime
    where it cannot run is a one-line UpstreamError naming the reason."""
    check_engine(engine)
    if engine == "torch":
        return "torch", "--engine torch"
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    reason = None if on_cpu else f"the upstream runs on {device}, and onnxruntime here on the CPU only"
    reason = reason or (None if precision == "fp32" else f"--upstream_precision {precision} runs in PyTorch")
    reason = reason or exportable(upstream)
    if engine == "onnxruntime":
        if reason:
            raise UpstreamError(f"--engine onnxruntime cannot run here: {reason}; use --engine torch")
        return "onnxruntime", "--engine onnxruntime"
    if reason:
        return "torch", reason
    if cached(upstream, cache_dir):
        return "onnxruntime", "its graph is cached"
    if audio_seconds >= AUTO_EXPORT_MIN_SECONDS:
        return "onnxruntime", f"{audio_seconds / 60:.0f} min of audio pays for the one-time export"
    return "torch", (
        f"{audio_seconds / 60:.1f} min of audio would not pay for a one-time ONNX export "
        f"(auto exports from {AUTO_EXPORT_MIN_SECONDS // 60} min on; --engine onnxruntime forces it)"
    )
