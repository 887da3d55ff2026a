"""Needle-in-a-haystack accuracy of an exported model at chosen context lengths and depths (RULER-style).

    python -m nl.niah --model EXPORT_DIR --lengths 1024 4096 16384 --haystack essays.txt more/ \\
        [--depths 0 0.25 0.5 0.75 1] [--samples 10] [--tasks niah_single_1 ...] [--seed 0]

Tasks (RULER's S-NIAH-1/2/3 and MK-NIAH-1, plus a word-valued single needle):

    niah_single_1     noise haystack, one needle, 7-digit number value
    niah_single_2     prose haystack, one needle, 7-digit number value
    niah_single_3     prose haystack, one needle, uuid value
    niah_single_word  prose haystack, one needle, adjective-noun word value
    niah_multikey_1   prose haystack, 4 needles with distinct keys, number values, one asked

The noise haystack repeats "The grass is green. The sky is blue. ..." and needs no file; the
prose haystack is the sentences of the --haystack files (.txt/.jsonl/folders, nl.text's policy).
A prompt is RULER's: an instruction, the haystack with the needle sentences ("One of the special
magic numbers for KEY is: VALUE.") between two of its sentences, the question and the answer
prefix. It is assembled from token ids (each sentence encoded by the model's tokenizer on its
own), so a prompt is exactly LENGTH tokens; the asked needle sits at the sentence boundary
nearest DEPTH x the haystack's tokens (0 = first, 1 = last; multikey: the other needles at
random boundaries). Decoding is greedy (nl.generate.sample, stopping at EOS) for the value's
token count + 8 tokens (room for ": " and the like); a sample is correct when the generated text
contains the value (RULER's string match, case-insensitive). Every sample is drawn from its own
seeded stream (seed, task, length, depth, index), so a run is deterministic given --seed.

Prints one markdown accuracy table (length x depth) per task, then one JSON line. Position
budget: a model that reads positions through RoPE (Transformer++, HOPE with mixer=attention) is
trusted up to its trained seq_len; a prompt running past it gets a warning naming the length and
runs anyway (the rotation is defined at every position; accuracy is what it measures). HOPE's
recurrent mixers have no position budget. User mistakes end in one line `error: ...`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nl.cli import UsageError, one_line_errors, parse_device

NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ANSWER_SLACK = 8  # decoded tokens beyond the value's own count: the model may first emit ": " or "is"
ADJECTIVES = ("amber", "bitter", "brave", "calm", "clever", "cold", "crimson", "curious", "damp", "eager",
              "faint", "fierce", "fragile", "gentle", "gloomy", "golden", "hollow", "humble", "icy", "jolly",
              "lively", "lonely", "loud", "lucky", "mellow", "misty", "narrow", "noble", "odd", "pale",
              "proud", "quiet", "rapid", "rusty", "silent", "sleepy", "smooth", "sour", "swift", "tender",
              "tidy", "vast", "violet", "wicked", "wild", "wise", "witty", "young")
NOUNS = ("anchor", "badger", "banjo", "beacon", "bucket", "canyon", "castle", "cobra", "comet", "cricket",
         "dragon", "falcon", "feather", "garden", "glacier", "harbor", "hammer", "island", "jungle", "kettle",
         "ladder", "lantern", "meadow", "mirror", "monkey", "needle", "orchid", "otter", "parrot", "pebble",
         "pepper", "pillow", "planet", "puzzle", "rabbit", "ribbon", "saddle", "salmon", "spider", "teapot",
         "thunder", "tiger", "tractor", "tunnel", "violin", "walrus", "window", "wizard")
VALUE_NAMES = {"number": "numbers", "word": "words", "uuid": "uuids"}


@dataclass(frozen=True)
class Task:
    haystack: str  # "noise" | "prose"
    value: str  # "number" | "word" | "uuid"
    needles: int  # key/value needles in the haystack; one of them is asked

    def describe(self) -> str:
        return f"{self.haystack} haystack, {self.value} value, {self.needles} needle{'s' * (self.needles > 1)}"


TASKS = {
    "niah_single_1": Task("noise", "number", 1),
    "niah_single_2": Task("prose", "number", 1),
    "niah_single_3": Task("prose", "uuid", 1),
    "niah_single_word": Task("prose", "word", 1),
    "niah_multikey_1": Task("prose", "number", 4),
}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Sample:
    """One prompt: ids [length] (python ints), the asked key and its value; needle_start is the index
    in ids of the asked needle's first token."""

    task: str
    length: int
    depth: float
    key: str
    value: str
    ids: list[int]
    needle_start: int


