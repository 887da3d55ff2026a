"""Provenance and user-facing commands: a run owns its tokenizer (copy + fingerprint in the run
dir), export ships it whatever happened to the data directory since, resume refuses data of
another tokenizer; generation stops at EOS per sequence for every architecture; export,
evaluate and generate end user mistakes with one line; exported files are 0644."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, run_script
from nl.checkpoint import CheckpointError
from nl.config import load_config
from nl.data.shards import DataError
from nl.export import export
from nl.generate import sample
from nl.models import build_model
from test_train import small_cfg


def sp_fingerprint(path: Path) -> str:
    """sha256 of the serialized sentencepiece proto, computed here from sentencepiece itself."""
    import sentencepiece as spm

    return hashlib.sha256(spm.SentencePieceProcessor(model_file=str(path)).serialized_model_proto()).hexdigest()


@pytest.fixture(scope="module")
def other_token_dir(tmp_path_factory, small_corpus) -> Path:
    """Token shards of the same corpus under another 1,024-piece tokenizer (trained on less text)."""
    root = tmp_path_factory.mktemp("other")
    run_script("data_prep/train_tokenizer.py", "--input", str(small_corpus), "--vocab-size", "1024",
               "--output", str(root / "other.model"), "--max-chars", "200000")
    run_script("data_prep/tokenize_corpus.py", "--input", str(small_corpus), "--tokenizer", str(root / "other.model"),
               "--output", str(root / "tokens"), "--val-fraction", "0.05", "--num-workers", "1")
    return root / "tokens"


def train_on_copy(token_dir: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """Train 4 steps on a private copy of the token dir: (run dir, data dir) that tests may mutate."""
    from nl.trainer import train

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(token_dir, data)
    train(small_cfg(data, run, "train.steps=4", "eval.every=0", "checkpoint.every=2", *extra))
    return run, data


def replace_dir(target: Path, source: Path) -> None:
    shutil.rmtree(target)
    shutil.copytree(source, target)


# ------------------------------------------------------------------ provenance ----------

def test_run_records_its_tokenizer_and_export_works_without_the_data_dir(token_dir, tmp_path):
    run, data = train_on_copy(token_dir, tmp_path)
    original = sp_fingerprint(token_dir / "tokenizer.model")
    assert (run / "tokenizer.model").read_bytes() == (token_dir / "tokenizer.model").read_bytes()
    assert json.loads((run / "tokenizer.json").read_text())["fingerprint"] == original
    shutil.rmtree(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = elsewhere / "export"
    proc = subprocess.run([sys.executable, "-m", "nl.export", "--run", str(run), "--output", "export"],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sp_fingerprint(out / "tokenizer.model") == original
    assert json.loads((out / "config.json").read_text())["tokenizer_fingerprint"] == original


def test_export_ships_the_runs_tokenizer_after_the_data_dir_is_retokenized(token_dir, other_token_dir, tmp_path):
    run, data = train_on_copy(token_dir, tmp_path)
    replace_dir(data, other_token_dir)
    out = export(run, tmp_path / "export")
    assert sp_fingerprint(out / "tokenizer.model") == sp_fingerprint(token_dir / "tokenizer.model")
    assert sp_fingerprint(out / "tokenizer.model") != sp_fingerprint(other_token_dir / "tokenizer.model")


def test_resume_refuses_data_tokenized_with_another_tokenizer(token_dir, other_token_dir, tmp_path):
    from nl.trainer import train

    run, data = train_on_copy(token_dir, tmp_path)
    replace_dir(data, other_token_dir)  # same path, same vocabulary size, other tokenizer
    with pytest.raises((DataError, CheckpointError), match="tokenizer") as err:
        train(small_cfg(data, run, "train.steps=6", "eval.every=0", "checkpoint.every=2"))
    assert "\n" not in str(err.value)
    replace_dir(data, token_dir)  # the run's own data resumes
    assert train(small_cfg(data, run, "train.steps=6", "eval.every=0", "checkpoint.every=2"))["step"] == 6


def test_export_refuses_a_missing_or_altered_tokenizer_copy(token_dir, other_token_dir, tmp_path):
    run, _ = train_on_copy(token_dir, tmp_path)
    copy = run / "tokenizer.model"
    saved = copy.read_bytes()
    copy.unlink()
    with pytest.raises(DataError, match="missing"):
        export(run, tmp_path / "a")
    shutil.copyfile(other_token_dir / "tokenizer.model", copy)
    with pytest.raises(DataError, match="not the tokenizer run"):
        export(run, tmp_path / "b")
    with pytest.raises(DataError, match="not the tokenizer run"):  # --tokenizer must match the record too
        export(run, tmp_path / "c", tokenizer=other_token_dir / "tokenizer.model")
    repaired = export(run, tmp_path / "d", tokenizer=token_dir / "tokenizer.model")
    assert (repaired / "tokenizer.model").read_bytes() == saved


def test_run_without_a_tokenizer_record_exports_only_with_an_explicit_tokenizer(token_dir, tmp_path):
    run, _ = train_on_copy(token_dir, tmp_path)
    (run / "tokenizer.model").unlink()  # as a run started before runs recorded their tokenizer
    (run / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="--tokenizer"):
        export(run, tmp_path / "a")
    out = export(run, tmp_path / "b", tokenizer=token_dir / "tokenizer.model")
    assert sp_fingerprint(out / "tokenizer.model") == sp_fingerprint(token_dir / "tokenizer.model")


def test_exported_files_are_readable_by_group_and_others(token_dir, tmp_path):
    run, _ = train_on_copy(token_dir, tmp_path)
    old = os.umask(0o022)
    try:
        out = export(run, tmp_path / "export")
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert {"model.safetensors", "config.json", "tokenizer.model"} <= set(modes)
    # also the Hugging Face files and the Transformer++'s llama/ copy (tests/test_hf_export.py)
    assert modes == {name: 0o755 if (out / name).is_dir() else 0o644 for name in modes}


# ------------------------------------------------------------------ EOS ----------

ARCHS = {"transformer": ("configs/tiny.yaml", []),
         "hope": ("configs/hope_tiny.yaml", ["model.hope.chunk_size=4", "model.hope.memory_chunk_size=4"]),
         "hope-attention": ("configs/hope_tiny.yaml", ["model.hope.mixer=attention"])}


def bigram_model(arch: str, vocab: int, dim: int, nxt: dict[int, int]):
    """A tiny model of `arch` whose greedy next token after token t is nxt[t] (and 0 after others).

    Every residual branch's output projection (attention/mixer wo, SwiGLU/CMS w2) is zeroed, so each
    block is the identity and logits = output(norm(embed(last token))). Token t's embedding is the
    one-hot e_slot(t) and output row nxt[t] is e_slot(t): its logit is sqrt(dim), every other 0."""
    preset, extra = ARCHS[arch]
    cfg = load_config(preset, [f"model.vocab_size={vocab}", f"model.dim={dim}", "model.n_heads=2",
                               "model.n_layers=2", "model.tie_embeddings=false", *extra]).model
    model = build_model(cfg, seed=0).eval()
    assert len(nxt) < dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                p.zero_()
        model.tok_embeddings.weight.zero_()
        model.tok_embeddings.weight[:, 0] = 1.0  # tokens without a rule share slot 0 (all logits 0)
        model.output.weight.zero_()
        for slot, (t, n) in enumerate(nxt.items(), start=1):
            model.tok_embeddings.weight[t] = 0.0
            model.tok_embeddings.weight[t, slot] = 1.0
            model.output.weight[n, slot] = 1.0
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generation_stops_at_eos_per_sequence(arch):
    eos = 3
    # row 0: 5 -> 6 -> EOS; row 1: 9 -> 10 -> 11 -> 12 -> EOS; after EOS the model would go on with 7, 7, ...
    model = bigram_model(arch, vocab=40, dim=16, nxt={5: 6, 6: eos, 9: 10, 10: 11, 11: 12, 12: eos, eos: 7, 7: 7})
    prompt = torch.tensor([[1, 2, 5], [4, 8, 9]])
    stopped = sample(model, prompt, 10, temperature=0, eos_id=eos)
    # each row ends at its own EOS, padded with EOS; the batch stops when the last row has ended
    assert stopped.tolist() == [[1, 2, 5, 6, eos, eos, eos], [4, 8, 9, 10, 11, 12, eos]]
    assert sample(model, prompt, 6, temperature=0, eos_id=eos, stop_at_eos=False).tolist() == \
        [[1, 2, 5, 6, eos, 7, 7, 7, 7], [4, 8, 9, 10, 11, 12, eos, 7, 7]]
    assert sample(model, prompt, 2, temperature=0, eos_id=eos).tolist() == [[1, 2, 5, 6, eos], [4, 8, 9, 10, 11]]
    # sampling (a seeded generator) stops the same way: near-greedy at this temperature
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(model, prompt, 10, temperature=0.05, top_k=3, generator=g, eos_id=eos), stopped)
    if arch == "hope":  # the model's own entry point decodes recurrently with the same rule
        assert torch.equal(model.generate(prompt, 10, temperature=0, eos_id=eos), stopped)


def write_export(model, tokenizer: Path, out: Path, cfg) -> Path:
    from safetensors.torch import save_model

    out.mkdir()
    save_model(model, str(out / "model.safetensors"))
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    (out / "config.json").write_text(json.dumps({"format_version": 1, "model": OmegaConf.to_container(cfg),
                                                 "seq_len": 32, "step": 0}))
    return out


def test_generate_cli_stops_at_eos_unless_told_not_to(token_dir, tmp_path, capsys):
    from nl.generate import main
    from nl.tokenizer import Tokenizer

    tok = Tokenizer(token_dir / "tokenizer.model")
    prompt = tok.encode("The history of")
    word, other = tok.encode("The history of the city")[len(prompt):]  # "▁the", "▁city"
    model = bigram_model("transformer", vocab=tok.vocab_size, dim=16,
                         nxt={prompt[-1]: word, word: tok.eos_id, tok.eos_id: other, other: other})
    cfg = load_config("configs/tiny.yaml", [f"model.vocab_size={tok.vocab_size}", "model.dim=16", "model.n_heads=2",
                                            "model.n_layers=2", "model.tie_embeddings=false"]).model
    out = write_export(model, token_dir / "tokenizer.model", tmp_path / "export", cfg)
    args = ["--model", str(out), "--prompt", "The history of", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == tok.decode(prompt + [word]) == "The history of the"
    assert main(args + ["--no-stop-at-eos"]) == tok.decode(prompt + [word, tok.eos_id, other, other, other])
    assert capsys.readouterr().out.splitlines() == [tok.decode(prompt + [word]),
                                                    tok.decode(prompt + [word, tok.eos_id, other, other, other])]


# ------------------------------------------------------------------ one-line errors ----------

@pytest.fixture(scope="module")
def exported(token_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, export dir) of a 4-step run."""
    root = tmp_path_factory.mktemp("exported")
    run, _ = train_on_copy(token_dir, root)
    return run, export(run, root / "export")


