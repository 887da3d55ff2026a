"""Typed run configuration: YAML presets + dotted command-line overrides.

The schema is a tree of dataclasses validated by OmegaConf structured configs: a key
that is not in the schema, or a value of the wrong type, fails before any work starts,
with the nearest valid key names in the message.

    cfg = load_config("configs/tiny.yaml", ["train.steps=200", "model.dim=256"])
    cfg = load_config(["configs/hope_tiny.yaml", "configs/optim/dmgd.yaml"])  # later files win
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


@dataclass
class HopeConfig:
    """HOPE (arch 'hope'): self-modifying Titans + Continuum Memory System; see nl/models/hope.py."""

    # Sequence mixer: self_modifying (HOPE) | attention (Hope-Attention: causal softmax + RoPE)
    # | titans (baseline: static q/k/v/gates, one neural memory with momentum and forgetting).
    mixer: str = "self_modifying"
    memory_type: str = "mlp"  # mlp: M(z) = z + W1 silu(W2 z) | linear: M(z) = W z
    memory_hidden: int = 0  # hidden width of the memory MLPs; 0 = 2 * head_dim
    chunk_size: int = 64  # in-context chunk of the generating memories (k, v, eta, alpha, q)
    memory_chunk_size: int = 64  # in-context chunk of the read-out memory M_memory
    # eta_t = eta_max * sigmoid(.), starting at min(0.1, eta_max / 2). At most the contractive bound for the
    # switches (nl.models.hope.contractive_eta_max; larger values are refused). 0 = auto: min(1/3, the bound):
    # 1/3 at chunk size 1; at C > 1, whose C gradients per chunk are all taken at the anchor, the chunk map's
    # bound (HOPE 0.0664 at chunk 16, 0.0170 at 64; mixer=titans 0.0699 at 16; docs/HOPE.md).
    eta_max: float = 0.0
    conv_size: int = 4  # short causal depthwise convolutions after the static projections; 1 = none
    dgd: bool = True  # False: plain gradient step (no x x^T decay term)
    # Inner momentum P_t = mu_t P_{t-1} - eta_t grad. Off by default, decided by data as HOPE_SPEC asks:
    # on the tiny HOPE (demo corpus, 2 seeds) it changed val loss by 0.001 nats at +31% step time
    # (docs/BENCHMARKS.md). The 340m-1.3b presets turn it on (the paper's ablation at scale).
    momentum: bool = False
    # mu_t = momentum_max * sigmoid(.), in (0, 1]. 0 = auto: 0.5 at chunk size > 1 (there no eta keeps the
    # chunk step contractive as mu -> 1), else 1 (no cap).
    momentum_max: float = 0.0
    retention: bool = True  # False: alpha_t = 1 (no weight decay / forgetting gate)
    static_k: bool = False  # k from a static projection instead of the memory M_k
    static_v: bool = False  # v from a static projection instead of the memory M_v
    adaptive_q: bool = False  # q from an inner memory M_q instead of the static projection
    # Recompute each in-context chunk in the backward pass instead of storing its intermediates
    # (activation memory of the inner memories drops ~10x for ~1/3 more compute).
    recompute_chunks: bool = True
    # Memory health (docs/HOPE.md "Memories that live"). The paper's literal Eq. 88 form is
    # retention_target=zero normalized_step=false normalize_v=false (its memories fade to zero over a
    # 4K context, or blow up).
    # What retention and DGD's decay pull a memory toward: init (the meta-learned initial state M_0),
    # zero (Eq. 88), auto (init for self_modifying, zero for mixer=titans: Titans' own forgetting).
    retention_target: str = "auto"
    normalized_step: bool = True  # normalised LMS per memory layer: decay along x/||x||, gradient g x^T/||x||^2
    normalize_v: bool = True  # L2-normalise v before it makes the self-generated targets M(v), as q and k are
    # Initial retention time constants 1/(1 - alpha) in tokens, [min, max]: spread log-uniformly over the
    # heads and learned from there (the alpha bias); [100, 100] is alpha = 0.99 for every head.
    retention_tau_init: list[float] = field(default_factory=lambda: [32.0, 4096.0])
    # Read inside a chunk: in_chunk (the anchor plus the in-chunk updates up to t-1) | anchor (the
    # anchor alone, like every other chunk quantity: Eq. 90 literally).
    chunk_read: str = "in_chunk"
    # The chunk step of the inner memories: torch | triton (fused Triton kernels, nl/ops/triton_dgd.py) | auto
    # (triton on CUDA when Triton imports, else torch). triton without CUDA needs TRITON_INTERPRET=1 (slow).
    kernel: str = "auto"
    # One chunk size per CMS level, in outer optimizer steps; the number of levels is its length
    # ([1] = no CMS: one ordinary MLP). Level l is stepped every cms_chunk_sizes[l] optimizer steps
    # with its accumulated gradient (optim.cms; nl/optim/base.py).
    cms_chunk_sizes: list[int] = field(default_factory=lambda: [1, 16, 256])
    cms_hidden: int = 0  # SwiGLU width of every CMS level; 0 = model.ffn_hidden rule
    # Which reading of Eq. 31 (docs/HOPE.md "CMS: two readings"): outer (levels stepped every
    # cms_chunk_sizes[l] optimizer steps) | in_context (per sequence, level l's fast weights start at the
    # outer parameters and learn every cms_context_chunk_sizes[l] tokens inside the forward; the outer
    # optimizer steps the levels every step) | both (in context, and the outer schedule on the outer weights).
    cms_mode: str = "outer"
    cms_context_chunk_sizes: list[int] = field(default_factory=list)  # tokens per in-context update; [] = cms_chunk_sizes
    cms_inner_lr: float = 0.1  # eta of the in-context step (normalised step, nl/ops/cms.py), in (0, 1]
    cms_retention: float = 0.99  # alpha per in-context update, toward the outer weights, in (0, 1]


@dataclass
class ModelConfig:
    arch: str = "transformer"  # a name in nl.models.MODEL_REGISTRY
    # 0 = take it from the data manifest (the tokenizer's vocabulary); a non-zero value
    # must equal the manifest's, else the run refuses to start.
    vocab_size: int = 0
    dim: int = 128  # model width: the residual stream and embedding size
    n_layers: int = 4  # number of blocks
    n_heads: int = 4  # heads of attention / of HOPE's memories; head dim = dim / n_heads (even, for RoPE)
    # SwiGLU hidden width; 0 = round_up(8/3 * dim, ffn_multiple_of) as in Llama.
    ffn_hidden: int = 0
    ffn_multiple_of: int = 64  # default SwiGLU widths (ffn_hidden=0, cms_hidden=0) round up to a multiple of this
    tie_embeddings: bool = False  # the LM head shares the input embedding matrix
    rope_theta: float = 10000.0  # RoPE base of the attention mixers (transformer; hope with mixer=attention)
    norm_eps: float = 1e-5  # epsilon of every RMSNorm
    # std of the normal init of embeddings, input projections and LM head; residual-branch outputs
    # get init_std / sqrt(2 * n_layers)
    init_std: float = 0.02
    hope: HopeConfig = field(default_factory=HopeConfig)  # read by arch 'hope' only


@dataclass
class DataSourceConfig:
    """One entry of data.sources: a token directory and its sampling weight (nl/data/mixture.py)."""

    dir: str = ""  # a data_prep/tokenize_corpus.py output directory
    weight: float = 1.0  # sampling weight, > 0; the weights are normalised to sum to 1
    name: str = ""  # its per-source metric val_loss/<name>; "" = the directory's basename


@dataclass
class DataConfig:
    dir: str = "data/demo/tokens"  # a data_prep/tokenize_corpus.py output directory
    # A weighted mixture instead of data.dir, e.g. [{dir: a, weight: 0.7}, {dir: b, weight: 0.3, name: code}]
    # (keys dir, weight, name); every source needs the same tokenizer (README: Data mixtures).
    sources: list[DataSourceConfig] = field(default_factory=list)
    seq_len: int = 256  # tokens per training window (the context length)
    # sha256 of every shard is checked against the manifest at start-up (catches corrupt
    # shards; sizes are always checked). Turn off for very large corpora if start-up time matters.
    verify_checksums: bool = True
    # none: a window is one sequence (documents packed back to back see each other) | reset: at each EOS
    # HOPE's inner memories and conv caches restart and attention is masked per document, as if every
    # document ran alone (EOS ends its document; RoPE positions restart; nl/models/documents.py).
    document_boundaries: str = "none"


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps of the whole run (the lr schedule spans them)
    seed: int = 0  # seeds the model init, the data order and the optimizer's own randomness
    batch_size: int = 16  # global batch, in sequences
    micro_batch_size: int = 0  # per rank per forward; 0 = the whole per-rank batch
    lr: float = 3e-4  # peak learning rate, reached after warmup
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20  # linear warmup from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying at the end
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps between metrics lines (stdout, metrics.jsonl, wandb)
    init_from: str = ""  # an export dir (python -m nl.export): a fresh run starts from its weights
    # torch.compile each block (after activation checkpointing, before FSDP; HOPE compiles its chunk
    # body once and keeps the chunk loop in Python). The first step pays the compile (minutes on CPU).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend with train.compile: inductor | aot_eager | eager


@dataclass
class DMGDConfig:
    """Deep Momentum GD's memory MLP (nl/optim/memories.py DMGD)."""

    hidden: int = 8  # hidden width of the per-coordinate memory MLP
    internal_loss: str = "l2"  # l2: regress m([P u_{i-1}, mbar_{i-1}]) onto the next P u_i | dot: -<that output, P u_i> (needs memory_decay)
    memory_lr: float = 1e-2  # gradient-descent step of the memory on its internal objective
    memory_decay: float = 0.0  # retention: theta <- (1 - memory_decay) theta before each memory step


