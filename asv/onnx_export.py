"""ONNX export of a model directory's embedder: one utterance of 16 kHz audio in, its embedding out.

    python -m asv export_onnx --model models/demo        # writes models/demo/embedder.onnx, recorded in model.json

The graph is wav (1, T) float32 -> upstream hidden states -> featurizer -> downstream -> speaker_embedding (1, E),
with T dynamic from the recorded `onnx.min_samples` to `MAX_SECONDS` of audio. It is traced with
torch.export (the dynamo exporter, which needs onnxscript) for

- weight-free upstreams (fbank, mfcc, ...: torchaudio's Kaldi features, traced with their `len()` calls
  made symbolic), and
- s3prl's wav2vec 2.0 / HuBERT / WavLM experts (hub names and *_local checkpoints), traced through a
  one-utterance forward: their own forward builds a padding mask with data-dependent control flow that
  torch.export cannot follow, and one unpadded utterance needs no mask.

Other upstreams are refused with one UpstreamError line. A model trained with LoRA adapters (--upstream_adapter lora)
exports as a plain upstream: loading it merges the adapters into the base weights (asv/adapters.py, peft's
merge_and_unload). What the graph leaves out, the caller does (as
`OnnxEmbedder` below): audio shorter than min_samples is wrap-padded to it, and with `test_effects` the
gain and VAD (asv.audio) are applied first. Parity with the PyTorch embedder is tested to cosine >= 0.9999.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import logging
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from asv.api import load_model
from asv.audio import apply_gain, load_audio, sox_silence
from asv.conventions import SAMPLE_RATE, num_frames
from asv.errors import ConfigError, UpstreamError, one_line
from asv.modeldir import add_file, read_model_dir

ONNX_FILE = "embedder.onnx"
MAX_SECONDS = 600
# s3prl expert module -> (name of its waveform-normalisation flag, extract_features keyword arguments).
SSL_EXPERTS = {
    "s3prl.upstream.wav2vec2.expert": ("wav_normalize", {}),
    "s3prl.upstream.hubert.expert": ("task_cfg.normalize", {"padding_mask": None, "mask": None}),
    "s3prl.upstream.wavlm.expert": ("cfg.normalize", {"padding_mask": None, "mask": False}),
}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"ONNX export needs the onnx and onnxscript packages ({one_line(err)}): "
            'pip install -e ".[onnx]" (or: pip install onnx onnxscript onnxruntime)'
        ) from None


class UpstreamGraph(torch.nn.Module):
    """S3PRLUpstream.forward for one unpadded utterance, written with shapes only (no data-dependent branches), so
    torch.export keeps T symbolic: wav (1, T) -> its hidden states stacked, (L, 1, T', D)."""

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream

    def states(self, wav: torch.Tensor) -> list[torch.Tensor]:
        n_samples = wav.shape[1]
        hidden = self.upstream.upstream([wav[0]])["hidden_states"]
        states = []
        for h, stride in zip(hidden, self.upstream.downsample_rates, strict=True):
            # S3PRLUpstream: every state is cut or edge-padded to num_frames(T, stride) frames, all valid.
            n = num_frames(n_samples, stride)
            if h.shape[1] < n:
                h = torch.cat([h, h[:, -1:].expand(-1, n - h.shape[1], -1)], dim=1)
            h = h[:, :n]
            if self.upstream.normalize:
                h = F.layer_norm(h, h.shape[-1:])
            states.append(h)
        return states

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.states(wav))


class OnnxGraph(torch.nn.Module):
    """What the embedder's ONNX graph computes: UpstreamGraph's states + Featurizer + downstream, one utterance."""

    def __init__(self, upstream, model):
        super().__init__()
        self.upstream, self.featurizer, self.downstream = UpstreamGraph(upstream), model.featurizer, model.downstream

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (1, T) -> (1, E)
        states = self.upstream.states(wav)
        length = torch.full((1,), states[0].shape[1], dtype=torch.long)  # every frame is valid
        f = self.featurizer
        if len(states) == 1:
            x = states[0]
            if f.weightings > 1:
                x = x.unsqueeze(1).expand(-1, f.weightings, -1, -1)
        else:  # Featurizer._weighted_sum, without its no-op (and untraceable) allclose check
            stacked = torch.stack([states[i] for i in f.layer_selections], dim=0)
            if f.normalize:
                stacked = F.layer_norm(stacked, (stacked.shape[-1],))
            layers, *shape = stacked.shape
            # (layers, 1), or (weightings, layers, 1) for MHFA's keys and values: each weighting's sum over layers.
            weights = F.softmax(f.weights, dim=-1).unsqueeze(-1)
            x = (weights * stacked.reshape(layers, -1)).sum(dim=-2).view(*weights.shape[:-2], *shape)
            if f.weightings > 1:
                x = x.transpose(0, 1)  # (weightings, 1, T, D) -> (1, weightings, T, D), as the Featurizer gives
        return self.downstream(x, length)


