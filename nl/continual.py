"""Continual learning: one model trained on K domains in sequence, every domain evaluated after each phase.

    python -m nl.continual --config configs/hope_tiny.yaml --domains data/a/tokens data/b/tokens \\
        --steps-per-domain 200 --run-dir runs/continual_hope [key=value ...]

A domain is a token directory (data_prep/tokenize_corpus.py output) with a train and a val split;
every domain must be tokenized with the same tokenizer. Phase k (1..K) is an ordinary training run
(nl.trainer.train) in RUN/phase_k on domain k's train split for --steps-per-domain steps. Phase
k > 1 starts from phase k-1's weights through train.init_from on RUN/phase_{k-1}/export (the
format of `python -m nl.export`); phase 1 starts from a fresh init, or from the user's
train.init_from. Only the weights travel between phases: each phase starts a fresh optimizer
(new moments, CMS accumulators) and its own lr warmup and decay, the re-warm / re-decay cycle of
continued pretraining (docs/CONTINUAL.md says why).

After phase k, its export is evaluated on every domain's val split (the windows the trainer's
periodic validation uses: eval.max_batches batches of train.batch_size sequences, 0 = all):

    L[k][j] = mean next-token loss (nats) on domain j after phase k          K x D matrix
    forgetting[j] = L[K][j] - min_k L[k][j]                                   >= 0

D is the number of distinct domains (= K unless a domain is revisited, e.g. --domains a b a).
The matrix is printed as markdown, then the whole result as one JSON line, and written to
RUN/continual.json (after every phase, so a stopped run keeps what it measured). Rerunning the
same command resumes: a finished phase is not retrained, an interrupted one resumes from its
latest checkpoint. One process only (no torchrun), dist.strategy=single.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

RESULT_FILE = "continual.json"
# Keys each phase sets itself: the command's options own them.
_OWNED_KEYS = {"data.dir": "--domains", "data.sources": "--domains", "run.dir": "--run-dir",
               "train.steps": "--steps-per-domain"}


def domain_names(dirs: list[Path]) -> list[str]:
    """Shortest distinct trailing paths of the (distinct, resolved) `dirs`: [a/tokens, b/tokens] -> the
    same; [data/a, data/b] -> [a, b]."""
    depth = 1
    while True:
        names = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(names)) == len(names) or depth >= max(len(d.parts) for d in dirs):
            return names
        depth += 1


def check_domains(dirs: list[str | Path], seq_len: int, batch_size: int) -> list[Path]:
    """The distinct domain directories (resolved, first-appearance order) after checking that each has a
    train split of >= batch_size windows and a val split of >= 1 window of seq_len + 1 tokens, and that
    all share one tokenizer. Raises DataError in one line."""
    from nl.data.shards import DataError, TokenShards

    distinct = list(dict.fromkeys(Path(d).resolve() for d in dirs))
    first = None
    for d in distinct:
        if not (d / "manifest.json").is_file():
            raise DataError(f"domain {d} is not a token directory (no manifest.json): make one with "
                            f"data_prep/tokenize_corpus.py --output {d}")
        val = TokenShards(d, split="val", verify_checksums=False)  # raises: no val split (--val-fraction)
        if val.num_windows(seq_len) < 1:
            raise DataError(f"domain {d} has {val.num_tokens} val tokens, fewer than data.seq_len+1={seq_len + 1}: "
                            f"re-tokenize it with a larger --val-fraction, or lower data.seq_len")
        TokenShards(d, split="train", verify_checksums=False).check_seq_len(seq_len, min_windows=batch_size)
        if first is None:
            first = val
        elif val.fingerprint != first.fingerprint:
            raise DataError(f"domain {d} was tokenized with another tokenizer (fingerprint {val.fingerprint[:12]}) "
                            f"than {first.dir} ({first.fingerprint[:12]}): tokenize every domain with the same "
                            f"tokenizer.model (data_prep/tokenize_corpus.py --tokenizer)")
    return distinct


def forgetting(matrix: list[list[float]]) -> list[float]:
    """Per domain (column) j: final-row loss minus the lowest loss over all rows (phases)."""
    return [matrix[-1][j] - min(row[j] for row in matrix) for j in range(len(matrix[0]))]


def phase_config(base_cfg, domain: Path, steps: int, run_dir: Path, init_from: str):
    """A copy of `base_cfg` for one phase: its data.dir, run.dir, train.steps and train.init_from."""
    import copy

    cfg = copy.deepcopy(base_cfg)
    cfg.data.dir, cfg.run.dir, cfg.train.steps, cfg.train.init_from = str(domain), str(run_dir), steps, init_from
    return cfg


def evaluate_domains(export_dir: Path, domains: list[Path], cfg) -> list[float]:
    """Mean token loss of export `export_dir` on each domain's val split: eval.max_batches global batches of
    train.batch_size windows of data.seq_len (0 = the whole split), in micro-batches."""
    from nl.data.loader import iter_eval_batches
    from nl.data.shards import TokenShards
    from nl.evaluate import evaluate_loss
    from nl.export import load_pretrained
    from nl.trainer import autocast_for, resolve_device

    device = resolve_device(cfg.train.device)
    model = load_pretrained(export_dir, device=device)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    max_batches = cfg.eval.max_batches * (cfg.train.batch_size // micro)
    losses = []
    for d in domains:
        val = TokenShards(d, split="val", verify_checksums=cfg.data.verify_checksums)
        batches = iter_eval_batches(val, cfg.data.seq_len, micro, max_batches)
        loss_sum, count = evaluate_loss(model, batches, device, autocast_for(device, cfg.train.precision))
        losses.append((loss_sum / count).item())
    return losses


def markdown(result: dict) -> str:
    """The loss matrix (rows: after phase k, columns: domains) and the forgetting row as a markdown table."""
    names = [d["name"] for d in result["domains"]]
    lines = ["| after phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for phase, row in zip(result["phases"], result["loss"]):
        lines.append(f"| {phase['phase']}: {phase['domain']} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    if len(result["loss"]) == len(result["phases_planned"]):
        lines.append("| forgetting | " + " | ".join(f"{v:.4f}" for v in result["forgetting"]) + " |")
    return "\n".join(lines)


def run_continual(base_cfg, domains: list[str | Path], steps_per_domain: int, run_dir: str | Path,
                  say=print) -> dict:
    """Train phases 1..K (module docstring), evaluate after each; returns the result written to
    RUN/continual.json: {"domains": [{"name", "dir"}], "phases": [{"phase", "domain", "run_dir", "export",
    "train_loss"}], "loss": K x D list, "forgetting": [D] (after the last phase), "mean_forgetting", ...}.

    Raises ConfigError / DataError in one line for bad input (before any training), TrainingError
    from a phase, and returns early with result["stopped_by"] set when a phase was stopped by a signal."""
    from nl.config import ConfigError, to_dict
    from nl.export import export
    from nl.trainer import train

    if len(domains) < 2:
        raise ConfigError(f"--domains got {len(domains)} directory: continual learning needs at least 2 "
                          f"(for one domain, train with train.py)")
    if steps_per_domain < 1:
        raise ConfigError(f"--steps-per-domain must be >= 1, got {steps_per_domain}")
    if base_cfg.data.sources:
        raise ConfigError("data.sources is set (a mixture): each phase trains on one --domains directory; "
                          "drop data.sources from the config")
    if base_cfg.dist.strategy != "single" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("python -m nl.continual runs in one process: set dist.strategy=single and launch it "
                          "without torchrun/srun")
    distinct = check_domains(domains, base_cfg.data.seq_len, base_cfg.train.batch_size)
    names = domain_names(distinct)
    name_of = dict(zip(distinct, names))
    order = [Path(d).resolve() for d in domains]
    if base_cfg.model.arch == "hope" and base_cfg.optim.cms.enabled:
        slowest = max(base_cfg.model.hope.cms_chunk_sizes)
        if steps_per_domain % slowest:
            say(f"warning: --steps-per-domain {steps_per_domain} is not a multiple of the slowest CMS chunk "
                f"({slowest} steps): each phase ends with that level's last partial gradient unapplied "
                f"(the optimizer starts afresh every phase)")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"domains": [{"name": n, "dir": str(d)} for d, n in zip(distinct, names)],
              "phases_planned": [name_of[d] for d in order], "steps_per_domain": steps_per_domain,
              "arch": base_cfg.model.arch, "config": to_dict(base_cfg), "phases": [], "loss": [],
              "forgetting": None, "mean_forgetting": None, "stopped_by": None}
    init_from = base_cfg.train.init_from
    for k, domain in enumerate(order, start=1):
        phase_dir = run_dir / f"phase_{k}"
        say(f"phase {k}/{len(order)}: {name_of[domain]} for {steps_per_domain} steps in {phase_dir}"
            + (f", from {init_from}" if init_from else ", fresh init"))
        summary = train(phase_config(base_cfg, domain, steps_per_domain, phase_dir, init_from))
        if summary["stopped_by"]:
            result["stopped_by"] = summary["stopped_by"]
            say(f"phase {k} stopped by {summary['stopped_by']}: rerun the same command to resume it")
            break
        export_dir = export(phase_dir, phase_dir / "export")
        losses = evaluate_domains(export_dir, distinct, base_cfg)
        result["phases"].append({"phase": k, "domain": name_of[domain], "run_dir": str(phase_dir),
                                 "export": str(export_dir), "train_loss": summary["loss"],
                                 "parameters": summary["parameters"]})
        result["loss"].append(losses)
        if k == len(order):
            result["forgetting"] = forgetting(result["loss"])
            result["mean_forgetting"] = sum(result["forgetting"]) / len(result["forgetting"])
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        say(" | ".join(f"{n} {v:.4f}" for n, v in zip(names, losses)))
        init_from = str(export_dir)
    return result


def main(argv: list[str] | None = None) -> dict:
    from nl.cli import one_line_errors
    from nl.config import ConfigError, load_config
    from nl.train_cli import default_threads
    from nl.trainer import USER_ERRORS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None,
                    help="a YAML preset (configs/*.yaml); repeat to layer presets (later files win)")
    ap.add_argument("--domains", nargs="+", required=True,
                    help="token directories in training order, one tokenizer for all (a directory may recur)")
    ap.add_argument("--steps-per-domain", type=int, required=True, help="optimizer steps of each phase")
    ap.add_argument("--run-dir", required=True, help="RUN: phase_k/ run directories and continual.json")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-3")
    args = ap.parse_intermixed_args(argv)

    with one_line_errors():
        try:
            for item in args.overrides:
                key = item.split("=", 1)[0].strip()
                if key in _OWNED_KEYS:
                    raise ConfigError(f"{key} is set per phase by {_OWNED_KEYS[key]}: drop the override {item}")
            cfg = load_config(args.config, args.overrides)
            threads = default_threads()  # None: OMP_NUM_THREADS is set, and torch follows it
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            result = run_continual(cfg, args.domains, args.steps_per_domain, args.run_dir)
        except USER_ERRORS as e:
            sys.exit(f"error: {e}")
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, without the pending save
            sys.exit("error: interrupted before a checkpoint could be saved; rerun the same command to resume")
    if result["stopped_by"]:  # the phase saved a checkpoint at a step boundary: 128 + the signal, as train.py
        if result["loss"]:
            print(markdown(result))
        print(f"stopped by {result['stopped_by']} in phase {len(result['phases']) + 1}: rerun the same command "
              f"to resume", file=sys.stderr)
        sys.exit(128 + signal.Signals[result["stopped_by"]].value)
    print(markdown(result))
    print(json.dumps({k: result[k] for k in ("domains", "phases_planned", "loss", "forgetting", "mean_forgetting")}))
    return result


if __name__ == "__main__":
    main()