@dataclass
class M3Config:
    """Multi-scale Momentum Muon (nl/optim/m3.py); fast/second-moment coefficients are optim.beta1/beta2."""

    beta_slow: float = 0.9  # b3 of the slow momentum
    alpha: float = 1.0  # weight of the slow momentum's orthogonalised direction
    slow_every: int = 16  # f: the slow momentum is refreshed every f steps
    ns_steps: int = 5  # Newton-Schulz iterations
    ema: bool = True  # True: EMAs with bias correction | False: the literal sums of arXiv Algorithm 1
    # before: W -= lr s NS(M / (sqrt(V)+eps)) (bounded, default) | after: arXiv Algorithm 1's
    # W -= lr NS(M) / (sqrt(V)+eps), unbounded where a gradient coordinate vanishes (nl/optim/m3.py)
    precondition: str = "before"


@dataclass
class CMSScheduleConfig:
    """The outer multi-frequency schedule (HOPE_SPEC.md Sec. 3): slow groups step every C steps."""

    # arch hope: CMS level l is stepped every model.hope.cms_chunk_sizes[l] optimizer steps with
    # the gradient accumulated since its last step. False: every level steps every step.
    enabled: bool = True
    lr_scale: list[float] = field(default_factory=list)  # per CMS level lr multiplier; [] = all 1.0
    reduce: str = "sum"  # sum (NeurIPS Eq. 31) | mean: the accumulated gradient divided by C
    # More groups on their own frequency, "REGEX:EVERY" or "REGEX:EVERY:LR_SCALE" matched against
    # parameter names (first match wins, before the CMS levels).
    groups: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    # adamw | momentum | precond_momentum | delta_momentum | dmgd | m3 | dgd (README: Optimizers)
    name: str = "adamw"
    weight_decay: float = 0.1  # decoupled weight decay, on matrices only unless decay_* below extend it
    beta1: float = 0.9  # first-moment EMA coefficient (AdamW; M3's fast momentum)
    beta2: float = 0.95  # also b2 of the RMS preconditioner P of precond/delta momentum and DMGD
    eps: float = 1e-8  # added to sqrt(second moment) in AdamW and the RMS preconditioner P
    decay_embeddings: bool = False  # also apply weight decay to the embedding matrix
    decay_norms_and_biases: bool = False  # also apply weight decay to 1-D parameters (norm gains, biases)
    momentum: float = 0.9  # a of momentum / precond_momentum / delta_momentum; DMGD's initial mix
    delta_beta: float = 1.0  # delta_momentum: strength of the m k^T k forgetting term
    dgd_strength: float = 1.0  # dgd: gamma of the decay along the inputs, W <- W (I - lr gamma C) - lr u
    # m3 / dgd: lr multiplier of their matrix rule (linear-layer weights) relative to the AdamW
    # rule of the other parameters.
    matrix_lr_scale: float = 1.0
    dmgd: DMGDConfig = field(default_factory=DMGDConfig)
    m3: M3Config = field(default_factory=M3Config)
    cms: CMSScheduleConfig = field(default_factory=CMSScheduleConfig)


