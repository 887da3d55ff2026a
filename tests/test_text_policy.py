"""Hostile input through every entry point that reads user text, and --overwrite's ownership rule.

The decoding policy (nl/text.py, README "Training on your own data"): a UTF-8 BOM is dropped;
bytes that are not UTF-8 and lone UTF-16 surrogates become U+FFFD with a warning naming file and
line, or are refused with --strict-text; files an input folder skips are listed. Each case runs
through train_tokenizer, tokenize_corpus, nl.evaluate (raw text) and nl.generate (prompt), and
the expected result is the same entry point run on the text as the policy says it should read.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script
from nl.data.shards import DataError, TokenShards
from nl.tokenizer import Tokenizer

sys.path.insert(0, str(REPO))
from data_prep.tokenize_corpus import _encode_batch, _init_worker, tokenize_corpus  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402

BOM = b"\xef\xbb\xbf"
VOCAB = 300  # the smallest useful: 256 byte pieces + unk/bos/eos + a few merges


def documents(n: int, seed: int = 0) -> list[str]:
    """Small made-up documents of made-up words (what the tokenizer learns does not matter here)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(200)]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(4)) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_stream(token_dir: Path) -> np.ndarray:
    """The whole token stream (tokenized with --val-fraction 0: all train)."""
    m = json.loads((token_dir / "manifest.json").read_text())
    return np.concatenate([np.fromfile(token_dir / s["file"], dtype=m["dtype"]) for s in m["splits"]["train"]["shards"]])


def tokenize(inputs: list[Path], tokenizer: Path, out: Path, **kwargs) -> np.ndarray:
    tokenize_corpus([str(p) for p in inputs], tokenizer, out, val_fraction=0, num_workers=1, progress=False, **kwargs)
    return train_stream(out)


def vocabulary(inputs: list[Path], out: Path, **kwargs) -> list[tuple[str, float]]:
    """Train a tokenizer on `inputs`: its (piece, score) list (the file itself also records its path)."""
    import sentencepiece as spm

    train_tokenizer([str(p) for p in inputs], VOCAB, out, **kwargs)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def user_error(fn) -> str:
    """The one-line message of a user error raised by fn(): a DataError, or the SystemExit of a CLI main."""
    with pytest.raises((DataError, SystemExit)) as info:
        fn()
    message = str(info.value.code if isinstance(info.value, SystemExit) else info.value)
    assert "\n" not in message
    return message