class Haystack:
    """A haystack as token-id sentences; take(n) gives n tokens of it and the sentence boundaries.

    noise: the sentences repeat from the first (RULER's repeated noise). prose: a run of consecutive
    sentences from a random start (the caller checks that `tokens` >= n)."""

    def __init__(self, name: str, sentences: list[list[int]], repeat: bool):
        if not sentences:
            raise UsageError(f"the {name} haystack has no sentences: pass --haystack files with text in them")
        self.name, self.sentences, self.repeat = name, sentences, repeat
        self.tokens = sum(len(s) for s in sentences)

    def take(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """(n token ids, sorted boundaries in [0, n] between whole sentences, 0 and n included);
        the last sentence is cut at n tokens. A prose run starts at a sentence among those that
        begin within the text's first n tokens and leave n tokens after them, so the draw depends
        on n and the text's start only (not on how much of the text was read: see prose_haystack)."""
        start = 0
        if not self.repeat:
            candidates, offset = [], 0
            for i, s in enumerate(self.sentences):
                if offset > n or self.tokens - offset < n:
                    break
                candidates.append(i)
                offset += len(s)
            start = rng.choice(candidates)
        tokens, bounds, i = [], [0], start
        while len(tokens) < n:
            tokens.extend(self.sentences[i % len(self.sentences)])
            i += 1
            bounds.append(min(len(tokens), n))
        return tokens[:n], sorted(set(bounds))


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: split after . ! ? followed by whitespace, and at line breaks."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def prose_haystack(paths: list[str], tokenizer, max_tokens: int, strict: bool = False,
                   text_field: str = "text") -> Haystack:
    """The sentences of the documents of `paths`, each encoded on its own, read until max_tokens
    (at least 2x the longest prompt: prompts of n tokens start within the first n). text_field: the .jsonl
    key / .parquet column of the text."""
    from nl.data.sources import iter_documents

    sentences, total = [], 0
    for doc in iter_documents(paths, text_field, strict=strict):
        for sentence in split_sentences(doc):
            ids = tokenizer.encode(sentence)
            sentences.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    return Haystack("prose", sentences, repeat=False)


def noise_haystack(tokenizer) -> Haystack:
    return Haystack("noise", [tokenizer.encode(s) for s in NOISE], repeat=True)


def draw_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return draw_word(rng)


def draw_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def build_sample(tokenizer, task_name: str, length: int, depth: float, index: int, seed: int,
                 haystack: Haystack) -> Sample:
    """The index-th prompt of task_name at (length, depth): exactly `length` token ids.

    Raises UsageError when the instruction, needles and question leave no room for a haystack."""
    task = TASKS[task_name]
    rng = random.Random(f"{seed}:{task_name}:{length}:{depth!r}:{index}")  # str seeds hash with sha512: stable
    kind = VALUE_NAMES[task.value]
    keys: list[str] = []
    while len(keys) < task.needles:
        key = draw_word(rng)
        if key not in keys:
            keys.append(key)
    values: list[str] = []  # distinct, and no word value equal to a key (the question would give it away)
    while len(values) < len(keys):
        value = draw_value(task.value, rng)
        if value not in keys and value not in values:
            values.append(value)
    asked = rng.randrange(task.needles)
    prefix = tokenizer.encode(f"Some special magic {kind} are hidden within the following text. "
                              f"Make sure to memorize it. I will quiz you about the {kind} afterwards.")
    needles = [tokenizer.encode(f"One of the special magic {kind} for {k} is: {v}.") for k, v in zip(keys, values)]
    question = tokenizer.encode(f"What are all the special magic {kind} for {keys[asked]} mentioned in the "
                                f"provided text? The special magic {kind} for {keys[asked]} mentioned in the "
                                f"provided text are")
    fixed = len(prefix) + sum(map(len, needles)) + len(question)
    n = length - fixed
    if n < 1:
        raise UsageError(f"--lengths {length} is too short for {task_name}: its instruction, needles and question "
                         f"take {fixed} tokens; pass lengths > {fixed}")
    if not haystack.repeat and haystack.tokens < n:
        raise UsageError(f"the --haystack text holds {haystack.tokens} tokens, fewer than the {n} a {length}-token "
                         f"{task_name} prompt needs: pass more text, a smaller length, or --tasks niah_single_1 "
                         f"(noise haystack)")
    hay, bounds = haystack.take(n, rng)
    # The asked needle at the boundary nearest depth * n; the others at random boundaries.
    at = [min(bounds, key=lambda b: abs(b - depth * n)) if i == asked else rng.choice(bounds)
          for i in range(task.needles)]
    ids, done = list(prefix), 0
    needle_start = -1
    for i in sorted(range(task.needles), key=lambda i: (at[i], i)):
        ids.extend(hay[done:at[i]])
        done = at[i]
        if i == asked:
            needle_start = len(ids)
        ids.extend(needles[i])
    ids.extend(hay[done:])
    ids.extend(question)
    assert len(ids) == length
    return Sample(task_name, length, depth, keys[asked], values[asked], ids, needle_start)