@dataclass
class EvalConfig:
    every: int = 100  # steps between validation runs; 0 disables periodic validation
    max_batches: int = 20  # validation batches of train.batch_size sequences; 0 = whole split
    # Tasks run at each validation step on rank 0 (README: Evaluating a model), logged as
    # eval/<task>/<metric>: lm-eval task names (checked against lm-eval at startup; pip install lm-eval)
    # and niah:<LENGTH> entries (NIAH single needle in the noise haystack, prompts of LENGTH tokens).
    tasks: list[str] = field(default_factory=list)
    task_limit: int = 0  # examples per lm-eval task (0 = all); NIAH: prompts per depth (0 = 10)
    task_include_path: str = ""  # folder of extra lm-eval task YAMLs (local tasks); "" = lm-eval's own only


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0 saves only at the end
    keep_last: int = 2  # newest checkpoints kept in run.dir; older ones are deleted; 0 keeps all
    resume: bool = True  # resume from the latest checkpoint in run.dir if there is one
    # resume=false where run.dir already holds checkpoints: refused unless overwrite=true, which
    # deletes them (and the run's metrics.jsonl records) first. A run directory belongs to one run.
    overwrite: bool = False
    # Resume from this step's checkpoint instead of the latest (0 = latest), e.g. before a
    # divergence; the later checkpoints move to RUN_DIR/checkpoints_abandoned/ (README: Resume).
    load_step: int = 0


