"""Time per lm-eval request of exports on this machine, on local stand-in tasks, and an ESTIMATE of the
paper's full zero-shot set from its official request counts.

    python benchmarks/bench_lm_eval.py --models EXPORT_DIR... [--corpus data/demo/corpus.jsonl]
        [--docs 100] [--batch-size 8] [--max-length L] [--workdir /tmp/bench_lm_eval]

The hub's task data cannot be downloaded everywhere, so two stand-in tasks are written from the last
--docs documents of --corpus (Wikipedia lead sections for the demo corpus; they may overlap the
training text, so their scores are not held-out numbers):
  standin_cloze  multiple choice like HellaSwag: the first 2/3 of a sentence, its true ending and 3
                 endings of other documents' sentences (seeded): 4 loglikelihood requests per example
  standin_wiki   rolling perplexity like WikiText: each document's text, windows of the model's seq_len
Each task runs alone through python -m nl.lm_eval, timed; the table gives seconds per multiple-choice
request and per rolling window, then the estimate of the paper set (PAPER_REQUESTS) from them.
--max-length is nl.lm_eval's (default: each export's trained seq_len): a cloze ending longer than it
stops the run in one line that names the --max-length to pass.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Official request counts of the paper's set, zero-shot (lm-eval 0.4.13's splits; example counts from the
# data sets' cards: piqa validation 1,838; hellaswag validation 10,042; winogrande_xl validation 1,267;
# ARC-Easy test 2,376 and ARC-Challenge test 1,172 (4 choices each, a few questions have 3 or 5);
# social_i_qa validation 1,954; boolq validation 3,270; lambada_openai test 5,153 (one request each).
PAPER_REQUESTS = {"lambada_openai": 5153, "piqa": 1838 * 2, "hellaswag": 10042 * 4, "winogrande": 1267 * 2,
                  "arc_easy": 2376 * 4, "arc_challenge": 1172 * 4, "social_iqa": 1954 * 3, "boolq": 3270 * 2}
# WikiText-2 test (lm-eval's wikitext: 62 documents): 245,569 words (Merity et al. 2016, Table 1).
WIKITEXT_WORDS = 245_569


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")) if len(s.split()) >= 9]


def write_tasks(corpus: Path, n_docs: int, root: Path, seed: int = 0) -> tuple[Path, dict]:
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()][-n_docs:]
    rng = random.Random(seed)
    pool = [s for d in docs for s in sentences(d)]
    mc = []
    for d in docs:
        sent = sentences(d)
        if not sent:
            continue
        words = sent[0].split()
        cut = 2 * len(words) // 3
        wrong = []
        while len(wrong) < 3:
            other = rng.choice(pool).split()
            ending = " ".join(other[2 * len(other) // 3:])
            if ending != " ".join(words[cut:]) and ending not in wrong:
                wrong.append(ending)
        choices = [" ".join(words[cut:])] + wrong
        rng.shuffle(choices)
        mc.append({"ctx": " ".join(words[:cut]), "choices": choices, "gold": choices.index(" ".join(words[cut:]))})
    root.mkdir(parents=True, exist_ok=True)
    (root / "cloze.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mc))
    (root / "wiki.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "standin_cloze.yaml").write_text(
        f"task: standin_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{ctx}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (root / "standin_wiki.yaml").write_text(
        f"task: standin_wiki\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'wiki.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return root, {"mc_requests": 4 * len(mc), "docs": docs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--corpus", default="data/demo/corpus.jsonl")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None,
                        help="lm-eval's window in tokens (default: each export's trained seq_len)")
    parser.add_argument("--workdir", default="/tmp/bench_lm_eval")
    args = parser.parse_args()
    from nl.lm_eval import main as lm_eval_main
    from nl.tokenizer import Tokenizer

    tasks, info = write_tasks(Path(args.corpus), args.docs, Path(args.workdir) / "tasks")
    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
          f"torch threads {__import__('torch').get_num_threads()} | batch {args.batch_size} | "
          f"{info['mc_requests']} cloze requests, {len(info['docs'])} documents\n")
    rows = []
    for model in args.models:
        cfg = json.loads((Path(model) / "config.json").read_text())
        tok = Tokenizer(Path(model) / "tokenizer.model")
        seq_len = args.max_length or int(cfg["seq_len"])  # lm-eval's window
        # lm-eval's rolling windows: each predicts up to seq_len tokens; the first token from EOS
        windows = sum(math.ceil(len(tok.encode(d)) / seq_len) for d in info["docs"])
        doc_tokens = sum(len(tok.encode(d)) for d in info["docs"])
        doc_words = sum(len(d.split()) for d in info["docs"])
        timing, results = {}, {}
        for task in ("standin_cloze", "standin_wiki"):
            start = time.perf_counter()
            out = lm_eval_main(["--model", model, "--tasks", task, "--include-path", str(tasks),
                                "--batch-size", str(args.batch_size), "--max-length", str(seq_len), "--output",
                                str(Path(args.workdir) / f"{Path(model).parent.parent.name}_{task}.json")])
            timing[task] = time.perf_counter() - start  # model load included: small against the run
            results.update(out["metrics"])
        per_mc = timing["standin_cloze"] / info["mc_requests"]
        per_window = timing["standin_wiki"] / windows
        wiki_windows = WIKITEXT_WORDS * doc_tokens / doc_words / seq_len  # tokens per word of this tokenizer
        estimate = per_mc * sum(PAPER_REQUESTS.values()) + per_window * wiki_windows
        rows.append((model, cfg["model"]["arch"], seq_len, per_mc, per_window, results, estimate,
                     sum(PAPER_REQUESTS.values()), wiki_windows))
    print("| model | arch | window | s / MC request | s / rolling window | cloze acc | cloze acc_norm | "
          "wiki word ppl | ESTIMATE, full paper set |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, arch, seq_len, per_mc, per_window, res, est, n_req, n_win in rows:
        print(f"| {model} | {arch} | {seq_len} | {per_mc * 1e3:.1f} ms | {per_window * 1e3:.1f} ms | "
              f"{100 * res['standin_cloze']['acc']:.1f} | {100 * res['standin_cloze']['acc_norm']:.1f} | "
              f"{res['standin_wiki']['word_perplexity']:.1f} | {est / 60:.0f} min "
              f"({n_req:,} requests + {n_win:,.0f} WikiText windows) |")


if __name__ == "__main__":
    main()
