"""Outer optimizers, selected by `optim.name`, and the CMS multi-frequency schedule.

    adamw              AdamW (baseline)                         nl/optim/memories.py
    momentum           m <- a m - lr u ; W <- W + m             nl/optim/memories.py
    precond_momentum   m <- a m - lr P u                        nl/optim/memories.py
    delta_momentum     m <- m (a I - beta k^T k) - lr P u       nl/optim/memories.py
    dmgd               Deep Momentum GD: an MLP memory          nl/optim/memories.py
    m3                 Multi-scale Momentum Muon                nl/optim/m3.py
    dgd                Delta Gradient Descent on linear layers  nl/optim/dgd.py

`build_optimizer` groups the parameters by (weight decay, rule, update frequency, lr scale).
Update frequency: with optim.cms.enabled and arch 'hope', CMS level l (parameters named
`layers.<i>.cms.levels.<l>.*`) is stepped every model.hope.cms_chunk_sizes[l] optimizer steps;
optim.cms.groups adds "REGEX:EVERY[:LR_SCALE]" entries for any other parameters (first match
wins, before the CMS levels). The schedule itself lives in nl/optim/base.py.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from nl.config import Config, ConfigError
from nl.models.hope import cms_level_of
from nl.optim.base import NLOptimizer, local
from nl.optim.dgd import DGD
from nl.optim.m3 import M3, newton_schulz
from nl.optim.memories import DMGD, AdamW, DeltaRuleMomentum, Momentum, PreconditionedMomentum

OPTIMIZERS = {
    "adamw": AdamW,
    "momentum": Momentum,
    "precond_momentum": PreconditionedMomentum,
    "delta_momentum": DeltaRuleMomentum,
    "dmgd": DMGD,
    "m3": M3,
    "dgd": DGD,
}
MATRIX_RULE = ("m3", "dgd")  # their own rule on linear-layer weights, AdamW on the rest
NEEDS_SHAPES = ("m3", "dgd", "delta_momentum")  # not computable on flat ZeRO partitions

__all__ = ["OPTIMIZERS", "NLOptimizer", "build_optimizer", "check_supported", "attach_zero_partitions",
           "newton_schulz", "local", *[c.__name__ for c in OPTIMIZERS.values()]]

_WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_checkpoint_wrapped_module|_orig_mod)\.")


def canonical_name(name: str) -> str:
    """Parameter name without DDP / activation-checkpoint / compile wrapper prefixes."""
    while True:
        stripped = _WRAPPER_PREFIXES.sub(r"\1", name)
        if stripped == name:
            return name
        name = stripped


def check_supported(cfg: Config) -> None:
    """Refuse, before any work, a combination that cannot compute the optimizer's rule."""
    name = cfg.optim.name
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r} is not available; valid: {', '.join(OPTIMIZERS)}")
    if cfg.dist.strategy == "deepspeed":
        if name in NEEDS_SHAPES:
            raise ConfigError(
                f"optim.name={name} needs whole weight matrices, but DeepSpeed hands the optimizer flat "
                f"partitions that mix parameters: use dist.strategy=fsdp (or ddp), or an element-wise "
                f"optimizer (adamw, momentum, precond_momentum, dmgd) with deepspeed")
        if name == "dmgd" and cfg.dist.zero_stage == 0:
            raise ConfigError("optim.name=dmgd with DeepSpeed needs dist.zero_stage 1, 2 or 3 (stage 0 flattens "
                              "parameters without a partition layout): use dist.strategy=ddp for stage-0 runs")
    if name == "dmgd" and cfg.optim.dmgd.internal_loss == "dot" and cfg.optim.dmgd.memory_decay <= 0:
        raise ConfigError("optim.dmgd.internal_loss=dot is unbounded below without retention: set "
                          "optim.dmgd.memory_decay > 0 (e.g. 0.01) or use internal_loss=l2")
    o = cfg.optim
    for key, value, ok, expected in _RULE_RANGES.get(name, lambda o: [])(o):
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"optim.{key}={value} is out of range for optim.name={name}: pass {expected}")
    _frequency_rules(cfg)  # validates optim.cms


