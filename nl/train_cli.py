"""What train.py's command line adds around `load_config` + `train`.

- `keys_help()`: every config key with its type, default and doc, for `--help` (the docs are the
  comments beside the schema's fields in nl/config.py: one source).
- `config_report(cfg)`: the resolved config as YAML plus derived figures (parameter count from a
  meta-device model, tokens per step, the per-rank micro-batch x accumulation split of
  `nl.trainer._batch_split` per world size), for `--print-config`.
- `unread_keys(cfg, set_keys)`: keys the user set that this run will not read (another
  architecture's, optimizer's or strategy's section), to warn about.
- `default_threads()`: torch intra-op threads for one process of a node.
- `refusal_exit(message)`: a refusal printed once under torchrun, and named in its failure summary.
"""

from __future__ import annotations

import copy
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from nl.config import Config, describe_keys, describe_sections, to_yaml


def keys_help(width: int = 100) -> str:
    """Every config key as `key  type {choices} = default` and its doc, grouped by section."""
    sections = describe_sections()
    lines = ["config keys (set as key=value after the options, or in a --config YAML):"]
    section = None
    for k in describe_keys():
        prefix = k.key.rsplit(".", 1)[0]
        if prefix != section:
            section = prefix
            lines.append("")
            lines.extend(textwrap.wrap(f"{prefix}.*  {sections.get(prefix, '')}".rstrip(), width))
        choices = " {" + "|".join(map(str, k.choices)) + "}" if k.choices else ""
        default = json.dumps(k.default) if isinstance(k.default, str) else k.default
        lines.append(f"  {k.key}  {k.type}{choices} = {default}")
        lines.extend(textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a YAML mapping (a list value is one leaf)."""
    if not isinstance(node, dict):
        return [prefix[:-1]]
    return [k for name, value in node.items() for k in _leaf_keys(value, f"{prefix}{name}.")]


def set_keys(config_paths: list[str] | None, overrides: list[str]) -> dict[str, str]:
    """{dotted key: where it was set ("in FILE" for the last YAML that sets it, or "on the command
    line")} for every key given explicitly; call after `load_config` has validated the same inputs."""
    where: dict[str, str] = {}
    for path in config_paths or []:
        data = OmegaConf.to_container(OmegaConf.load(path))
        for key in _leaf_keys(data if isinstance(data, dict) else {}):
            where[key] = f"in {path}"
    for item in overrides:
        where[item.split("=", 1)[0].strip()] = "on the command line"
    return where


_HOPE_MEMORY_KEYS = ("memory_type", "memory_hidden", "chunk_size", "memory_chunk_size", "eta_max", "conv_size",
                     "dgd", "momentum", "momentum_max", "retention", "static_k", "static_v", "adaptive_q",
                     "recompute_chunks",
                     "retention_target", "normalized_step", "normalize_v", "retention_tau_init", "chunk_read", "kernel")

# (key or section prefix, is it read by this run?, why not). The model keys follow nl/models (which
# arch or HOPE mixer builds from them); the optimizer keys follow nl/optim.build_optimizer.
_READ_RULES: list[tuple[str, Callable[[Config], bool], Callable[[Config], str]]] = [
    ("model.hope.", lambda c: c.model.arch == "hope",
     lambda c: f"model.arch={c.model.arch} (only arch 'hope' reads model.hope.*)"),
    *[(f"model.hope.{name}", lambda c: c.model.hope.mixer != "attention",
       lambda c: "model.hope.mixer=attention (softmax attention: no inner memories)") for name in _HOPE_MEMORY_KEYS],
    *[(f"model.hope.{name}", lambda c: c.model.hope.mixer != "titans",
       lambda c: "model.hope.mixer=titans (q, k, v always static)") for name in ("static_k", "static_v", "adaptive_q")],
    ("model.rope_theta", lambda c: c.model.arch != "hope" or c.model.hope.mixer == "attention",
     lambda c: f"model.hope.mixer={c.model.hope.mixer} (no rotary embeddings)"),
    *[(f"optim.cms.{name}", lambda c: c.model.arch == "hope",
       lambda c: f"model.arch={c.model.arch} (CMS levels exist in arch 'hope' only)") for name in ("enabled", "lr_scale")],
    ("optim.dmgd.", lambda c: c.optim.name == "dmgd", lambda c: f"optim.name={c.optim.name}"),
    ("optim.m3.", lambda c: c.optim.name == "m3", lambda c: f"optim.name={c.optim.name}"),
    ("optim.momentum", lambda c: c.optim.name in ("momentum", "precond_momentum", "delta_momentum", "dmgd"),
     lambda c: f"optim.name={c.optim.name}"),
    ("optim.delta_beta", lambda c: c.optim.name == "delta_momentum", lambda c: f"optim.name={c.optim.name}"),
    ("optim.dgd_strength", lambda c: c.optim.name == "dgd", lambda c: f"optim.name={c.optim.name}"),
    ("optim.matrix_lr_scale", lambda c: c.optim.name in ("m3", "dgd"), lambda c: f"optim.name={c.optim.name}"),
    ("dist.zero_stage", lambda c: c.dist.strategy == "deepspeed", lambda c: f"dist.strategy={c.dist.strategy}"),
    ("dist.deepspeed_config", lambda c: c.dist.strategy == "deepspeed",
     lambda c: f"dist.strategy={c.dist.strategy}"),
    *[(f"model.hope.{name}", lambda c: c.model.hope.cms_mode != "outer",
       lambda c: "model.hope.cms_mode=outer (no in-context CMS updates)")
      for name in ("cms_context_chunk_sizes", "cms_inner_lr", "cms_retention")],
    ("train.compile_backend", lambda c: c.train.compile, lambda c: "train.compile=false"),
    *[(f"eval.{name}", lambda c: bool(c.eval.tasks), lambda c: "eval.tasks=[]")
      for name in ("task_limit", "task_include_path")],
    ("dist.ac_every_n", lambda c: c.dist.activation_checkpointing == "every_n",
     lambda c: f"dist.activation_checkpointing={c.dist.activation_checkpointing}"),
]


def unread_keys(cfg: Config, keys: dict[str, str]) -> list[str]:
    """One warning per reason, naming the keys in `keys` ({key: where set}) that `cfg`'s run will
    not read, e.g. model.hope.* with model.arch=transformer. [] when every set key is read."""
    by_reason: dict[str, dict[str, list[str]]] = {}  # reason -> where set -> keys
    for key, where in keys.items():
        for pattern, is_read, why in _READ_RULES:
            if (key.startswith(pattern) if pattern.endswith(".") else key == pattern) and not is_read(cfg):
                by_reason.setdefault(why(cfg), {}).setdefault(where, []).append(key)
                break
    return [f"not read with {reason}, so without effect: "
            + "; ".join(f"{', '.join(names)} (set {where})" for where, names in sources.items())
            for reason, sources in by_reason.items()]


def _vocab_size(cfg: Config) -> tuple[int | None, str]:
    """The vocabulary the run will use and where it comes from (the trainer's rule: 0 = the data's)."""
    if cfg.model.vocab_size:
        return int(cfg.model.vocab_size), "model.vocab_size"
    sources = list(getattr(cfg.data, "sources", None) or [])
    first_dir = sources[0]["dir"] if sources else cfg.data.dir  # the mixture refuses mixed tokenizers
    manifest = Path(first_dir) / "manifest.json"
    if not manifest.is_file():
        return None, f"model.vocab_size=0 and {manifest} does not exist: set model.vocab_size to count"
    return int(json.loads(manifest.read_text())["tokenizer"]["vocab_size"]), str(manifest)


def derived_figures(cfg: Config, world_sizes: list[int] | None = None) -> dict:
    """{"parameters", "vocab_size", "vocab_source", "tokens_per_step", "batch_split"} of `cfg`,
    without data loading or any allocation: the model is built on the meta device. batch_split maps
    a world size to (micro-batch, accumulation steps) per rank, or to the trainer's error for it;
    world sizes default to 1, 2, 4, ... up to train.batch_size, plus $WORLD_SIZE."""
    from nl.models import build_model, count_parameters
    from nl.optim import check_supported
    from nl.trainer import _batch_split

    from nl.config import ConfigError

    check_supported(cfg)
    vocab, source = _vocab_size(cfg)
    params = None
    if vocab is not None:
        model_cfg = copy.deepcopy(cfg.model)
        model_cfg.vocab_size = vocab
        params = count_parameters(build_model(model_cfg, device="meta"))
    if world_sizes is None:
        world_sizes = [2 ** i for i in range(cfg.train.batch_size.bit_length()) if 2 ** i <= cfg.train.batch_size]
        current = int(os.environ.get("WORLD_SIZE", "1"))
        world_sizes = sorted(set(world_sizes) | {current})
    split: dict[int, tuple[int, int] | str] = {}
    for n in world_sizes:
        try:
            split[n] = _batch_split(cfg, n)
        except ConfigError as e:
            split[n] = str(e)
    return {"parameters": params, "vocab_size": vocab, "vocab_source": source,
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len, "batch_split": split}


def config_report(cfg: Config) -> str:
    """The resolved config as YAML, then the derived figures as YAML comments (so the whole report
    can be saved and passed back as a --config)."""
    d = derived_figures(cfg)
    params = (f"{d['parameters']:,} (vocabulary {d['vocab_size']:,} from {d['vocab_source']})"
              if d["parameters"] is not None else f"unknown: {d['vocab_source']}")
    lines = ["# derived figures (not config keys):",
             f"# parameters: {params}",
             f"# tokens per step: {d['tokens_per_step']:,} (train.batch_size {cfg.train.batch_size} x "
             f"data.seq_len {cfg.data.seq_len})",
             "# per rank, by world size: micro-batch x gradient-accumulation steps"]
    for n, split in d["batch_split"].items():
        lines.append(f"#   {n}: {split[0]} x {split[1]}" if isinstance(split, tuple) else f"#   {n}: refused: {split}")
    return to_yaml(cfg) + "\n".join(lines)


def default_threads(environ: dict | None = None) -> int | None:
    """Intra-op threads for one training process: the CPUs it may run on (its affinity mask, which
    slurm, taskset and container limits narrow) divided among the processes of its node
    ($LOCAL_WORLD_SIZE, set by torchrun), at least 1. None when $OMP_NUM_THREADS is set: torch
    already follows the user's choice."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1"))))


def refusal_exit(message: str, environ: dict | None = None) -> str | int:
    """What a rank passes to sys.exit for a one-line refusal `message` (a bad config, data or checkpoint).

    Under torchrun ($TORCHELASTIC_ERROR_FILE set) every refusing rank writes `message` into its error
    file, where torchrun's failure summary shows it as that rank's `traceback` (the root cause's
    included, whichever rank failed first), and only rank 0 prints it: a config error every rank
    hits is printed once, and a refusal only rank k makes still shows in the summary. Without an error
    file the rank prints it itself (returns `message`)."""
    environ = os.environ if environ is None else environ
    error_file = environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return message
    try:
        with open(error_file, "w") as f:  # the layout torch.distributed.elastic's @record writes
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        return message
    return message if environ.get("RANK", "0") == "0" else 1
