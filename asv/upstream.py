"""The frozen upstream: any s3prl hub model, plus the import shim s3prl 0.4.18 needs on torchaudio >= 2.9."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types
from pathlib import Path

import torch
import torchaudio
from torch.utils.checkpoint import checkpoint
from torchaudio.compliance import kaldi

from asv.conventions import MIN_SAMPLES, SAMPLE_RATE, num_frames
from asv.errors import ConfigError, UpstreamError

# s3prl 0.4.18 calls torchaudio.set_audio_backend at import time and imports torchaudio.sox_effects in
# modules that s3prl.hub pulls in; torchaudio 2.9 removed both. Nothing on our path uses them (audio I/O
# is soundfile, the VAD is asv.audio.sox_silence), so a no-op backend setter and a module whose
# functions raise keep the import working without changing behaviour.
if not hasattr(torchaudio, "set_audio_backend"):
    torchaudio.set_audio_backend = lambda *args, **kwargs: None
try:
    import torchaudio.sox_effects  # noqa: F401
except ImportError:
    _sox = types.ModuleType("torchaudio.sox_effects")

    def _removed(*args, **kwargs):
        raise RuntimeError("torchaudio.sox_effects was removed in torchaudio 2.9; use asv.audio")

    _sox.apply_effects_tensor = _sox.apply_effects_file = _sox.effect_names = _removed
    sys.modules["torchaudio.sox_effects"] = _sox
    torchaudio.sox_effects = _sox

# s3prl warns "ESPnet is not installed" at import for one upstream nobody here uses; keep output clean.
logging.getLogger("s3prl.upstream.espnet_hubert.expert").setLevel(logging.ERROR)

# Names that need no download: s3prl computes them from the waveform (spec section 6.1).
WEIGHT_FREE = {"fbank", "fbank_no_cmvn", "baseline", "mfcc", "mel", "spectrogram", "linear"}


class _LazyHub(types.ModuleType):
    """Stands in for `s3prl.hub` until a name outside WEIGHT_FREE is asked for.

    s3prl.nn imports s3prl.hub, which imports the code of every upstream, transformers included: about 4 s
    of CPU at every start of train.py or evaluate.py (half of each demo script's start-up, and of every
    script run in the tests). The weight-free front-ends live in s3prl.upstream.baseline alone, so those
    names resolve there (the same functions the hub star-imports); any other attribute loads the real hub.
    """

    def __getattr__(self, name: str):
        if name.startswith("__"):
            # Introspection (inspect.getmodule asks every module for __file__, in the middle of torch's own
            # imports) must not load the hub: that import would then run inside a half-initialised torch.
            raise AttributeError(name)
        if name in WEIGHT_FREE:
            from s3prl.upstream.baseline import hubconf

            return getattr(hubconf, name)
        return getattr(_real_hub(), name)


def _real_hub() -> types.ModuleType:
    """The real s3prl.hub, imported on first use in place of the _LazyHub."""
    if isinstance(sys.modules.get("s3prl.hub"), _LazyHub):
        del sys.modules["s3prl.hub"]
    return importlib.import_module("s3prl.hub")


if "s3prl.hub" not in sys.modules:
    sys.modules["s3prl.hub"] = _LazyHub("s3prl.hub")

__all__ = [
    "UPSTREAM_PRECISIONS",
    "UpstreamError",
    "build_upstream",
    "check_upstream_precision",
    "disable_layerdrop",
    "enable_gradient_checkpointing",
    "fbank_batchable",
    "fbank_batched",
    "list_upstreams",
    "upstream_forward",
]

# --upstream_precision choices: the autocast dtype of a frozen neural upstream's forward (None = none).
UPSTREAM_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def s3prl_nn():
    """s3prl.nn, imported on first use, so that `--help` or a mistyped flag waits for neither s3prl nor its hub
    (which, once a neural upstream is asked for, loads every hub entry and transformers: seconds). The torchaudio
    shim above is in place by then."""
    import s3prl.nn

    return s3prl.nn


def list_upstreams() -> list[str]:
    """Every name s3prl's hub accepts (including the *_local / *_custom ones that need --upstream_ckpt)."""
    hub = _real_hub()
    # hub.options() also returns helpers the hub module imports (FileLock, Path): keep entry functions.
    names = s3prl_nn().S3PRLUpstream.available_names(only_registered_ckpt=False)
    return sorted(n for n in names if inspect.isfunction(getattr(hub, n, None)) and not n.startswith("_"))


