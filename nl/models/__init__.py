"""Model registry: `model.arch` in the config names a constructor registered here.

    model = build_model(cfg.model, device="cuda", seed=0)     # built on meta, materialised, initialised
    meta = build_model(cfg.model, device="meta")              # shapes only, for counting

A model module registers its class with `@register_model("name")`; the class takes a
`ModelConfig` and has an `init_weights()` method that initialises every parameter in place.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from nl.config import ConfigError, ModelConfig

MODEL_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {}

_Builder = TypeVar("_Builder", bound=Callable[[ModelConfig], nn.Module])


def register_model(name: str) -> Callable[[_Builder], _Builder]:
    """Class/function decorator: make `name` a valid `model.arch`."""

    def decorate(builder: _Builder) -> _Builder:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model arch '{name}' is already registered (by {MODEL_REGISTRY[name]})")
        MODEL_REGISTRY[name] = builder
        return builder

    return decorate


def _validate(cfg: ModelConfig) -> None:
    if cfg.arch not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model.arch '{cfg.arch}'; valid archs: {', '.join(sorted(MODEL_REGISTRY))}")
    if cfg.vocab_size <= 0:
        raise ConfigError(f"model.vocab_size is {cfg.vocab_size}: set it to the tokenizer's vocabulary size "
                         f"(the trainer fills it in from the data manifest when it is 0)")
    for key in ("dim", "n_layers", "n_heads"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(cfg, key)}")
    if cfg.dim % cfg.n_heads:
        raise ConfigError(f"model.dim={cfg.dim} is not divisible by model.n_heads={cfg.n_heads}: "
                         f"choose n_heads dividing dim")
    if (cfg.dim // cfg.n_heads) % 2:
        raise ConfigError(f"head dim model.dim / model.n_heads = {cfg.dim // cfg.n_heads} must be even for "
                         f"rotary embeddings")


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> nn.Module:
    """Construct `cfg.arch` on the meta device, then materialise on `device` and `init_weights()`.

    `seed` given: the init draws from a fresh generator state seeded with it (the caller's RNG
    state is restored afterwards); None: from the current global RNG. device="meta" returns
    the uninitialised meta model (parameter shapes only)."""
    _validate(cfg)
    with torch.device("meta"):
        model = MODEL_REGISTRY[cfg.arch](cfg)
    device = torch.device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    if seed is None:
        model.init_weights()
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters (`parameters()` yields a tied weight once); meta models work."""
    return sum(p.numel() for p in model.parameters())


def matmul_parameters(model: nn.Module) -> int:
    """Parameters that multiply every token's activations: the weights of nn.Linear modules (the
    LM head included, tied or not) and of modules that declare `matmul_weight = True` (HOPE's
    depthwise convolutions). Not counted: the input embedding (a lookup), norm gains and biases
    (elementwise), HOPE's memory initial states and gate readouts (counted in the mixing term)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) or getattr(m, "matmul_weight", False))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU: 6 * N + 3 * F_mix(T).

    N = `matmul_parameters` (2 FLOPs per weight per token forward, x3 for forward + backward: the
    PaLM appendix B / nanoGPT estimate). F_mix(T) = the model's `mixing_flops_per_token(T)`: the
    forward FLOPs per token of its sequence mixing, which no weight matrix accounts for:
    attention 4 * L * d * T (QK^T and AV over the full T x T square, as PaLM, no causal halving);
    HOPE's inner memories their chunk form's matrix products and triangular solves
    (`nl.ops.titans.chunked_matmul_flops`). Recomputation (activation checkpointing) is not
    counted: this is model FLOPs, as MFU defines them."""
    model = build_model(cfg, device="meta")
    return 6.0 * matmul_parameters(model) + 3.0 * model.mixing_flops_per_token(seq_len)


# Each architecture module registers itself on import; import new ones (e.g. hope) here.
from nl.models import transformer  # noqa: E402,F401
from nl.models import hope  # noqa: E402,F401