# The numbers one rule reads whose values outside a range mean nothing (or diverge): per optim.name, the keys under
# optim. with the value, the test and what to pass instead. (The shared keys, lr, betas, eps, momentum, weight
# decay, are checked by nl.config for every run.)
_RULE_RANGES = {
    "dmgd": lambda o: [
        ("dmgd.hidden", o.dmgd.hidden, lambda v: v >= 1, "a positive width"),
        ("dmgd.memory_lr", o.dmgd.memory_lr, lambda v: v >= 0, "a step size >= 0"),
        ("dmgd.memory_decay", o.dmgd.memory_decay, lambda v: 0 <= v < 1, "a retention decay in [0, 1)")],
    "m3": lambda o: [
        ("m3.slow_every", o.m3.slow_every, lambda v: v >= 1, "a positive number of steps"),
        ("m3.ns_steps", o.m3.ns_steps, lambda v: v >= 1, "a positive number of Newton-Schulz iterations"),
        ("m3.beta_slow", o.m3.beta_slow, lambda v: 0 <= v < 1, "an EMA coefficient in [0, 1)"),
        ("m3.alpha", o.m3.alpha, lambda v: v >= 0, "a weight >= 0 of the slow momentum"),
        ("matrix_lr_scale", o.matrix_lr_scale, lambda v: v > 0, "a positive lr multiplier")],
    "dgd": lambda o: [
        ("dgd_strength", o.dgd_strength, lambda v: v >= 0, "a decay strength >= 0"),
        ("matrix_lr_scale", o.matrix_lr_scale, lambda v: v > 0, "a positive lr multiplier")],
    "delta_momentum": lambda o: [("delta_beta", o.delta_beta, lambda v: v >= 0, "a forgetting strength >= 0")],
}


def _frequency_rules(cfg: Config) -> list[tuple[re.Pattern | int, int, float]]:
    """[(regex or CMS level, every, lr_scale)] in match order."""
    cms = cfg.optim.cms
    if cms.reduce not in ("sum", "mean"):
        raise ConfigError(f"optim.cms.reduce={cms.reduce!r}: valid values are sum, mean")
    rules: list[tuple[re.Pattern | int, int, float]] = []
    for entry in cms.groups:
        parts = str(entry).split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            every, scale = int(parts[1]), float(parts[2]) if len(parts) == 3 else 1.0
            rules.append((re.compile(parts[0]), every, scale))
        except (ValueError, re.error):
            raise ConfigError(f"optim.cms.groups entry {entry!r} must be 'REGEX:EVERY' or 'REGEX:EVERY:LR_SCALE' "
                              f"(e.g. 'layers\\.\\d+\\.cms\\.levels\\.2\\.:64:0.5')") from None
        if every < 1:
            raise ConfigError(f"optim.cms.groups entry {entry!r}: EVERY must be >= 1")
    # cms_mode=in_context: the levels learn in the sequence instead; their outer weights step every step
    if cms.enabled and cfg.model.arch == "hope" and cfg.model.hope.cms_mode != "in_context":
        sizes = list(cfg.model.hope.cms_chunk_sizes)
        scales = list(cms.lr_scale) or [1.0] * len(sizes)
        if len(scales) != len(sizes):
            raise ConfigError(f"optim.cms.lr_scale has {len(scales)} entries but model.hope.cms_chunk_sizes has "
                              f"{len(sizes)} levels: give one scale per level, or [] for all 1.0")
        rules.extend((level, int(c), float(s)) for level, (c, s) in enumerate(zip(sizes, scales)))
    return rules