def build_upstream(name: str, ckpt: str | None = None, normalize: bool = False):
    """Build `S3PRLUpstream(name)`, frozen: eval mode, no gradients."""
    names = WEIGHT_FREE if name in WEIGHT_FREE else set(list_upstreams())
    if name not in names:
        close = sorted(n for n in names if name.split("_")[0] in n)[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UpstreamError(f"unknown upstream '{name}'{hint}; `python train.py --list_upstreams` prints all")
    needs_ckpt = name.endswith(("_local", "_url", "_custom"))
    if needs_ckpt and not ckpt:
        raise UpstreamError(f"upstream '{name}' loads a checkpoint you provide: pass --upstream_ckpt PATH")
    # hf_* names also take a Hugging Face hub id ("facebook/wav2vec2-base"), which is no local path.
    hub_id = name.startswith("hf_") and not Path(str(ckpt)).exists() and str(ckpt).count("/") == 1
    local = needs_ckpt and not str(ckpt).startswith("http") and not hub_id
    if local:
        check_local_ckpt(name, ckpt)
    try:
        upstream = s3prl_nn().S3PRLUpstream(name, path_or_url=ckpt, normalize=normalize)
    except Exception as err:  # s3prl raises whatever requests/torch.hub raise
        # The first line names the problem (torch's weights_only error adds a page of advice after it).
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if local:
            raise UpstreamError(
                f"--upstream_ckpt {ckpt} is not {expected_ckpt_format(name)} ({type(err).__name__}: {msg}); "
                "pass a checkpoint of that format or the upstream name that matches the file"
            ) from err
        if name in WEIGHT_FREE or needs_ckpt:
            raise UpstreamError(f"cannot build upstream '{name}' from {ckpt or 'the s3prl hub'}: {msg}") from err
        family = name.split("_")[0]
        raise UpstreamError(
            f"cannot load upstream '{name}': its weights must be downloaded and that failed ({msg}); "
            f"offline, copy the checkpoint here and pass --upstream {family}_local --upstream_ckpt PATH"
        ) from err
    upstream.eval()
    upstream.requires_grad_(False)
    # Signal-processing front-ends stay in fp32 whatever --upstream_precision says (upstream_forward).
    upstream.weight_free = name in WEIGHT_FREE
    upstream.name = name
    return upstream


def expected_ckpt_format(name: str) -> str:
    """What s3prl's loader for a *_local / *_custom name reads, in words (for error messages)."""
    family = name.rsplit("_", 1)[0]
    if name.startswith("hf_"):
        return "a directory written by transformers' save_pretrained (config.json, weights, preprocessor_config.json)"
    if family.startswith(("wavlm", "unispeech")):
        return "a WavLM-style checkpoint, a torch.save'd dict {'cfg': dict, 'model': state_dict}"
    if family in ("wav2vec2", "hubert", "data2vec", "mhubert", "multires_hubert"):
        return (
            f"an s3prl-converted {family} checkpoint, a torch.save'd dict {{'task_cfg', 'model_cfg', 'model_weight'"
            + (", 'dictionaries_symbols'" if "hubert" in family else "")
            + f"}} (convert a fairseq one with python -m s3prl.upstream.{family}.convert, which needs fairseq)"
        )
    return f"a checkpoint s3prl's '{name}' loader reads"


def check_local_ckpt(name: str, ckpt: str) -> None:
    """Fail early, in one line, on a missing path or a file where a directory is expected (and vice versa):
    s3prl would otherwise raise a bare AssertionError or an HF download attempt."""
    path = Path(ckpt)
    if not path.exists():
        raise UpstreamError(f"--upstream_ckpt {ckpt} does not exist; pass {expected_ckpt_format(name)}")
    if name.startswith("hf_") != path.is_dir():
        raise UpstreamError(f"--upstream_ckpt {ckpt} is not {expected_ckpt_format(name)}")


def check_upstream_precision(precision: str, trainable: bool) -> None:
    """--upstream_precision is a known choice, and only set for a frozen upstream (a fine-tuned one trains
    under --mixed_precision, whose gradient scaling an fp16 upstream would need)."""
    if precision not in UPSTREAM_PRECISIONS:
        raise ConfigError(f"--upstream_precision {precision}: choose one of {', '.join(UPSTREAM_PRECISIONS)}")
    if trainable and precision != "fp32":
        raise ConfigError(
            f"--upstream_precision {precision} applies to a frozen upstream; to fine-tune it in {precision}, "
            "use --mixed_precision instead"
        )


@torch.inference_mode()
def upstream_forward(upstream, wav: torch.Tensor, wav_len: torch.Tensor, precision: str = "fp32"):
    """Hidden states of a frozen upstream, always in eval mode (dropout off), as SuperbASV does.

    Inference mode skips autograd bookkeeping entirely; its outputs cannot be saved for a backward
    pass, so a training step clones them first (asv.forward.training_features). `precision` bf16/fp16 autocasts
    the upstream alone; its hidden states come back as fp32, so the featurizer, downstream and head
    compute exactly as they would after an fp32 upstream."""
    check_upstream_precision(precision, trainable=False)
    upstream.eval()
    dtype = None if getattr(upstream, "weight_free", False) else UPSTREAM_PRECISIONS[precision]
    if dtype is None:
        return upstream(wav, wav_len)
    with torch.autocast(wav.device.type, dtype=dtype):
        hidden, hidden_len = upstream(wav, wav_len)
    return [h.float() for h in hidden], hidden_len


def fbank_batchable(upstream, wav: torch.Tensor, wav_len: torch.Tensor) -> bool:
    """Whether fbank_batched stands in for s3prl's fbank here: training crops (several, all one length, no
    padding) of the `fbank` front-end (the one it was checked against)."""
    return (
        getattr(upstream, "name", None) == "fbank"
        and wav.dim() == 2
        and wav.size(0) > 1
        and bool((wav_len == wav.size(1)).all())
    )


# Frames per pass of fbank_batched, measured (2-core Xeon, one thread): 1024 to 2048 were fastest for crops of
# 1 to 8 s; the whole batch in one pass was up to 40 % slower, on 10 crops of 8 s slower than s3prl's loop.
FBANK_CHUNK_FRAMES = 2048


def fbank_batched(upstream, wav: torch.Tensor, wav_len: torch.Tensor):
    """What `upstream(wav, wav_len)` returns for s3prl's `fbank` when every utterance is wav.size(1) samples
    long, computed a chunk of utterances at a time rather than s3prl's one: on 64 one-second crops the per-call
    overhead of s3prl's loop (kaldi.fbank, deltas, CMVN per utterance) is most of the front-end's time.

    The steps are kaldi.fbank's at its defaults (no dither, DC removal, pre-emphasis, povey window, power
    spectrum, log floored at float eps) with fbank.yaml's settings, on torchaudio's own window, mel banks and
    constants, then the expert's deltas and CMVN. Each op is the one s3prl runs (|X| by hypot, Welford std), so
    the output rounds as s3prl's does, bit for bit on CPU from 11 frames (0.12 s) on; a shorter crop alone takes
    another GEMM kernel (tests/test_fbank_batched.py). Cheaper formulas would do for most bands, but a band at
    the log floor for a whole crop has a std of pure rounding noise, and CMVN's quotient there (~1e4) is
    rounding noise too."""
    extract, delta, cmvn = upstream.upstream.extracter
    opts = {k: p.default for k, p in inspect.signature(kaldi.fbank).parameters.items()} | extract.kwargs
    # S3PRLUpstream zero-extends a batch shorter than its minimum before the expert sees it.
    x = torch.nn.functional.pad(wav, (0, max(0, MIN_SAMPLES - wav.size(1))))
    framing = [opts[k] for k in ("frame_shift", "frame_length", "round_to_power_of_two", "preemphasis_coefficient")]
    _, shift, size, padded_size = kaldi._get_waveform_and_window_properties(x[:1], 0, SAMPLE_RATE, *framing)
    window = kaldi._feature_window_function(opts["window_type"], size, opts["blackman_coeff"], x.device, x.dtype)
    bands = [opts[k] for k in ("low_freq", "high_freq", "vtln_low", "vtln_high", "vtln_warp")]
    mel, _ = kaldi.get_mel_banks(opts["num_mel_bins"], padded_size, SAMPLE_RATE, *bands)
    mel = torch.nn.functional.pad(mel.to(x), (0, 1))  # zero on the Nyquist bin, as kaldi pads it
    eps = kaldi._get_epsilon(x.device, x.dtype)
    out = []
    for part in x.split(max(1, FBANK_CHUNK_FRAMES * shift // x.size(1))):
        frames = part.unfold(1, size, shift)  # (B, frames, size): kaldi's snip_edges framing
        frames = frames - frames.mean(-1, keepdim=True)
        frames = frames - opts["preemphasis_coefficient"] * torch.cat((frames[..., :1], frames[..., :-1]), -1)
        power = torch.fft.rfft(frames * window, n=padded_size).abs().pow(2.0)
        feats = [torch.max(power @ mel.T, eps).log()]
        for _ in range(delta.order):  # ComputeDeltas folds the batch into channels, as it does one utterance's
            feats.append(delta.compute_delta(feats[-1].transpose(1, 2)).transpose(1, 2))
        h = torch.cat(feats, -1)
        out.append((h - h.mean(1, keepdim=True)) / (cmvn.eps + h.std(1, keepdim=True)) if cmvn.use_cmvn else h)
    stride = upstream.downsample_rates[0]
    h_len = num_frames(wav_len, stride)
    # s3prl's length rule: the last frame repeated past the expert's own.
    h = upstream._match_length(torch.cat(out), num_frames(x.size(1), stride))[:, : int(h_len.max())]
    if upstream.normalize:
        h = torch.nn.functional.layer_norm(h, h.shape[-1:])
    return [h], [h_len]


def disable_layerdrop(upstream: torch.nn.Module) -> int:
    """Set every layerdrop probability to 0 (fairseq-style modules and HF configs): fine-tuning with
    layers randomly skipped would change which hidden states the featurizer mixes. Returns how many."""
    n = 0
    for m in upstream.modules():
        if isinstance(getattr(m, "layerdrop", None), float) and m.layerdrop > 0:
            m.layerdrop, n = 0.0, n + 1
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "layerdrop", None), float) and cfg.layerdrop > 0:
            cfg.layerdrop, n = 0.0, n + 1
    return n


def enable_gradient_checkpointing(upstream: torch.nn.Module) -> int:
    """Recompute transformer layers in the backward pass. HF models use their own switch; other
    upstreams get each layer of their `...layers` ModuleLists wrapped. Returns the layers covered."""
    for m in upstream.modules():
        if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
            m.gradient_checkpointing_enable()
            return sum(
                len(x) for k, x in m.named_modules() if isinstance(x, torch.nn.ModuleList) and k.endswith("layers")
            )
    n = 0
    for name, layers in upstream.named_modules():
        if isinstance(layers, torch.nn.ModuleList) and name.split(".")[-1] == "layers":
            for layer in layers:
                layer.forward = _checkpointed(layer.forward)
                n += 1
    return n


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