Generate = Callable[[torch.Tensor, int], torch.Tensor]


def greedy_generate(model: nn.Module, eos_id: int) -> Generate:
    """prompts [B, T] int64, max_new_tokens -> the new tokens [B, n] (greedy, stopping at EOS)."""
    from nl.generate import sample

    def generate(prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return sample(model, prompts, max_new_tokens, temperature=0.0, eos_id=eos_id)[:, prompts.shape[1]:]

    return generate


def position_budget(model_cfg: dict, seq_len: int) -> int | None:
    """Positions a model is trusted at: the trained seq_len for RoPE readers (Transformer++, HOPE with
    mixer=attention), None (unbounded) for HOPE's recurrent mixers."""
    if model_cfg.get("arch") == "transformer" or model_cfg.get("hope", {}).get("mixer") == "attention":
        return seq_len
    return None


def run_niah(generate: Generate, tokenizer, lengths: Iterable[int], depths: Iterable[float] = DEFAULT_DEPTHS,
             tasks: Iterable[str] = tuple(TASKS), samples: int = 10, seed: int = 0,
             haystack_paths: list[str] | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
             strict_text: bool = False, budget: int | None = None, model_name: str = "",
             text_field: str = "text") -> dict:
    """Accuracy of `generate` on every task at every (length, depth), `samples` prompts each.

    generate(prompts [B, L] int64 on device, max_new_tokens) -> new tokens [B, n] (int64; n may
    be < max_new_tokens; tokens after an EOS are ignored). budget: the position budget
    (`position_budget`); a length whose prompt and answer run past it gets a warning.
    Returns {"tasks": {task: {"accuracy", "by_length", "by_length_depth", "describe"}}, ...};
    accuracies are fractions in [0, 1], keys of lengths and depths are strings. Raises UsageError
    for bad input (unknown task, length <= 0 or too short, depth outside [0, 1], too little text)."""
    from tqdm import tqdm

    from nl.text import warn

    lengths, depths, tasks = [int(x) for x in lengths], [float(d) for d in depths], list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UsageError(f"unknown task {unknown[0]!r}: pass --tasks from {', '.join(TASKS)}")
    if not lengths or min(lengths) <= 0:
        raise UsageError(f"--lengths must be positive token counts, got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise UsageError(f"--depths must be fractions in [0, 1], got {depths}")
    if samples < 1 or batch_size < 1:
        raise UsageError(f"--samples and --batch-size must be >= 1, got {samples} and {batch_size}")
    needs_prose = [t for t in tasks if TASKS[t].haystack == "prose"]
    if needs_prose and not haystack_paths:
        raise UsageError(f"{needs_prose[0]} needs a prose haystack: pass --haystack FILE..., or --tasks "
                         f"niah_single_1 (noise haystack, no file)")
    haystacks = {"noise": noise_haystack(tokenizer)}
    if needs_prose:
        haystacks["prose"] = prose_haystack(haystack_paths, tokenizer, 2 * max(lengths), strict_text, text_field)

    # Every prompt is built (and every input error raised) before the model runs.
    plan = {(t, L, d): [build_sample(tokenizer, t, L, d, i, seed, haystacks[TASKS[t].haystack])
                        for i in range(samples)] for t in tasks for L in lengths for d in depths}
    answer_tokens = {t: 0 for t in tasks}  # per task: its longest value's tokens + ANSWER_SLACK
    for (t, _, _), group in plan.items():
        for s in group:
            answer_tokens[t] = max(answer_tokens[t], len(tokenizer.encode(s.value)) + ANSWER_SLACK)
    if budget is not None:
        for L in lengths:
            used = L + max(answer_tokens.values())
            if used > budget:
                warn(f"length {L} (+ up to {used - L} answer tokens) is past this model's position budget, its "
                     f"trained seq_len {budget}: RoPE positions beyond training are extrapolated")

    eos = tokenizer.eos_id
    out: dict = {"model": model_name, "seed": seed, "samples": samples, "lengths": lengths, "depths": depths,
                 "tasks": {}}
    # A bar on stderr only when it is a terminal (tqdm's disable=None): a 16K prompt decodes in seconds to minutes.
    progress = tqdm(total=sum(len(g) for g in plan.values()), desc="niah", unit="prompt", disable=None)
    for t in tasks:
        correct: dict[tuple[int, float], int] = {}
        for L in lengths:
            group = [s for d in depths for s in plan[(t, L, d)]]
            for b in range(0, len(group), batch_size):
                batch = group[b:b + batch_size]
                prompts = torch.tensor([s.ids for s in batch], dtype=torch.long, device=device)
                new = generate(prompts, answer_tokens[t]).tolist()
                progress.update(len(batch))
                for s, row in zip(batch, new):
                    row = row[:row.index(eos)] if eos in row else row
                    hit = s.value.lower() in tokenizer.decode(row).lower()
                    correct[(L, s.depth)] = correct.get((L, s.depth), 0) + int(hit)
        by_ld = {str(L): {str(d): correct[(L, d)] / samples for d in depths} for L in lengths}
        out["tasks"][t] = {
            "describe": TASKS[t].describe(),
            "accuracy": sum(correct.values()) / (samples * len(lengths) * len(depths)),
            "by_length": {str(L): sum(correct[(L, d)] for d in depths) / (samples * len(depths)) for L in lengths},
            "by_length_depth": by_ld,
        }
    progress.close()
    out["mean_accuracy"] = sum(r["accuracy"] for r in out["tasks"].values()) / len(tasks)
    return out


def markdown_tables(result: dict) -> str:
    """One markdown table per task: a row per length, a column per depth, then the row mean."""
    parts = []
    for t, r in result["tasks"].items():
        depths = [str(d) for d in result["depths"]]
        lines = [f"### {t} ({r['describe']}; accuracy {r['accuracy']:.3f})", "",
                 "| length | " + " | ".join(f"depth {d}" for d in depths) + " | mean |",
                 "|---:|" + "---:|" * (len(depths) + 1)]
        for L, row in r["by_length_depth"].items():
            lines.append(f"| {L} | " + " | ".join(f"{row[d]:.2f}" for d in depths) + f" | {r['by_length'][L]:.2f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


@one_line_errors()
def main(argv: list[str] | None = None) -> dict:
    from nl.export import load_export_config, load_pretrained
    from nl.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a directory written by `python -m nl.export`")
    ap.add_argument("--lengths", required=True, nargs="+", type=int, help="prompt lengths in tokens")
    ap.add_argument("--haystack", nargs="+", default=[], help="prose: .txt/.jsonl files or folders of them")
    ap.add_argument("--text-field", default="text", help="the haystack's .jsonl key / .parquet column (default: text)")
    ap.add_argument("--depths", nargs="+", type=float, default=list(DEFAULT_DEPTHS),
                    help="where the asked needle sits, as a fraction of the haystack (default 0 0.25 0.5 0.75 1)")
    ap.add_argument("--samples", type=int, default=10, help="prompts per task, length and depth (default 10)")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help=f"from {', '.join(TASKS)} (default: all; without --haystack: niah_single_1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default="", help="also write the JSON to this file")
    ap.add_argument("--strict-text", action="store_true",
                    help="refuse haystack text that is not valid UTF-8 instead of replacing it with U+FFFD")
    args = ap.parse_args(argv)
    tasks = args.tasks or (list(TASKS) if args.haystack else ["niah_single_1"])
    device = parse_device(args.device)
    meta = load_export_config(args.model)
    tokenizer = Tokenizer(Path(args.model) / "tokenizer.model")
    model = load_pretrained(args.model, device=device)
    result = run_niah(greedy_generate(model, tokenizer.eos_id), tokenizer, args.lengths, args.depths, tasks,
                      args.samples, args.seed, args.haystack, args.batch_size, device, args.strict_text,
                      budget=position_budget(meta.get("model", {}), int(meta.get("seq_len", 0))),
                      model_name=str(args.model), text_field=args.text_field)
    print(markdown_tables(result))
    print()
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