@dataclass
class RunConfig:
    dir: str = "runs/default"  # config.yaml, metrics.jsonl and checkpoints; a rerun with the same dir resumes
    # tqdm progress bar on stderr when it is a terminal (never in redirected logs); false: never.
    # TQDM_DISABLE=1 in the environment also turns it off.
    progress: bool = True


@dataclass
class DistConfig:
    # single: one process. ddp: DistributedDataParallel. fsdp: FSDP2 fully_shard per block.
    # deepspeed: a DeepSpeed ZeRO engine (pip install deepspeed; see nl/distributed/deepspeed.py).
    strategy: str = "single"
    # Activation checkpointing of the model's blocks: none | full (every block) | every_n.
    activation_checkpointing: str = "none"
    ac_every_n: int = 2  # with every_n: checkpoint blocks 0, n, 2n, ...
    timeout_s: int = 600  # every collective fails after this long instead of hanging
    zero_stage: int = 1  # deepspeed only: ZeRO stage 0 | 1 | 2 | 3
    # deepspeed only: a ds_config JSON whose keys override (deep-merged) the generated config.
    deepspeed_config: str = ""


@dataclass
class WandbConfig:
    enabled: bool = False  # also log metrics to Weights & Biases (pip install wandb)
    project: str = "nl"  # wandb project
    name: str = ""  # wandb run name; "" = wandb picks one
    mode: str = "offline"  # offline never needs a network; `wandb sync` uploads later


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