@contextlib.contextmanager
def traceable(upstream):
    """Make the upstream's own code traceable for one utterance (see the module docstring), then restore it."""
    import torchaudio.compliance.kaldi as kaldi

    expert = upstream.upstream
    module = type(expert).__module__
    name = upstream.name if hasattr(upstream, "name") else type(expert).__name__
    if module == "s3prl.upstream.baseline.expert":
        # torchaudio's fbank/mfcc call len() on the waveform, which would fix T to the example's length.
        kaldi.len = lambda x: x.size(0) if isinstance(x, torch.Tensor) else builtins.len(x)
        try:
            yield
        finally:
            del kaldi.len
        return
    if module not in SSL_EXPERTS or getattr(expert, "numpy_wav_normalize", False):
        raise UpstreamError(
            f"ONNX export supports weight-free upstreams (fbank, mfcc, ...) and s3prl's wav2vec 2.0 / HuBERT / WavLM "
            f"experts; upstream {name} ({module}) is not one of them"
        )
    flag, kwargs = SSL_EXPERTS[module]
    normalize = bool(_attr(expert, flag))

    def one_utterance(wavs):
        wav = wavs[0][None]
        if normalize:  # the expert's per-utterance F.layer_norm(wav, wav.shape)
            wav = F.layer_norm(wav, wav.shape[-1:])
        expert.model.extract_features(wav, **kwargs) if kwargs else expert.model.extract_features(wav, None)
        # UpstreamBase's hooks collect the hidden states, as after the expert's own forward.

    from s3prl.upstream.wav2vec2.wav2vec2_model import TransformerEncoder  # wav2vec 2.0's and HuBERT's encoder

    encoders = [m for m in expert.modules() if isinstance(m, TransformerEncoder)]
    expert.forward = one_utterance
    for enc in encoders:
        enc.extract_features = types.MethodType(_encoder_features, enc)
    try:
        yield
    finally:
        del expert.forward
        for enc in encoders:
            del enc.extract_features


def _encoder_features(self, x, padding_mask=None, tgt_layer=None, min_layer=0):
    """s3prl's TransformerEncoder.extract_features (wav2vec2_model.py; HuBERT uses it too) for one unpadded utterance
    in eval mode, written for torch.export. The original pads the frames to a multiple of required_seq_len_multiple
    and masks the padding only when the remainder is non-zero, a branch that would fix the parity of the input
    length; here the padding is a symbolic amount (0 included) and always masked, which gives the same outputs."""
    if padding_mask is not None:
        raise UpstreamError("the ONNX graph embeds one unpadded utterance; it got a padding mask")
    if self.pos_conv is not None:
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    if not self.layer_norm_first:
        x = self.layer_norm(x)
    frames, multiple = x.size(1), self.required_seq_len_multiple
    pad = (multiple - frames % multiple) % multiple
    x = F.pad(x, (0, 0, 0, pad))
    padding_mask = torch.arange(frames + pad, device=x.device)[None] >= frames  # (1, T + pad)
    x = x.transpose(0, 1)  # (T + pad, 1, C)
    layer_results, r = [], None
    for i, layer in enumerate(self.layers):
        x, (z, lr) = layer(x, self_attn_padding_mask=padding_mask, need_weights=False)
        if i >= min_layer:
            layer_results.append((x, z, lr))
        if i == tgt_layer:
            r = x
            break
    x = (x if r is None else r).transpose(0, 1)[:, :frames]
    layer_results = [(a[:frames], None if b is None else b[:frames], c[:frames]) for a, b, c in layer_results]
    return x, layer_results


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def export_onnx(model_dir: str | Path, device: str = "cpu", opset: int | None = None) -> Path:
    """Write DIR/embedder.onnx for a model directory and record it (sha256, input contract) in model.json."""
    model_dir = Path(model_dir)
    embedder = load_model(model_dir, device).embedder
    path = model_dir / ONNX_FILE
    contract = export_embedder(embedder, path, opset)
    add_file(model_dir, ONNX_FILE, {"onnx": {**contract, "test_effects": embedder.test_effects}})
    return path


def export_embedder(embedder, path: Path, opset: int | None = None) -> dict:
    """Trace a ModelEmbedder (upstream + SpeakerModel) into an ONNX file; returns its input/output contract."""
    # Tracing leaves the upstream's hooks unusable, so trace a copy and keep the caller's model intact.
    upstream = _copy_upstream(embedder.upstream)
    graph = OnnxGraph(upstream, embedder.model).eval()
    device = next(embedder.model.parameters()).device
    lo, hi, opset = _export(graph, upstream, device, embedder.min_samples, path, "speaker_embedding", opset)
    return {
        "file": Path(path).name,
        "input": "wav: float32 (1, T), 16 kHz mono in [-1, 1], one utterance",
        "output": f"speaker_embedding: float32 (1, {embedder.embed_dim})",
        # torch.export may raise the minimum it was given (shape guards of the traced ops): shorter audio is
        # wrap-padded to this length instead of the PyTorch embedder's min_samples.
        "min_samples": lo,
        "max_samples": hi,
        "opset": opset,
    }


