"""The paper's zero-shot evaluation of an export through lm-evaluation-harness (lm-eval 0.4.13).

    python -m nl.lm_eval --model EXPORT_DIR [--tasks wikitext piqa ...] [--limit N] [--batch-size B]
        [--max-length L] [--output results.json] [--include-path MY_TASKS_DIR] [--device cpu]

Runs lm-eval's Hugging Face model (`HFLM`) on the export loaded with trust_remote_code (nl.hf), i.e.
exactly what `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` does, zero-shot.
Default tasks: the paper's set (PAPER_TASKS). Prints the paper's Table 1 columns as markdown ("-" for
a task not run; the average is over the accuracy columns that were run), then one table of every
metric of any other task, then writes the JSON (--output) with the table and lm-eval's raw results.

Context: lm-eval cuts long documents (WikiText's rolling perplexity) and contexts into windows of
--max-length tokens, by default the export's trained seq_len (the context the model was trained at;
lm-eval's own default would be 2048 for a config without max_position_embeddings). lm-eval
left-truncates a context that does not fit; a continuation (the part scored) longer than --max-length
is refused in one line naming the task, the document and the --max-length that fits every request,
before any of the loglikelihood requests runs (lm-eval itself stops on a bare assert).

An empty context (the first window of a rolling perplexity) is EOS alone, the document separator nl
models are trained with; lm-eval's default is BOS, which nl never feeds: with the plain `lm_eval` CLI,
add prefix_token_id=EOS_ID (config.json's eos_token_id) to --model_args for the same numbers.

Batching is exact: lm-eval right-pads a batch of loglikelihood requests and reads each row's real
positions only; nl models are causal, so a row's logits do not depend on the padding after it, and a
padded forward that does pass attention_mask runs each row's span unpadded (nl.hf.modeling). Every
request starts with fresh HOPE memories. Hub tasks download their data sets through `datasets`;
offline, point --include-path at local task YAMLs (their data in local files).

User mistakes (missing export files, an unknown task, bad numbers) end in one line `error: ...`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from pathlib import Path

from nl.cli import UsageError, one_line_errors

PAPER_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "social_iqa", "boolq")
# The paper's Table 1 columns: (header, task, lm-eval metric, is an accuracy).
TABLE1 = (
    ("Wiki ppl", "wikitext", "word_perplexity", False),
    ("LMB ppl", "lambada_openai", "perplexity", False),
    ("LMB acc", "lambada_openai", "acc", True),
    ("PIQA acc", "piqa", "acc", True),
    ("Hella acc_norm", "hellaswag", "acc_norm", True),
    ("Wino acc", "winogrande", "acc", True),
    ("ARC-e acc", "arc_easy", "acc", True),
    ("ARC-c acc_norm", "arc_challenge", "acc_norm", True),
    ("SIQA acc", "social_iqa", "acc", True),
    ("BoolQ acc", "boolq", "acc", True),
)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'lm-eval==0.4.13' "
                         "(pinned in requirements.txt)") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager that knows `tasks`; UsageError naming the first unknown one.

    Indexing lm-eval's ~15K bundled task YAMLs takes tens of seconds on a slow CPU: when every
    task is found under include_path alone, that smaller index is used."""
    _lm_eval()
    # lm-eval's own warnings (e.g. per-task config notes) stay quiet, as TaskManager(verbosity="ERROR") kept them
    # before lm-eval deprecated that argument in favour of the logging configuration
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path} is not a directory: pass the folder of your task YAMLs")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" nor under {include_path}" if include_path else ""
        raise UsageError(f"unknown lm-eval task {unknown[0]!r} (not in lm-eval {_lm_eval().__version__}{where}): "
                         f"check the name with `lm_eval ls tasks`, or pass --include-path DIR with its YAML")
    return manager


def _shorten(text: str, width: int = 40) -> str:
    """`text` for a one-line message: at most `width` characters, cut with '...'."""
    return text if len(text) <= width else text[:width - 3] + "..."