_CHOICES = {
    "train.schedule": ("cosine", "wsd", "constant"),
    "data.document_boundaries": ("none", "reset"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "wandb.mode": ("offline", "online", "disabled"),
    "dist.strategy": ("single", "ddp", "fsdp", "deepspeed"),
    "dist.zero_stage": (0, 1, 2, 3),
    "dist.activation_checkpointing": ("none", "full", "every_n"),
    "model.hope.mixer": ("self_modifying", "attention", "titans"),
    "model.hope.memory_type": ("mlp", "linear"),
    "model.hope.retention_target": ("auto", "init", "zero"),
    "model.hope.chunk_read": ("in_chunk", "anchor"),
    "model.hope.kernel": ("auto", "torch", "triton"),
    "model.hope.cms_mode": ("outer", "in_context", "both"),
    "optim.name": ("adamw", "momentum", "precond_momentum", "delta_momentum", "dmgd", "m3", "dgd"),
    "optim.dmgd.internal_loss": ("l2", "dot"),
    "optim.cms.reduce": ("sum", "mean"),
    "optim.m3.precondition": ("before", "after"),
}


def valid_keys(schema: Any = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the schema, e.g. ['model.arch', ...]."""
    keys = []
    for f in fields(schema):
        name = prefix + f.name
        ftype = f.default_factory() if f.default_factory is not MISSING and callable(f.default_factory) else None  # type: ignore[misc]
        if ftype is not None and is_dataclass(ftype):
            keys.extend(valid_keys(type(ftype), name + "."))
        else:
            keys.append(name)
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    keys = valid_keys()
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not near:  # try the leaf name alone: 'train.stepz' -> 'train.steps'
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in keys if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.7)][:3]
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    return ConfigError(f"unknown config key '{key}' in {source}.{hint} Valid sections: "
                       f"{', '.join(f.name for f in fields(Config))}.")


def _merge(base: DictConfig, other: DictConfig | dict, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except ConfigKeyError as e:
        raise _unknown_key_error(str(e.full_key), source) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid value for '{e.full_key}' in {source}: {e.msg.splitlines()[0]}") from None


def _check_choices(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: what is wrong' of a YAML parse error (PyYAML counts from 0)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (indent with spaces, not tabs)" if "'\\t'" in problem else ""
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        hint += f" ({context} that starts at line {start.line + 1})"
    return f"{where}{problem}{hint}"


def _load_file(p: Path) -> DictConfig:
    """One YAML preset as a mapping of sections, or a one-line ConfigError."""
    if p.is_dir():
        examples = ", ".join(str(f) for f in sorted(p.glob("*.yaml"))[:2]) or "configs/tiny.yaml"
        raise ConfigError(f"config file {p} is a directory: pass a YAML file, e.g. --config {examples}")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (presets are in configs/)")
    try:
        data = OmegaConf.load(p)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(e)}") from None
    except OSError as e:
        if e.errno is not None:  # unreadable; OmegaConf raises errno-less OSError for a scalar top level
            raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
        data = None
    if not isinstance(data, DictConfig):
        kind = "a list" if data is not None else "a single value"
        raise ConfigError(f"config file {p} holds {kind} at its top level: it must be a mapping of sections, "
                          f"e.g. 'train:' then '  steps: 200' (see configs/tiny.yaml)")
    return data


def _parse_override(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=200)")
    key = item.split("=", 1)[0].strip()
    if key not in valid_keys():
        raise _unknown_key_error(key, "the command line")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override '{item}': its value is not valid YAML ({problem}): close brackets and quotes, "
                          f"e.g. model.hope.cms_chunk_sizes=[1,16,256]") from None


def _resolve(cfg: DictConfig) -> None:
    """Replace every ${...} interpolation by its value, in place; one that does not resolve (or resolves to
    a value of the wrong type) is refused naming its key."""
    try:
        OmegaConf.resolve(cfg)
        return
    except OmegaConfBaseException as e:
        error = e
    key = error.full_key or next((k for k in valid_keys() if _fails_to_resolve(cfg, k)), "?")
    raw = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else raw
    detail = str(error).splitlines()[0]
    raise ConfigError(f"{key}={raw}: the interpolation does not resolve ({detail}): give a value or a "
                      f"${{section.key}} reference to an existing key") from None


def _fails_to_resolve(cfg: DictConfig, key: str) -> bool:
    try:
        value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        if isinstance(value, (DictConfig, ListConfig)):
            OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:
        return True
    return False


# Numeric keys whose value must lie in a range: (key, is the value meaningful, what to pass instead).
# Values outside would run without error and train nothing, or the wrong thing (lr < 0 is gradient
# ascent), or crash later (log_every=0, eval.max_batches < 0). Keys read only by one model or
# optimizer are checked where they are read (nl/models, nl/optim).
_RANGES: list[tuple[str, Callable[[float], bool], str]] = [
    ("train.steps", lambda v: v >= 1, "a positive number of optimizer steps"),
    ("train.batch_size", lambda v: v >= 1, "a positive number of sequences"),
    ("train.micro_batch_size", lambda v: v >= 0, "0 (the whole per-rank batch) or a positive number of sequences"),
    ("train.lr", lambda v: v >= 0, "a learning rate >= 0 (a negative one ascends the loss)"),
    ("train.warmup_steps", lambda v: v >= 0, "0 (no warmup) or a positive number of steps"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "a ratio in [0, 1] (final lr = train.lr * min_lr_ratio)"),
    ("train.decay_fraction", lambda v: 0 <= v <= 1, "a fraction of train.steps in [0, 1]"),
    ("train.grad_clip", lambda v: v >= 0, "0 (no clipping) or a positive max gradient norm"),
    ("train.log_every", lambda v: v >= 1, "a positive number of steps"),
    ("optim.weight_decay", lambda v: v >= 0, "0 (no weight decay) or a positive coefficient"),
    ("optim.beta1", lambda v: 0 <= v < 1, "an EMA coefficient in [0, 1)"),
    ("optim.beta2", lambda v: 0 <= v < 1, "an EMA coefficient in [0, 1)"),
    ("optim.eps", lambda v: v >= 0, "a small value >= 0, e.g. 1e-8"),
    ("optim.momentum", lambda v: 0 <= v <= 1, "a momentum coefficient in [0, 1]"),
    ("eval.every", lambda v: v >= 0, "0 (no periodic validation) or a positive number of steps"),
    ("eval.max_batches", lambda v: v >= 0, "0 (the whole val split) or a positive number of batches"),
    ("checkpoint.every", lambda v: v >= 0, "0 (save at the end only) or a positive number of steps"),
    ("checkpoint.keep_last", lambda v: v >= 0, "0 (keep every checkpoint) or a positive count"),
    ("checkpoint.load_step", lambda v: v >= 0, "0 (the latest checkpoint) or the step of a saved one"),
    ("dist.timeout_s", lambda v: v >= 1, "a positive number of seconds"),
    ("dist.ac_every_n", lambda v: v >= 1, "a positive block interval"),
]


def _check_ranges(cfg: DictConfig) -> None:
    for key, ok, expected in _RANGES:
        value = OmegaConf.select(cfg, key)
        if not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{key}={value} is out of range: pass {expected}")


def load_config(path: str | Path | list | tuple | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML preset(s) at `path` (merged left to right) <- `key=value`
    overrides, validated, interpolations resolved. Returns a typed `Config` (an OmegaConf object
    behaving like the dataclass)."""
    cfg: DictConfig = OmegaConf.structured(Config)
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    for p in map(Path, paths):
        cfg = _merge(cfg, _load_file(p), str(p))
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), "the command line")
    _resolve(cfg)
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_eval_tasks(cfg)
    return cfg  # type: ignore[return-value]


