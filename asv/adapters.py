"""Parameter-efficient fine-tuning of the upstream (--upstream_adapter lora): peft's LoRA adapters (Hu et al. 2021,
arXiv 2106.09685) on the upstream's Linear layers train, its own weights stay frozen.

A checkpoint keeps the adapters' tensors only (`tuned_state_dict`: embedder.safetensors, and Accelerate's resume
state through `keep_adapters_only`); the base is the named upstream, rebuilt at every start. Loading for evaluation
merges them into the base weights (peft's merge_and_unload), so evaluation, model directories and ONNX graphs run a
plain upstream at its usual cost.

s3prl's fairseq-style attention (wav2vec 2.0, HuBERT, data2vec, ... and WavLM's copy of it) never calls its q/k/v/out
projection modules: it hands their `.weight` to torch's fused F.multi_head_attention_forward, and a peft layer's
`.weight` is its base weight. Adapters there would train nothing, silently. Around those attention modules the
projections' weights read as the adapted W + scale * B @ A for the duration of each call (a parametrization, as peft's
own ParamWrapper applies one), which is exactly what merging gives.

peft is imported on first use only: a run without adapters never loads it (nor the transformers it imports).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from asv.conventions import SAMPLE_RATE
from asv.errors import ConfigError, UpstreamError

# peft's name for the one adapter each layer carries; it is part of every saved tensor's name.
ADAPTER = "default"

# Default targets by the s3prl expert (the module its upstream's code lives in): every Linear layer of each
# transformer layer, attention projections and feed-forward. Adapting all of them is what matches full fine-tuning
# in Dettmers et al. 2023 (QLoRA, arXiv 2305.14314, section 4), where attention alone falls short.
FAIRSEQ_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense")
DEFAULT_TARGETS = {
    "s3prl.upstream.wav2vec2.expert": FAIRSEQ_TARGETS,
    "s3prl.upstream.hubert.expert": FAIRSEQ_TARGETS,
    "s3prl.upstream.wavlm.expert": FAIRSEQ_TARGETS,
    "s3prl.upstream.hf_wav2vec2.expert": HF_TARGETS,
    "s3prl.upstream.hf_hubert.expert": HF_TARGETS,
}

# Attention classes that read their projections' weights instead of calling them (the only two s3prl 0.4.18 calls
# F.multi_head_attention_forward from), and those projections.
FUSED_ATTENTION = {
    "s3prl.upstream.wav2vec2.wav2vec2_model.MultiheadAttention",
    "s3prl.upstream.wavlm.modules.MultiheadAttention",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

# The hooks adapting each fused attention module, removed when its adapters are merged.
_hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_adapter_tensor(name: str) -> bool:
    """Whether a state-dict entry is an adapter's: peft's own test for LoRA without trained biases
    (get_peft_model_state_dict)."""
    return "lora_" in name


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def target_modules(upstream: nn.Module, targets: list[str] | None) -> list[str]:
    """Full names of the Linear layers that get adapters: each of `targets` matches a module named so or ending in
    `.name` (peft's rule); None takes the upstream family's defaults. A target that matches nothing, or anything but
    a Linear layer, is an UpstreamError naming it and the Linear layers there are."""
    name = getattr(upstream, "name", type(upstream).__name__)
    linear = {n for n, m in upstream.named_modules() if isinstance(m, nn.Linear)}
    if not linear:
        raise UpstreamError(f"--upstream_adapter lora: upstream {name} has no Linear layers to adapt")
    endings = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
    if not targets:
        expert = type(getattr(upstream, "upstream", upstream)).__module__
        if expert not in DEFAULT_TARGETS:
            raise UpstreamError(
                f"--upstream_adapter lora has no default targets for upstream {name}; pass --lora_target_modules with "
                f"names of its Linear layers (their names end in: {endings})"
            )
        targets = list(DEFAULT_TARGETS[expert])
    matched = set()
    for target in targets:
        hits = [n for n, _ in upstream.named_modules() if n == target or n.endswith(f".{target}")]
        if not hits:
            raise UpstreamError(
                f"--lora_target_modules {target} matches no module of upstream {name} (its Linear layers' names end "
                f"in: {endings})"
            )
        other = next((n for n in hits if n not in linear), None)
        if other is not None:
            kind = type(upstream.get_submodule(other)).__name__
            raise UpstreamError(
                f"--lora_target_modules {target} matches {other}, a {kind}: LoRA adapts Linear layers (the upstream's "
                f"names end in: {endings})"
            )
        matched.update(hits)
    return sorted(matched)


def add_adapters(upstream: nn.Module, model_cfg, check_reached: bool = False):
    """Wrap the target Linear layers of `upstream` in LoRA adapters, in place (rank, alpha, dropout and targets from
    `model_cfg`'s lora_* fields); only the adapters require gradients afterwards. `check_reached`: refuse, in one
    line, adapters that a forward pass never reaches (they would train nothing). Returns peft's tuner, which
    `merge_adapters` takes."""
    from peft import LoraConfig, LoraModel

    targets = target_modules(upstream, model_cfg.lora_target_modules)
    fused = [n for n in targets if n.rsplit(".", 1)[-1] in PROJECTIONS and _in_fused_attention(upstream, n)]
    if model_cfg.lora_dropout and fused:
        raise ConfigError(
            f"--lora_dropout {model_cfg.lora_dropout} drops an adapter's input, which s3prl's attention never passes "
            f"through its projections ({fused[0]}): use --lora_dropout 0, or target other layers (fc1 fc2)"
        )
    config = LoraConfig(
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=targets,
    )
    tuner = LoraModel(upstream, config, ADAPTER)
    for module in upstream.modules():
        if _qualname(module) in FUSED_ATTENTION and module not in _hooks:
            _hooks[module] = (
                module.register_forward_pre_hook(_adapt_weights),
                module.register_forward_hook(_restore_weights, always_call=True),
            )
    if check_reached:
        _check_reached(upstream)
    return tuner


def _in_fused_attention(upstream: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return _qualname(upstream.get_submodule(parent)) in FUSED_ATTENTION


class _Adapted(nn.Module):
    """W -> W + delta: the weight a LoRA projection stands for."""

    def __init__(self, delta: torch.Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta


def _adapt_weights(attention: nn.Module, args) -> None:
    """Forward pre-hook of a fused attention module: its adapted projections' weights read as W + delta."""
    from peft.tuners.lora import LoraLayer

    for name in PROJECTIONS:
        layer = getattr(attention, name)
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A and not layer.merged:
            # The delta is peft's, the one merging adds, so an adapted forward equals the merged one.
            delta = layer.get_delta_weight(ADAPTER)
            parametrize.register_parametrization(layer.get_base_layer(), "weight", _Adapted(delta), unsafe=True)


def _restore_weights(attention: nn.Module, args, output) -> None:
    """Forward hook (run even when the forward raises): the projections get their own weights back."""
    for name in PROJECTIONS:
        layer = getattr(attention, name)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if parametrize.is_parametrized(base, "weight"):
            parametrize.remove_parametrizations(base, "weight", leave_parametrized=False)


def _check_reached(upstream: nn.Module) -> None:
    """One forward pass on a second of noise, in eval mode (no dropout, nothing drawn from the global RNG): every
    adapter must be on the path from the audio to the hidden states."""
    adapters = {n: p for n, p in upstream.named_parameters() if is_adapter_tensor(n)}
    device = next(iter(adapters.values())).device
    wav = 0.1 * torch.randn(1, SAMPLE_RATE, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = upstream.training
    upstream.eval()
    try:
        with torch.enable_grad():
            hidden, _ = upstream(wav, torch.tensor([wav.size(1)], device=device))
            total = sum(h.float().sum() for h in hidden)
            params = list(adapters.values())
            # No adapter reached at all leaves the output without a graph.
            grads = (
                torch.autograd.grad(total, params, allow_unused=True) if total.requires_grad else [None] * len(params)
            )
    finally:
        upstream.train(was_training)
    unreached = sorted({n.split(".lora_")[0] for n, g in zip(adapters, grads, strict=True) if g is None})
    if unreached:
        more = f" and {len(unreached) - 1} more layers" if len(unreached) > 1 else ""
        raise UpstreamError(
            f"the LoRA adapters on {unreached[0]}{more} never reach the hidden states of upstream "
            f"{getattr(upstream, 'name', '')}: its forward does not call those layers; choose other "
            "--lora_target_modules"
        )


def tuned_state_dict(upstream: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a trained upstream: its adapters' tensors when it has adapters (the frozen base is
    the named upstream checkpoint), else all of it (--upstream_trainable)."""
    state = upstream.state_dict()
    adapters = {k: v for k, v in state.items() if is_adapter_tensor(k)}
    return adapters or state


def merge_adapters(tuner) -> nn.Module:
    """Fold the adapters into the base weights (peft's merge_and_unload): the upstream is then a plain one, the same
    module tree as before `add_adapters`, computing what the adapted one did (up to float rounding). Returns it."""
    upstream = tuner.merge_and_unload()
    for module in upstream.modules():
        for handle in _hooks.pop(module, ()):
            handle.remove()
    return upstream


class _AdapterTensors(nn.Module):
    """Stands in for an adapted upstream when Accelerate loads its resume state: the state it reads and writes is
    the adapters' alone."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = [module]  # a list, not a submodule: this module's own state is the adapters'

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.inner[0].state_dict().items() if is_adapter_tensor(k)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        _, unexpected = self.inner[0].load_state_dict(state_dict, strict=False)
        missing = [k for k in self.state_dict() if k not in state_dict]
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return missing, list(unexpected)


def keep_adapters_only(accelerator, upstream: nn.Module) -> None:
    """Accelerate's save_state writes only the adapters of `upstream` (a prepared model) and load_state reads only
    them: the frozen base would otherwise be copied into every checkpoint (1.3 GB for WavLM Large)."""

    def on_save(models, weights, output_dir) -> None:
        # Not strict: under FSDP or DeepSpeed the models save themselves and `weights` is empty.
        for model, state in zip(models, weights, strict=False):
            if model is upstream:
                for key in [k for k in state if not is_adapter_tensor(k)]:
                    del state[key]

    def on_load(models, input_dir) -> None:
        for i, model in enumerate(models):
            if model is upstream:
                models[i] = _AdapterTensors(model)

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def describe_adapters(upstream: nn.Module, model_cfg) -> str:
    """What trains in the upstream, for train.py's banner."""
    adapters = sum(p.numel() for n, p in upstream.named_parameters() if is_adapter_tensor(n))
    base = sum(p.numel() for n, p in upstream.named_parameters() if not is_adapter_tensor(n))
    layers = len({n.split(".lora_")[0] for n, _ in upstream.named_parameters() if is_adapter_tensor(n)})
    return (
        f"LoRA adapters (rank {model_cfg.lora_rank}, alpha {model_cfg.lora_alpha:g}) on {layers} Linear layers of the "
        f"upstream: {adapters:,} trainable parameters; its {base:,} stay frozen"
    )