@functools.cache
def _checked_hflm():
    """lm-eval's HFLM, refusing in one line (UsageError), before any forward, loglikelihood requests whose
    continuation is longer than max_length (HFLM stops on a bare `assert` in the middle of the run)."""
    from lm_eval.models.huggingface import HFLM

    class CheckedHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # request (context, continuation) -> "task doc N", for the message; the first request of a pair wins
            self._request_names = {tuple(r.args): f"{r.task_name} doc {r.doc_id}" for r in reversed(requests)}
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests, **kwargs):
            too_long = [(len(cont), pair) for pair, _, cont in requests if len(cont) > self.max_length]
            if too_long:
                n, pair = max(too_long, key=lambda t: t[0])
                name = getattr(self, "_request_names", {}).get(pair, "a request")
                raise UsageError(f"{name}: its continuation {_shorten(pair[1])!r} is {n} tokens, longer than --max-length "
                                 f"{self.max_length} ({len(too_long)} request(s) are): pass --max-length {n} or more")
            return super()._loglikelihood_tokens(requests, **kwargs)

    return CheckedHFLM


def continuation_tokens(tokenizer, context: str, continuation: str, prefix_token_id: int) -> int:
    """How many tokens lm-eval's HFLM scores for a loglikelihood request (context, continuation): its
    `loglikelihood` and `_encode_pair` (lm-eval 0.4.13) for a causal model. An empty context is the prefix
    token alone (the continuation's own first token when it is that token); otherwise the context's
    trailing whitespace moves to the continuation, and the continuation is what encoding the whole text
    adds after the context's own tokens."""
    if context == "":
        tokens = tokenizer.encode(continuation, add_special_tokens=False)
        return len(tokens) - (1 if tokens[:1] == [prefix_token_id] else 0)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    return len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context))


def long_continuations(manager, tasks: list[str], tokenizer, limit: int | None, max_length: int) -> dict:
    """{task: [(tokens, doc_id, continuation), ...]}: the loglikelihood requests (multiple_choice and
    loglikelihood tasks) longer than max_length tokens among those `run_tasks` would run, zero-shot, on
    `limit` examples per task: lm-eval builds them as its evaluator does (rank 0 of 1), no model involved.
    Rolling perplexities are cut into windows and generations left-truncate their context: never refused."""
    from lm_eval.evaluator_utils import get_sample_size

    out = {}
    for name, task in manager.load(list(tasks))["tasks"].items():
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=0)  # as simple_evaluate(num_fewshot=0) does
        task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        too_long = []
        for request in task.instances:
            if request.request_type != "loglikelihood":
                continue
            context, continuation = request.args[:2]
            n = continuation_tokens(tokenizer, context, continuation, tokenizer.eos_token_id)
            if n > max_length:
                too_long.append((n, request.doc_id, continuation))
        if too_long:
            out[name] = too_long
    return out


def run_tasks(hf_model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
              max_length: int | None = None, include_path: str | None = None, manager=None) -> dict:
    """lm-eval's results for `tasks` (zero-shot) of a transformers model in memory.

    hf_model: a transformers causal LM (nl.hf.modeling.NLForCausalLM); tokenizer: its HF tokenizer.
    limit: examples per task (None = all). Returns lm-eval's `results` dict,
    {task: {"acc,none": float, "acc_stderr,none": float, ..., "alias": str}}; the model runs in eval mode
    and gets its train/eval mode back."""
    _lm_eval()
    from lm_eval import simple_evaluate

    if batch_size < 1 or (limit is not None and limit < 1):
        raise UsageError(f"--batch-size and --limit must be >= 1, got {batch_size} and {limit}")
    manager = manager or task_manager(tasks, include_path)
    was_training = hf_model.training
    hf_model.eval()
    try:
        # An empty context (a rolling perplexity's first window) is the prefix token alone: EOS, the
        # document separator nl models are trained with (lm-eval's default, BOS, never occurs in training).
        lm = _checked_hflm()(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  prefix_token_id=tokenizer.eos_token_id, trust_remote_code=True)
        out = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, num_fewshot=0,
                              log_samples=False, bootstrap_iters=0)
    finally:
        hf_model.train(was_training)
    return out["results"]


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: the ',none' filter suffix dropped; stderr, the
    example count (sample_len) and non-numeric entries (alias) left out."""
    table = {}
    for task, entries in results.items():
        row = {}
        for key, value in entries.items():
            name = key.split(",")[0]
            if name.endswith("_stderr") or name == "sample_len" or not isinstance(value, (int, float)):
                continue
            row[name] = float(value)
        table[task] = row
    return table


def table1(per_task: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The paper's Table 1 columns (None where the task was not run) and "Avg acc": the mean of the
    accuracy columns that were run (None if none was)."""
    row = {header: per_task.get(task, {}).get(metric) for header, task, metric, _ in TABLE1}
    accs = [row[header] for header, _, _, is_acc in TABLE1 if is_acc and row[header] is not None]
    row["Avg acc"] = sum(accs) / len(accs) if accs else None
    return row