def _check_eval_tasks(cfg: DictConfig) -> None:
    """eval.tasks' niah:<LENGTH> entries and eval.task_limit; lm-eval names are checked against lm-eval
    at the start of training (nl.lm_eval.InLoopTasks), where importing it is paid once."""
    for entry in cfg.eval.tasks:
        if entry.startswith("niah"):
            length = entry.partition(":")[2]
            if not length.isdigit() or int(length) <= 0:
                raise ConfigError(f"eval.tasks entry {entry!r}: write NIAH as niah:<LENGTH>, e.g. niah:1024")
    if cfg.eval.task_limit < 0:
        raise ConfigError(f"eval.task_limit={cfg.eval.task_limit}: pass 0 (all examples) or a positive count")
    if cfg.eval.tasks and cfg.eval.every <= 0:
        raise ConfigError("eval.tasks runs at validation steps but eval.every=0: set eval.every=N "
                          "(or eval.tasks=[])")


def config_from_dict(data: dict) -> Config:
    """Rebuild a validated Config from a plain dict (e.g. a saved config.yaml)."""
    return _merge(OmegaConf.structured(Config), data, "a saved config")  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


# --- Key documentation: the comments written beside the schema's fields above are the one source
# of `python train.py --help` (a field's doc = the comment lines just above it + its trailing comment).


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the schema: dotted name, annotated type (e.g. 'int', 'list[int]'), default
    value, one-line doc (its comments), and its allowed values when the schema restricts them."""

    key: str
    type: str
    default: Any
    doc: str
    choices: tuple | None = None


def _field_comments() -> dict[tuple[str, str], str]:
    """{(class name, field name): comment text} parsed from this module's own source."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line number -> text of a comment that follows code on that line
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][:tok.start[1]].strip():
            trailing[tok.start[0]] = tok.string.lstrip("#").strip()
    docs = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, i = [], stmt.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            after = [trailing[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in trailing]
            docs[(node.name, stmt.target.id)] = " ".join(above + after)
        docs[(node.name, None)] = " ".join((ast.get_docstring(node) or "").split())
    return docs


def describe_keys(schema: Any = Config, prefix: str = "", _comments: dict | None = None) -> list[KeyDoc]:
    """Every leaf key of the schema, in schema order (the same keys as `valid_keys()`), with the
    type annotation, default and comment written beside its field in nl/config.py."""
    comments = _field_comments() if _comments is None else _comments
    defaults = OmegaConf.structured(schema)
    out = []
    for f in fields(schema):
        value = getattr(defaults, f.name)
        if isinstance(value, DictConfig):
            out.extend(describe_keys(type(f.default_factory()), prefix + f.name + ".", comments))  # type: ignore[misc]
            continue
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = OmegaConf.to_container(value)
        key = prefix + f.name
        out.append(KeyDoc(key, str(f.type), value, comments.get((schema.__name__, f.name), ""), _CHOICES.get(key)))
    return out


def describe_sections(schema: Any = Config, prefix: str = "", _comments: dict | None = None) -> dict[str, str]:
    """{section prefix, e.g. 'model.hope': its doc (the section class's docstring and the comment
    beside the field that holds it)} for every nested section."""
    comments = _field_comments() if _comments is None else _comments
    out = {}
    for f in fields(schema):
        if f.default_factory is MISSING or not callable(f.default_factory):  # type: ignore[misc]
            continue
        section = f.default_factory()  # type: ignore[misc]
        if not is_dataclass(section):
            continue
        name = prefix + f.name
        parts = [comments.get((type(section).__name__, None), ""), comments.get((schema.__name__, f.name), "")]
        out[name] = " ".join(p for p in parts if p)
        out.update(describe_sections(type(section), name + ".", comments))
    return out