def warnings_in(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A 300-piece tokenizer and a tiny random Transformer++ exported next to it (config.json,
    model.safetensors, tokenizer.model: the format nl.export writes)."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_model

    from nl.config import load_config
    from nl.models import build_model

    root = tmp_path_factory.mktemp("text_policy")
    corpus = write_jsonl(root / "train.jsonl", documents(40))
    tok = root / "tok.model"
    train_tokenizer([str(corpus)], VOCAB, tok)
    cfg = load_config("configs/tiny.yaml", [f"model.vocab_size={VOCAB}", "model.dim=32", "model.n_layers=1",
                                            "model.n_heads=2", "model.arch=transformer"]).model
    export = root / "export"
    export.mkdir()
    with torch.random.fork_rng():
        save_model(build_model(cfg, seed=0), str(export / "model.safetensors"))
    (export / "tokenizer.model").write_bytes(tok.read_bytes())
    (export / "config.json").write_text(json.dumps({
        # seq_len: the trained context it claims, past which nl.generate warns (prompts here are not about that)
        "format_version": 1, "model": OmegaConf.to_container(cfg), "seq_len": 256, "step": 0,
        "tokenizer_fingerprint": Tokenizer(tok).fingerprint}))
    return {"tok": tok, "export": export}


def evaluate(env: dict, *data: Path, strict: bool = False) -> dict:
    from nl.evaluate import main

    result = main(["--model", str(env["export"]), "--data", *map(str, data), "--seq-len", "8", "--batch-size", "4",
                   *(["--strict-text"] if strict else [])])
    return {k: v for k, v in result.items() if k != "data"}


def generate(env: dict, prompt: str, strict: bool = False) -> str:
    from nl.generate import main

    return main(["--model", str(env["export"]), "--prompt", prompt, "--max-new-tokens", "4", "--temperature", "0",
                 *(["--strict-text"] if strict else [])])


# ---- --overwrite deletes only what tokenize_corpus made ----------------------------------------------


def test_overwrite_refuses_a_folder_of_text_and_leaves_it_untouched(env, tmp_path):
    corpus = tmp_path / "my_texts"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(documents(1)[0])
    write_jsonl(corpus / "b.jsonl", documents(2, seed=1))
    (corpus / "sub" / "c.txt").write_text("nested")
    before = snapshot(corpus)
    # The command train.py's old error suggested: the text folder as its own --output, with --overwrite.
    for inputs in ([str(corpus)], [str(corpus / "a.txt")]):
        proc = run_script("data_prep/tokenize_corpus.py", "--input", *inputs, "--tokenizer", str(env["tok"]),
                          "--output", str(corpus), "--overwrite", "--num-workers", "1", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"error: --output {corpus} is not a token directory (no valid manifest.json; it holds a.txt, b.jsonl, "
            f"sub): --overwrite only replaces a token directory written by tokenize_corpus: choose a new or empty "
            f"--output (nothing was changed in {corpus})"]
        assert snapshot(corpus) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_texts"]  # no temp dir left beside it


def test_overwrite_replaces_only_a_token_directory_with_nothing_foreign(env, tmp_path):
    docs = write_jsonl(tmp_path / "docs.jsonl", documents(3))
    out = tmp_path / "tokens"
    tokenize([docs], env["tok"], out)
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(DataError, match=r"holds files its manifest.json does not list \(notes.txt\): "
                                        r"--overwrite only replaces .* or move those files away"):
        tokenize([docs], env["tok"], out, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append({"file": "notes.txt", "num_tokens": 0, "sha256": ""})
    (out / "manifest.json").write_text(json.dumps(manifest))  # a manifest cannot vouch for other files
    with pytest.raises(DataError, match=r"does not list \(notes.txt\)"):
        tokenize([docs], env["tok"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes"

    (out / "notes.txt").unlink()
    manifest["splits"]["train"]["shards"].pop()
    (out / "manifest.json").write_text(json.dumps(manifest))
    one_doc = write_jsonl(tmp_path / "one.jsonl", documents(1))
    stream = tokenize([one_doc], env["tok"], out, overwrite=True)  # our own directory: replaced
    tok = Tokenizer(env["tok"])
    assert stream.tolist() == tok.encode(documents(1)[0]) + [tok.eos_id]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "one.jsonl", "tokens"]


def test_a_data_dir_of_raw_text_suggests_a_new_token_directory_never_overwrite(env, tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "a.txt").write_text(documents(1)[0])
    with pytest.raises(DataError) as info:
        TokenShards(corpus)
    message = str(info.value)
    assert "--overwrite" not in message and "\n" not in message
    assert f"it holds text (e.g. a.txt), not tokens" in message
    assert f"--input {corpus} --tokenizer tokenizer.model --output {tmp_path / 'texts_tokens'}`" in message
    # The suggested command works and leaves the text alone.
    tokenize([corpus], env["tok"], tmp_path / "texts_tokens")
    assert TokenShards(tmp_path / "texts_tokens").num_tokens > 0 and (corpus / "a.txt").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"not a token directory: create one with .* --output {empty}`$"):
        TokenShards(empty)


# ---- one decoding policy -----------------------------------------------------------------------------


def test_a_bom_is_dropped_by_every_entry_point(env, tmp_path, capsys):
    text, records = documents(1, seed=2)[0], documents(2, seed=3)
    clean_txt, bom_txt = tmp_path / "clean.txt", tmp_path / "bom.txt"
    clean_txt.write_bytes(text.encode())
    bom_txt.write_bytes(BOM + text.encode())
    clean_jsonl = write_jsonl(tmp_path / "clean.jsonl", records)
    bom_jsonl = write_jsonl(tmp_path / "bom.jsonl", records, prefix=BOM)  # was "invalid JSON at line 1"
    clean, bom = [clean_txt, clean_jsonl], [bom_txt, bom_jsonl]

    assert vocabulary(bom, tmp_path / "b.model") == vocabulary(clean, tmp_path / "c.model")
    tok = Tokenizer(env["tok"])
    expected = [i for t in [text, *records] for i in tok.encode(t) + [tok.eos_id]]  # no 4 junk tokens
    assert tokenize(bom, env["tok"], tmp_path / "b_tokens").tolist() == expected
    assert evaluate(env, *bom) == evaluate(env, *clean)
    assert generate(env, "\ufeffabc def") == generate(env, "abc def")
    assert warnings_in(capsys) == []  # a BOM is not damage


def test_a_lone_surrogate_in_jsonl_is_replaced_with_a_warning_or_refused(env, tmp_path, capsys):
    docs = documents(3, seed=4)
    hostile = tmp_path / "hostile.jsonl"  # record 2 ends in "\ud83d", the first half of a cut-off emoji
    write_jsonl(hostile, [docs[0], docs[1] + " \ud83d", docs[2]])
    assert "\\ud83d" in hostile.read_text()
    repaired = write_jsonl(tmp_path / "repaired.jsonl", [docs[0], docs[1] + " \ufffd", docs[2]])
    warning = (f"warning: {hostile}: replaced text that is not valid UTF-8 (undecodable bytes or lone surrogates) "
               f"with U+FFFD on line 2; pass --strict-text to refuse it")
    refusal = f"{hostile}:2 holds U+D83D, a lone UTF-16 surrogate"

    # tokenize_corpus, as a command with worker processes (it used to end in a worker's traceback)
    args = ("data_prep/tokenize_corpus.py", "--input", str(hostile), "--tokenizer", str(env["tok"]),
            "--val-fraction", "0", "--num-workers", "2")
    proc = run_script(*args, "--output", str(tmp_path / "h_tokens"))
    assert warning in proc.stderr.splitlines()
    assert np.array_equal(train_stream(tmp_path / "h_tokens"), tokenize([repaired], env["tok"], tmp_path / "r_tokens"))
    proc = run_script(*args, "--output", str(tmp_path / "s_tokens"), "--strict-text", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and f"error: {refusal}" in proc.stderr
    assert not (tmp_path / "s_tokens").exists()

    # train_tokenizer (it used to blame the vocabulary size)
    capsys.readouterr()
    assert vocabulary([hostile], tmp_path / "h.model") == vocabulary([repaired], tmp_path / "r.model")
    assert warnings_in(capsys) == [warning]
    message = user_error(lambda: vocabulary([hostile], tmp_path / "s.model", strict_text=True))
    assert message.startswith(refusal) and "vocab" not in message
    assert not (tmp_path / "s.model").exists()  # no model of the text before the error is left behind

    # nl.evaluate on raw text
    assert evaluate(env, hostile) == evaluate(env, repaired)
    assert warnings_in(capsys) == [warning]
    assert refusal in user_error(lambda: evaluate(env, hostile, strict=True))

    # nl.generate's prompt: the same escape decoded by a JSON-speaking caller
    prompt = json.loads('"abc \\ud83d def"')
    assert generate(env, prompt) == generate(env, "abc \ufffd def")
    assert warnings_in(capsys) == ["warning: --prompt: replaced text that is not valid UTF-8 (undecodable bytes "
                                   "or lone surrogates) with U+FFFD on line 1; pass --strict-text to refuse it"]
    assert "--prompt:1 holds U+D83D, a lone UTF-16 surrogate" in user_error(lambda: generate(env, prompt, strict=True))


def test_undecodable_bytes_are_replaced_with_a_warning_naming_the_lines_or_refused(env, tmp_path, capsys):
    docs = documents(3, seed=5)
    hostile, repaired = tmp_path / "latin1.txt", tmp_path / "repaired.txt"
    # Latin-1 "é" (0xE9) on line 1, a lone 0xFF on line 3.
    hostile.write_bytes(docs[0].encode() + b" caf\xe9\n" + docs[1].encode() + b"\n\xff " + docs[2].encode())
    repaired.write_text(docs[0] + " caf\ufffd\n" + docs[1] + "\n\ufffd " + docs[2])
    line3 = 1 + docs[0].count("\n") + 1 + docs[1].count("\n") + 1
    line1 = 1 + docs[0].count("\n")
    warning = (f"warning: {hostile}: replaced text that is not valid UTF-8 (undecodable bytes or lone surrogates) "
               f"with U+FFFD on lines {line1}, {line3}; pass --strict-text to refuse it")
    refusal = f"{hostile}:{line1} is not valid UTF-8 (byte 0xE9 at byte "

    assert np.array_equal(tokenize([hostile], env["tok"], tmp_path / "h"), tokenize([repaired], env["tok"], tmp_path / "r"))
    assert warnings_in(capsys) == [warning]
    assert user_error(lambda: tokenize([hostile], env["tok"], tmp_path / "s", strict_text=True)).startswith(refusal)

    assert vocabulary([hostile], tmp_path / "h.model") == vocabulary([repaired], tmp_path / "r.model")
    assert warnings_in(capsys) == [warning]
    assert user_error(lambda: vocabulary([hostile], tmp_path / "s.model", strict_text=True)).startswith(refusal)

    assert evaluate(env, hostile) == evaluate(env, repaired)
    assert warnings_in(capsys) == [warning]
    assert refusal in user_error(lambda: evaluate(env, hostile, strict=True))

    # A Latin-1 byte in a command line reaches sys.argv as U+DCE9 (PEP 383), which generate repairs.
    argv = subprocess.run([sys.executable, "-c", "import sys; print(ascii(sys.argv[1]))", b"caf\xe9 abc"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert argv == ascii("caf\udce9 abc")
    assert generate(env, "caf\udce9 abc") == generate(env, "caf\ufffd abc")
    assert warnings_in(capsys) == [warning.replace(str(hostile), "--prompt").replace(f"lines {line1}, {line3}", "line 1")]
    assert "--prompt:1 holds U+DCE9, a lone UTF-16 surrogate (standing for the byte 0xE9, which is not UTF-8)" \
        in user_error(lambda: generate(env, "caf\udce9 abc", strict=True))


def test_skipped_files_are_listed_in_one_warning_and_suffixes_match_in_any_case(env, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    text, record = documents(2, seed=6)
    (folder / "A.TXT").write_text(text)  # read: suffixes match case-insensitively
    write_jsonl(folder / "b.jsonl", [record])
    (folder / "data.csv").write_text("a,b\n")
    (folder / "notes.md").write_text("# notes")
    warning = f"warning: {folder}: skipped 2 files that are not .txt/.jsonl/.parquet: data.csv, notes.md"

    tok = Tokenizer(env["tok"])
    assert tokenize([folder], env["tok"], tmp_path / "t").tolist() == [
        i for t in (text, record) for i in tok.encode(t) + [tok.eos_id]]
    assert warnings_in(capsys) == [warning]
    assert train_tokenizer([str(folder)], VOCAB, tmp_path / "x.model")["documents"] == 2
    assert warnings_in(capsys) == [warning]
    assert evaluate(env, folder) == evaluate(env, folder / "A.TXT", folder / "b.jsonl")
    assert warnings_in(capsys) == [warning]


def test_utf16_files_are_refused_and_worker_errors_name_the_document(env, tmp_path):
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes("hello".encode("utf-16"))  # starts with the FF FE byte-order mark
    assert user_error(lambda: tokenize([utf16], env["tok"], tmp_path / "t")).startswith(
        f"{utf16} starts with a UTF-16/32 byte-order mark (FF FE): convert it to UTF-8")
    # A document that reaches an encoding worker unrepaired (only possible when bypassing the
    # readers) names its file and line instead of raising sentencepiece's binding error.
    _init_worker(str(env["tok"]), 0, 0.0)
    with pytest.raises(DataError, match=r"^x.jsonl:3: could not encode this document \(text holds U\+D83D at index 4"):
        _encode_batch((0, [("x.jsonl:1", "fine"), ("x.jsonl:3", "bad \ud83d")]))