def param_groups(model: nn.Module, cfg: Config) -> tuple[list[dict], dict[int, nn.Linear]]:
    """Parameter groups in a deterministic order, and {id(weight): module} of matrix-rule layers."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linears: dict[int, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and canonical_name(name) != "output" and id(module.weight) not in embeddings:
            linears[id(module.weight)] = module
    rules = _frequency_rules(cfg)
    matrix_rule = cfg.optim.name in MATRIX_RULE
    groups: dict[tuple, dict] = {}
    for raw_name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = canonical_name(raw_name)
        decay = cfg.optim.decay_embeddings if id(p) in embeddings else (
            cfg.optim.decay_norms_and_biases if p.ndim < 2 else True)
        rule = "main" if not matrix_rule or id(p) in linears else "adamw"
        every, scale = 1, 1.0
        level = cms_level_of(name)
        for pattern, e, s in rules:
            if (isinstance(pattern, int) and pattern == level) or (
                    not isinstance(pattern, int) and pattern.search(name)):
                every, scale = e, s
                break
        if rule == "main" and matrix_rule:
            scale *= cfg.optim.matrix_lr_scale
        key = (decay, rule, every, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": cfg.optim.weight_decay if decay else 0.0, "rule": rule,
                           "every": every, "lr_scale": scale, "lr": cfg.train.lr * scale,
                           "reduce": cfg.optim.cms.reduce, "group_id": len(groups)}
        groups[key]["params"].append(p)
    return list(groups.values()), linears


def build_optimizer(model: nn.Module, cfg: Config) -> NLOptimizer:
    """The optimizer of cfg.optim.name over `model`'s parameters (after parallelize)."""
    check_supported(cfg)
    o = cfg.optim
    groups, linears = param_groups(model, cfg)
    common = {"lr": cfg.train.lr, "betas": (o.beta1, o.beta2), "eps": o.eps}
    if o.name == "adamw":
        return AdamW(groups, **common)
    if o.name == "momentum":
        return Momentum(groups, momentum=o.momentum, **common)
    if o.name == "precond_momentum":
        return PreconditionedMomentum(groups, momentum=o.momentum, **common)
    if o.name == "delta_momentum":
        return DeltaRuleMomentum(groups, momentum=o.momentum, delta_beta=o.delta_beta, **common)
    if o.name == "dmgd":
        return DMGD(groups, momentum=o.momentum, hidden=o.dmgd.hidden, internal_loss=o.dmgd.internal_loss,
                    memory_lr=o.dmgd.memory_lr, memory_decay=o.dmgd.memory_decay, seed=cfg.train.seed, **common)
    if o.name == "m3":
        return M3(groups, beta_slow=o.m3.beta_slow, alpha=o.m3.alpha, slow_every=o.m3.slow_every,
                  ns_steps=o.m3.ns_steps, ema=o.m3.ema, precondition=o.m3.precondition, **common)
    return DGD(groups, linears, strength=o.dgd_strength, **common)


def attach_zero_partitions(optimizer: NLOptimizer, zero_optimizer, stage: int) -> None:
    """Tell `optimizer` (the one DeepSpeed wraps) how ZeRO laid out its flat fp32 partitions:
    which coordinates are padding (masked out of DMGD's internal objective) and the group the
    partitions are spread over (sums over coordinates run over it)."""
    if stage == 0:
        return
    optimizer.zero_group = zero_optimizer.dp_process_group
    if stage in (1, 2):
        for flat, pad in zip(zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.groups_padding):
            mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
            if pad:
                mask[flat.numel() - pad:] = False
            optimizer.zero_masks[id(flat)] = mask
        return
    if len(zero_optimizer.fp32_partitioned_groups_flat) != len(optimizer.param_groups) and isinstance(optimizer, DMGD):
        raise ConfigError("ZeRO-3 split a parameter group into several sub-groups (zero_optimization."
                          "sub_group_size), so DMGD's per-group memory would differ from a single process's: "
                          "raise sub_group_size in dist.deepspeed_config")
    for flat, params, pads in zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups,
                                  zero_optimizer.groups_padding):
        pieces = []
        for p, pad in zip(params, pads):
            n = p.partition_numel()
            pieces.append(torch.cat([torch.ones(n - pad, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)]))
        mask = torch.cat(pieces).to(flat.device)
        if mask.numel() != flat.numel():
            raise RuntimeError(f"ZeRO-3 partition of {flat.numel()} elements, expected {mask.numel()}")
        optimizer.zero_masks[id(flat)] = mask