def _fmt(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def markdown(row: dict[str, float | None], per_task: dict[str, dict[str, float]], model_name: str = "") -> str:
    """Table 1 as a markdown table (accuracies in %), then the metrics of tasks outside the paper's set."""
    percent = {header: is_acc for header, _, _, is_acc in TABLE1} | {"Avg acc": True}
    lines = ["| Model | " + " | ".join(row) + " |", "|---" * (len(row) + 1) + "|",
             f"| {model_name} | " + " | ".join(_fmt(v, percent[h]) for h, v in row.items()) + " |"]
    others = {t: m for t, m in per_task.items() if t not in PAPER_TASKS}
    if others:
        lines += ["", "| Task | Metric | Value |", "|---|---|---|"]
        lines += [f"| {t} | {name} | {value:.4f} |" for t, m in others.items() for name, value in m.items()]
    return "\n".join(lines)


def load_export(path: str | Path, device: str = "cpu"):
    """(NLForCausalLM in eval mode, its HF tokenizer, the export's seq_len) from an export directory;
    UsageError naming the fix when a file is missing."""
    from nl.export import check_export_dir

    path = Path(path)
    check_export_dir(path)  # a run folder: the fix exports it to exports/NAME, not into the run folder
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "modeling_nl.py")
               if not (path / f).is_file()]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}: it is not a complete Hugging Face export; "
                         f"write one with python -m nl.export --run RUN_DIR --output {path} (transformers installed)")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).to(device).eval()
    # the tokenizer needs no remote code, but AutoTokenizer reads config.json, whose auto_map would prompt
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return model, tokenizer, int(getattr(model.config, "seq_len", 0)) or None


