"""Needle-in-a-haystack (issue 13, item 3): prompts of exact length with the needle at each depth,
RULER's string-match scoring (a stub model that reads the needle scores 1.0), determinism, the
position-budget warning for RoPE models, and one-line errors from `python -m nl.niah`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nl.niah import NOISE, TASKS, build_sample, noise_haystack, prose_haystack, run_niah
from nl.tokenizer import Tokenizer
from test_train import small_cfg

# RULER's niah template (synthetic.yaml / niah.py), written out here from the benchmark, not the module.
INSTRUCTION = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {kind} afterwards.")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
QUESTION = ("What are all the special magic {kind} for {key} mentioned in the provided text? The special magic "
            "{kind} for {key} mentioned in the provided text are")
KIND = {"number": "numbers", "word": "words", "uuid": "uuids"}


@pytest.fixture(scope="module")
def tok(token_dir) -> Tokenizer:
    return Tokenizer(token_dir / "tokenizer.model")


def find(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


def needle_reader(tok: Tokenizer, pick_first: bool = False):
    """A stub `generate` that answers like a perfect model: it reads the asked key from the question
    and returns the value of that key's needle (pick_first: the first needle's, whatever was asked)."""
    def generate(prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        rows = []
        for ids in prompts.tolist():
            text = tok.decode(ids)
            key = re.search(r"special magic \w+ for (\S+) mentioned in the provided text\?", text).group(1)
            needle = r"special magic \w+ for (\S+) is: (\S+)\."
            found = dict(re.findall(needle, text))
            value = re.search(needle, text).group(2) if pick_first else found[key]
            new = tok.encode(f": {value}.")
            assert len(new) <= max_new_tokens  # the budget leaves room for the value
            rows.append(new + [tok.eos_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)
    return generate


def test_perfect_reader_scores_one_and_a_distracted_reader_does_not(tok, small_corpus):
    lengths, depths = [400, 900], [0.0, 0.5, 1.0]
    perfect = run_niah(needle_reader(tok), tok, lengths, depths, samples=3, haystack_paths=[str(small_corpus)],
                       batch_size=4)
    assert set(perfect["tasks"]) == set(TASKS)
    for task, r in perfect["tasks"].items():
        assert r["accuracy"] == 1.0, task
        assert r["by_length_depth"] == {str(L): {str(d): 1.0 for d in depths} for L in lengths}
    first = run_niah(needle_reader(tok, pick_first=True), tok, lengths, depths, samples=3,
                     tasks=["niah_multikey_1", "niah_single_2"], haystack_paths=[str(small_corpus)])
    assert first["tasks"]["niah_single_2"]["accuracy"] == 1.0  # one needle: the first is the asked one
    assert first["tasks"]["niah_multikey_1"]["accuracy"] < 0.7  # 4 keys: the first is asked ~1 time in 4
    silent = run_niah(lambda p, n: torch.full((p.shape[0], n), tok.eos_id), tok, [256], depths, samples=2,
                      tasks=["niah_single_1"])
    assert silent["mean_accuracy"] == 0.0


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_single_word"])
def test_exact_length_and_needle_at_each_depth(tok, small_corpus, task):
    spec = TASKS[task]
    hay = noise_haystack(tok) if spec.haystack == "noise" else prose_haystack([str(small_corpus)], tok, 10_000)
    kind = KIND[spec.value]
    corpus_text = "\n".join(json.loads(line)["text"] for line in small_corpus.read_text().splitlines())
    L = 2000
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = build_sample(tok, task, L, depth, 0, seed=0, haystack=hay)
        assert len(s.ids) == L
        # Counted with the model's tokenizer, the prompt's text is L tokens up to word-merge differences.
        assert abs(len(tok.encode(tok.decode(s.ids))) - L) <= 0.02 * L
        needle = tok.encode(NEEDLE.format(kind=kind, key=s.key, value=s.value))
        question = tok.encode(QUESTION.format(kind=kind, key=s.key))
        prefix = tok.encode(INSTRUCTION.format(kind=kind))
        assert find(s.ids, needle) == [s.needle_start]
        assert s.ids[:len(prefix)] == prefix and s.ids[-len(question):] == question
        n = L - len(prefix) - len(needle) - len(question)  # haystack tokens
        before = s.needle_start - len(prefix)
        if depth == 0.0:
            assert before == 0
        elif depth == 1.0:
            assert before == n
        elif spec.haystack == "noise":  # the nearest boundary between noise sentences
            assert abs(before - depth * n) <= max(len(tok.encode(x)) for x in NOISE) / 2
        else:  # a prose sentence boundary near depth * n
            assert abs(before - depth * n) <= 0.05 * n
            # Between sentences: after a sentence end, or after a line of the text (a title).
            tail = re.split(r"[.!?]\s", tok.decode(s.ids[:s.needle_start]) + " ")[-1].strip()
            assert tail == "" or tail + "\n" in corpus_text, tail


def test_prose_haystack_reads_the_text_field_it_is_given(tok, small_corpus, tmp_path):
    from nl.data.sources import DataError

    rows = [json.loads(line) for line in small_corpus.read_text().splitlines()]
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in rows))
    with pytest.raises(DataError, match="has no string field 'text' .*--text-field"):
        prose_haystack([str(body)], tok, 1000)
    assert prose_haystack([str(body)], tok, 1000, text_field="body").tokens >= 1000


def test_multikey_has_distinct_keys_and_one_asked(tok, small_corpus):
    hay = prose_haystack([str(small_corpus)], tok, 10_000)
    s = build_sample(tok, "niah_multikey_1", 1500, 0.5, 2, seed=1, haystack=hay)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", tok.decode(s.ids))
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    assert (s.key, s.value) in needles
    assert find(s.ids, tok.encode(NEEDLE.format(kind="numbers", key=s.key, value=s.value))) == [s.needle_start]


def test_samples_are_deterministic_given_the_seed(tok, small_corpus):
    hay = prose_haystack([str(small_corpus)], tok, 4000)
    a = [build_sample(tok, "niah_single_3", 1000, 0.5, i, seed=7, haystack=hay) for i in range(3)]
    b = [build_sample(tok, "niah_single_3", 1000, 0.5, i, seed=7, haystack=hay) for i in range(3)]
    c = [build_sample(tok, "niah_single_3", 1000, 0.5, i, seed=8, haystack=hay) for i in range(3)]
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.ids for x in a] != [x.ids for x in c]
    assert len({x.value for x in a}) == 3  # the samples of one cell differ from each other
    # A cell does not depend on how much text was read for longer prompts (other --lengths).
    more = prose_haystack([str(small_corpus)], tok, 40_000)
    assert more.tokens > 2 * hay.tokens
    assert [build_sample(tok, "niah_single_3", 1000, 0.5, i, seed=7, haystack=more).ids for i in range(3)] == \
        [x.ids for x in a]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a[0].value)


@pytest.fixture(scope="module")
def exports(token_dir, tmp_path_factory) -> dict:
    """Tiny Transformer++ and HOPE exports trained 2 steps (seq_len 32)."""
    from nl.export import export
    from nl.trainer import train

    root = tmp_path_factory.mktemp("niah")
    out = {}
    for arch in ("transformer", "hope"):
        run = root / f"run_{arch}"
        train(small_cfg(token_dir, run, "train.steps=2", "eval.every=0", "checkpoint.every=2", arch=arch))
        out[arch] = export(run, root / f"export_{arch}")
    return out


def run_cli(*args: str) -> dict:
    from nl.niah import main

    return main(list(args))


def test_cli_tables_json_and_rope_warning(exports, small_corpus, capsys, tmp_path):
    args = ("--lengths", "320", "400", "--depths", "0", "1", "--samples", "2", "--haystack", str(small_corpus),
            "--tasks", "niah_single_1", "niah_multikey_1", "--seed", "3")
    r = run_cli("--model", str(exports["transformer"]), *args, "--output", str(tmp_path / "r.json"))
    out, err = capsys.readouterr()
    assert "### niah_single_1" in out and "| 400 |" in out and "depth 1.0" in out
    assert json.loads(out.strip().splitlines()[-1]) == r == json.loads((tmp_path / "r.json").read_text())
    for t in ("niah_single_1", "niah_multikey_1"):
        cells = [v for row in r["tasks"][t]["by_length_depth"].values() for v in row.values()]
        assert len(cells) == 4 and all(0.0 <= v <= 1.0 for v in cells)
    # seq_len 32: both lengths are past the Transformer++'s trained positions, each named once.
    assert "warning: length 320 " in err and "warning: length 400 " in err and "seq_len 32" in err
    assert run_cli("--model", str(exports["transformer"]), *args) == r  # greedy and seeded: deterministic
    capsys.readouterr()
    # (the haystack's text under another .jsonl key, read with --text-field)
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": json.loads(line)["text"]}) + "\n"
                            for line in small_corpus.read_text().splitlines()))
    run_cli("--model", str(exports["hope"]), *[str(body) if a == str(small_corpus) else a for a in args],
            "--text-field", "body")
    assert "warning" not in capsys.readouterr().err  # recurrent memories: no position budget


def one_line_error(*args: str) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_input_is_one_line(exports, tmp_path, small_corpus):
    model = str(exports["hope"])
    assert "no config.json" in one_line_error("--model", str(tmp_path), "--lengths", "100")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("config.json", "tokenizer.model"):
        (incomplete / name).write_bytes((exports["hope"] / name).read_bytes())
    assert "model.safetensors" in one_line_error("--model", str(incomplete), "--lengths", "100")
    assert "positive" in one_line_error("--model", model, "--lengths", "100", "0")
    assert "too short" in one_line_error("--model", model, "--lengths", "20")
    assert "unknown task 'niah_x'" in one_line_error("--model", model, "--lengths", "100", "--tasks", "niah_x")
    assert "--haystack" in one_line_error("--model", model, "--lengths", "100", "--tasks", "niah_single_2")
    assert "[0, 1]" in one_line_error("--model", model, "--lengths", "100", "--depths", "1.5")
    short = tmp_path / "short.txt"
    short.write_text("A short text. It has two sentences.\n")
    msg = one_line_error("--model", model, "--lengths", "400", "--haystack", str(short), "--tasks", "niah_single_2")
    assert "400-token" in msg and "more text" in msg


def test_a_word_value_is_never_its_key(tok):
    """Keys and word values are both adjective-noun pairs: a value equal to the key would be answered
    by copying the question. Index 498 at seed 0 is the first such draw before values were redrawn."""
    hay = noise_haystack(tok)
    for i in range(490, 510):
        s = build_sample(tok, "niah_single_word", 300, 0.5, i, seed=0, haystack=hay)
        assert s.value != s.key and re.fullmatch(r"[a-z]+-[a-z]+", s.value)