def export_upstream(upstream, path: Path, min_samples: int, opset: int | None = None) -> tuple[int, int]:
    """Trace a frozen upstream alone (UpstreamGraph: wav (1, T) -> hidden_states (L, 1, T', D)) into an ONNX file;
    returns the (min, max) input length it accepts."""
    graph = UpstreamGraph(_copy_upstream(upstream)).eval()
    device = next(upstream.parameters()).device
    lo, hi, _ = _export(graph, graph.upstream, device, min_samples, path, "hidden_states", opset)
    return lo, hi


def _export(graph, upstream, device, min_samples: int, path: Path, output: str, opset: int | None):
    """torch.export of `graph` (over `upstream`, made traceable) with the time axis dynamic, then the ONNX file;
    returns (min, max) input length and the opset."""
    _require_onnx()
    # The exporter logs a warning per torchvision operator it cannot register (none is used here) and torch's
    # pytree a deprecation warning while tracing: noise on every export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = torch.randn(1, 3 * SAMPLE_RATE, device=device)
    time_axis = torch.export.Dim.AUTO(min=min_samples, max=MAX_SECONDS * SAMPLE_RATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with traceable(upstream), torch.no_grad():
            try:
                program = torch.export.export(graph, (example,), dynamic_shapes=({1: time_axis},), strict=False)
            except Exception as err:  # torch.export's errors are pages long; the first line names the construct
                raise UpstreamError(f"torch.export cannot trace this model for ONNX ({one_line(err)})") from None
        lo, hi = _time_range(program)
        if lo is None or hi <= lo:
            raise UpstreamError("torch.export fixed the input length of this model to one value: not exportable")
        onnx_program = torch.onnx.export(
            program,
            (example,),
            dynamo=True,
            input_names=["wav"],
            output_names=[output],
            opset_version=opset,
            verbose=False,
        )
    # The exporter annotates intermediate tensors with symbolic shapes, and onnxruntime plans buffer reuse from
    # them; some of those annotations equate lengths that differ at run time (a shape-mismatch failure on the
    # SSL graphs), so only the input and output keep theirs and onnxruntime infers the rest.
    import onnx

    proto = onnx_program.model_proto
    del proto.graph.value_info[:]
    onnx.save(proto, str(path))
    return lo, hi, proto.opset_import[0].version


def _copy_upstream(upstream):
    """A deep copy whose s3prl hooks fill the copy's own hidden-state list: copied modules keep the original's
    hook functions, which append to the original expert's list, so they are registered afresh."""
    clone = copy.deepcopy(upstream).eval()
    expert = clone.upstream
    if getattr(expert, "hooks", None):
        for m in expert.modules():
            m._forward_hooks.clear()
        for hook in expert.hooks:
            hook.handler = None
            expert._register_hook_handler(hook)
    return clone


def _time_range(program) -> tuple[int | None, int | None]:
    """The range torch.export kept for the input's time axis (it may raise the minimum it was given)."""
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "wav")
    size = placeholder.meta["val"].shape[1]
    if isinstance(size, int):
        return None, None
    vr = program.range_constraints[size.node.expr]
    return int(vr.lower), int(vr.upper)


class OnnxEmbedder:
    """Embeddings from embedder.onnx with onnxruntime, preparing audio as evaluation does (wrap-padding,
    test effects): what a deployment outside PyTorch has to reproduce."""

    def __init__(self, model_dir: str | Path):
        try:
            import onnxruntime  # optional (the "onnx" extra): only running an exported graph needs it
        except ImportError as err:
            raise ConfigError(
                f'running embedder.onnx needs onnxruntime ({one_line(err)}): pip install -e ".[onnx]"'
            ) from None

        info = read_model_dir(model_dir)  # validates the hashes, embedder.onnx's included
        if "onnx" not in info.meta:
            raise ConfigError(f"{model_dir} has no {ONNX_FILE}: python -m asv export_onnx --model {model_dir}")
        self.contract = info.meta["onnx"]
        self.session = onnxruntime.InferenceSession(
            str(Path(model_dir) / ONNX_FILE), providers=["CPUExecutionProvider"]
        )
        self.meta = json.loads((Path(model_dir) / "model.json").read_text())

    def prepare(self, wav: np.ndarray) -> np.ndarray:
        if self.contract["test_effects"]:
            kept = sox_silence(apply_gain(wav, -3.0), SAMPLE_RATE)
            wav = kept if len(kept) else wav
        n = self.contract["min_samples"]
        if len(wav) < n:
            wav = np.pad(wav, (0, n - len(wav)), mode="wrap")
        return np.ascontiguousarray(wav[None], dtype=np.float32)

    def embed_wav(self, wav: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"wav": self.prepare(np.asarray(wav, dtype=np.float32))})[0][0]

    def embed(self, paths: list[str]) -> np.ndarray:
        return np.stack([self.embed_wav(load_audio(p)) for p in paths])