class InLoopTasks:
    """eval.tasks run on the model being trained (rank 0), at validation steps.

    Entries: lm-eval task names (zero-shot, eval.task_limit examples each, lm-eval's windows of
    data.seq_len tokens) and niah:<LENGTH> (NIAH single needle, number value, noise haystack, at
    nl.niah's default depths, eval.task_limit prompts per depth or 10; greedy decoding). Built at
    the start of training on every rank, so an unknown lm-eval name, or a loglikelihood continuation
    (the scored part of a multiple_choice or loglikelihood request) longer than data.seq_len among the
    examples that will run, stops every rank there, in one line, before the first step. The model is
    evaluated in memory: nl.hf's NLForCausalLM wraps the very module (no export written). Needs the
    whole model on one rank: dist.strategy single or ddp.

    __call__(model) -> {"eval/<task>/<metric>": float}; lm-eval reseeds the global RNGs: the trainer
    restores its RNG state after the call, so a run with eval.tasks trains on the same random numbers."""

    def __init__(self, cfg, tokenizer_path: str | Path) -> None:
        from nl.config import ConfigError

        self.cfg = cfg
        tasks = list(cfg.eval.tasks)
        self.niah = [int(t.partition(":")[2]) for t in tasks if t.startswith("niah")]
        self.lm_tasks = [t for t in tasks if not t.startswith("niah")]
        if cfg.dist.strategy in ("fsdp", "deepspeed"):
            raise ConfigError(f"eval.tasks needs the whole model on rank 0, but dist.strategy={cfg.dist.strategy} "
                              f"shards it: use dist.strategy=single or ddp, or export checkpoints and run "
                              f"python -m nl.lm_eval")
        self.manager = None
        self.hf_tokenizer = None
        if self.lm_tasks:
            try:
                self.manager = task_manager(self.lm_tasks, cfg.eval.task_include_path or None)
            except UsageError as e:
                raise ConfigError(f"eval.tasks: {e}".replace("--include-path", "eval.task_include_path")) from None
            import tempfile

            import transformers

            from nl.hf import write_tokenizer

            with tempfile.TemporaryDirectory() as tmp:  # the HF form of the run's tokenizer, held in memory
                write_tokenizer(Path(tokenizer_path), Path(tmp))
                self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
            self._check_continuations()
        from nl.niah import build_sample, noise_haystack
        from nl.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(tokenizer_path)
        for length in self.niah:  # a length too short for the prompt's fixed text: refused now
            try:
                build_sample(self.tokenizer, "niah_single_1", length, 0.5, 0, 0, noise_haystack(self.tokenizer))
            except UsageError as e:
                raise ConfigError(f"eval.tasks niah:{length}: {e}".replace("--lengths", "length")) from None

    def _check_continuations(self) -> None:
        """A loglikelihood continuation longer than data.seq_len among the eval.task_limit examples that
        will run: refused now, in one line, not at the first validation step (lm-eval cannot score it)."""
        from nl.config import ConfigError

        seq_len = int(self.cfg.data.seq_len)
        too_long = long_continuations(self.manager, self.lm_tasks, self.hf_tokenizer,
                                      self.cfg.eval.task_limit or None, seq_len)
        if not too_long:
            return
        task, requests = next(iter(too_long.items()))
        n, doc, text = max(requests, key=lambda r: r[0])
        need = max(r[0] for rs in too_long.values() for r in rs)
        others = [t for t in too_long if t != task]
        fixes = [f"raise data.seq_len to {need} or more",
                 f"drop {', '.join(too_long)} from eval.tasks"]
        first = min(r[1] for rs in too_long.values() for r in rs)  # every task's documents before it fit
        if first > 0:
            fixes.append(f"set eval.task_limit={first} (the documents before doc {first} fit)")
        also = f"; {', '.join(others)} too" if others else ""
        raise ConfigError(f"eval.tasks: {task} doc {doc}: its continuation {_shorten(text)!r} is {n} tokens, longer than "
                          f"data.seq_len {seq_len} ({len(requests)} request(s) are{also}), and lm-eval cannot "
                          f"score it: {', or '.join(fixes)}")

    def __call__(self, model) -> dict[str, float]:
        import torch
        from omegaconf import OmegaConf

        from nl.hf.modeling import NLConfig, NLForCausalLM
        from nl.niah import greedy_generate, run_niah

        out: dict[str, float] = {}
        limit = self.cfg.eval.task_limit or None
        was_training = model.training
        model.eval()
        try:
            if self.lm_tasks:
                config = NLConfig(model=OmegaConf.to_container(self.cfg.model, resolve=True),
                                  vocab_size=int(self.cfg.model.vocab_size), seq_len=int(self.cfg.data.seq_len),
                                  bos_token_id=self.tokenizer.bos_id, eos_token_id=self.tokenizer.eos_id)
                hf_model = NLForCausalLM(config, net=model)
                try:
                    results = run_tasks(hf_model, self.hf_tokenizer, self.lm_tasks, limit, batch_size=8,
                                        max_length=int(self.cfg.data.seq_len), manager=self.manager)
                except UsageError as e:  # checked at the start; should one slip through, in training's words
                    from nl.config import ConfigError

                    raise ConfigError(f"eval.tasks: {e}".replace("pass --max-length", "raise data.seq_len to")
                                      .replace("--max-length", "data.seq_len")) from None
                for task, values in metrics(results).items():
                    out.update({f"eval/{task}/{name}": v for name, v in values.items()})
            if self.niah:
                device = next(model.parameters()).device
                with torch.no_grad():
                    for length in self.niah:
                        result = run_niah(greedy_generate(model, self.tokenizer.eos_id), self.tokenizer, [length],
                                          tasks=["niah_single_1"], samples=limit or 10, device=device)
                        out[f"eval/niah:{length}/accuracy"] = result["mean_accuracy"]
        finally:
            model.train(was_training)
        return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m nl.lm_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (python -m nl.export)")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in tokens (default: the export's trained seq_len)")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAMLs (local tasks)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    with one_line_errors():
        from nl.cli import parse_device

        device = parse_device(args.device)
        manager = task_manager(args.tasks, args.include_path)  # names checked before the model loads
        model, tokenizer, seq_len = load_export(args.model, str(device))
        start = time.perf_counter()
        results = run_tasks(model, tokenizer, args.tasks, args.limit, args.batch_size,
                            args.max_length or seq_len, args.include_path, manager)
        seconds = time.perf_counter() - start
        per_task = metrics(results)
        row = table1(per_task)
        print(markdown(row, per_task, str(args.model)))
        out = {"model": str(args.model), "tasks": args.tasks, "limit": args.limit, "batch_size": args.batch_size,
               "max_length": args.max_length or seq_len, "seconds": seconds, "table1": row, "metrics": per_task,
               "results": results}
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