def user_mistakes(run: Path, out: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    text = tmp / "short.txt"
    text.write_text("A few words.\n")
    return [
        ("nl.export", ["--run", str(tmp / "nope"), "--output", str(tmp / "x")], "no checkpoint"),
        ("nl.export", ["--run", str(run), "--step", "999", "--output", str(tmp / "x")], "available steps"),
        ("nl.export", ["--run", str(run), "--output", str(out / "config.json")], "is a file"),
        ("nl.export", ["--run", str(run), "--output", "/proc/nl-export"], "check the path"),  # cannot be created
        ("nl.export", ["--run", str(run), "--output", str(tmp / "x"), "--tokenizer", str(tmp / "nope.model")],
         "does not exist"),
        ("nl.evaluate", ["--model", str(tmp / "nope"), "--data", str(text)], "not an exported model"),
        ("nl.evaluate", ["--model", str(out), "--data", str(tmp / "missing.txt")], "does not exist"),
        ("nl.evaluate", ["--model", str(out), "--data", str(text)], "fewer than seq_len"),
        ("nl.evaluate", ["--model", str(out), "--data", str(text), "--device", "tpu9"], "--device"),
        ("nl.generate", ["--model", str(tmp / "nope"), "--prompt", "Hi"], "not an exported model"),
        ("nl.generate", ["--model", str(tmp), "--prompt", "Hi"], "not an exported model"),
        ("nl.generate", ["--model", str(out), "--prompt", "Hi", "--device", "tpu9"], "--device"),
    ]


def test_commands_end_user_mistakes_with_one_line(exported, tmp_path):
    import importlib

    run, out = exported
    for module, args, expected in user_mistakes(run, out, tmp_path):
        with pytest.raises(SystemExit) as exc:
            importlib.import_module(module).main(args)
        message = str(exc.value.code)
        assert message.startswith("error: ") and "\n" not in message and expected in message, (module, args, message)


def test_commands_reject_bad_arguments_with_usage_and_one_error_line(capsys):
    from nl.evaluate import main as evaluate_main
    from nl.generate import main as generate_main

    for main, args in ((generate_main, ["--model", "m", "--prompt", "Hi", "--max-new-tokens", "-1"]),
                       (generate_main, ["--model", "m", "--prompt", "Hi", "--temperature", "-0.5"]),
                       (evaluate_main, ["--model", "m", "--data", "d", "--batch-size", "0"])):
        with pytest.raises(SystemExit) as exc:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and lines[0].startswith("usage: ") and "must be >= " in lines[-1], lines


def test_command_line_prints_one_error_line_without_traceback(tmp_path):
    commands = [["nl.export", "--run", f"{tmp_path}/nope", "--output", f"{tmp_path}/x"],
                ["nl.evaluate", "--model", f"{tmp_path}/nope", "--data", str(tmp_path)],
                ["nl.generate", "--model", f"{tmp_path}/nope", "--prompt", "Hi"]]
    procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]  # together: each one mostly waits on imports
    for command, proc in zip(commands, procs):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in stderr, (command, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), (command, stderr)


def test_data_prep_scripts_report_unwritable_outputs_in_one_line(token_dir, small_corpus, tmp_path):
    commands = [["data_prep/tokenize_corpus.py", "--input", str(small_corpus), "--tokenizer",
                 str(token_dir / "tokenizer.model"), "--output", "/proc/nl-tokens", "--num-workers", "1"],
                ["data_prep/prepare_demo.py", "--root", "/proc/nl-demo", "--num-workers", "1"]]
    procs = [subprocess.Popen([sys.executable, *c], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    for command, proc in zip(commands, procs):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in stderr, (command, stderr)
        assert stderr.strip().splitlines()[-1].startswith("error: /proc/"), (command, stderr)
