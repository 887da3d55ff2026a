"""What nl.evaluate, nl.memory_health and nl.generate accept as --model and --data/--text, and the one-line
errors (with a fix that works) for what they cannot use: a .jsonl key or parquet column other than
"text", several token directories, a run folder passed as --model, a split too small, a raw text file
as data.dir, a missing local path (refused without a hub request). Every CLI runs in this process."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil

import pytest

from conftest import REPO
from nl.config import load_config
from nl.data.shards import DataError, TokenShards

HOPE = ["model.arch=hope", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.hope.chunk_size=8",
        "model.hope.memory_chunk_size=8"]


@pytest.fixture(scope="module")
def run_and_export(token_dir, tmp_path_factory):
    """A one-step tiny HOPE run on token_dir and its export: (run dir, export dir)."""
    from nl.export import export
    from nl.trainer import train

    root = tmp_path_factory.mktemp("eval_inputs")
    run = root / "run"
    train(load_config(REPO / "configs/tiny.yaml", [
        *HOPE, f"data.dir={token_dir}", "data.seq_len=32", "train.steps=1", "train.batch_size=4",
        "train.micro_batch_size=4", "eval.every=0", "checkpoint.every=1", f"run.dir={run}"]))
    return run, export(run, root / "export")


def error_of(main, *argv: str) -> str:
    """The one line a CLI's main(argv) exits with (status 1, `error: ...`)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def suggested_command(message: str) -> list[str]:
    """The `python ...` command a message suggests, as argv without the interpreter."""
    return shlex.split(message.split("`")[1])[1:]


def text_documents(small_corpus, n: int = 60) -> list[str]:
    return [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:n]]


def test_text_field_reaches_the_readers_of_evaluate_and_memory_health(run_and_export, small_corpus, tmp_path):
    from nl.evaluate import main as evaluate
    from nl.memory_health import main as memory_health

    _, export = run_and_export
    docs = text_documents(small_corpus)
    plain, body = tmp_path / "plain.jsonl", tmp_path / "body.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    body.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    common = ("--model", str(export), "--seq-len", "32", "--max-batches", "2")
    # the reader's advice names --text-field: evaluate has it now, and it reads the same documents
    assert "pass --text-field" in error_of(evaluate, *common, "--data", str(body))
    expected = evaluate([*common, "--data", str(plain)])
    assert evaluate([*common, "--data", str(body), "--text-field", "body"]) == {**expected, "data": [str(body)]}
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = tmp_path / "rows.parquet"
        pq.write_table(pa.table({"content": docs}), table)
        assert "pass --text-field" in error_of(evaluate, *common, "--data", str(table))
        got = evaluate([*common, "--data", str(table), "--text-field", "content"])
        assert got["val_loss"] == expected["val_loss"]
    health = ("--model", str(export), "--tokens", "64")
    assert "pass --text-field" in error_of(memory_health, *health, "--text", str(body))
    assert memory_health([*health, "--text", str(body), "--text-field", "body"]) == \
        memory_health([*health, "--text", str(plain)])


def replace_val_split(directory, tokens) -> None:
    """Make the val split of token directory `directory` exactly `tokens` (empty: no shard at all)."""
    from nl.data.shards import file_sha256

    manifest = json.loads((directory / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        (directory / shard["file"]).unlink(missing_ok=True)
    shards = []
    if len(tokens):
        (directory / "val_00000.bin").write_bytes(tokens.tobytes())
        shards = [{"file": "val_00000.bin", "num_tokens": len(tokens),
                   "sha256": file_sha256(directory / "val_00000.bin")}]
    manifest["splits"]["val"] = {"num_tokens": len(tokens), "num_documents": 1, "shards": shards}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_several_token_directories_are_pooled_and_each_reported(run_and_export, token_dir, tmp_path, small_corpus):
    """Pooled = token-weighted over the directories (their windows together), not the mean of their losses:
    the second directory is smaller (3 windows against 16) and holds other text."""
    from nl.evaluate import main as evaluate

    _, export = run_and_export
    other = tmp_path / "other_tokens"
    shutil.copytree(token_dir, other)
    replace_val_split(other, TokenShards(token_dir).window(5000, 3 * 16 + 1))  # train text, not token_dir's val
    common = ("--model", str(export), "--seq-len", "16", "--max-batches", "2")
    alone = evaluate([*common, "--data", str(token_dir)])
    other_alone = evaluate([*common, "--data", str(other)])
    both = evaluate([*common, "--data", str(token_dir), str(other)])
    assert [d["data"] for d in both["per_data"]] == [str(token_dir), str(other)]
    for d, single in zip(both["per_data"], (alone, other_alone)):
        assert d["val_loss"] == pytest.approx(single["val_loss"]) and d["tokens"] == single["tokens"]
    (l1, n1), (l2, n2) = [(d["val_loss"], d["tokens"]) for d in both["per_data"]]
    assert (n1, n2) == (2 * 8 * 16, 3 * 16) and both["tokens"] == n1 + n2
    weighted, mean = (l1 * n1 + l2 * n2) / (n1 + n2), (l1 + l2) / 2
    assert abs(weighted - mean) > 1e-3  # the data tell the two apart
    assert both["val_loss"] == pytest.approx(weighted, rel=1e-5) and both["val_loss"] != pytest.approx(mean, rel=1e-5)
    assert "per_data" not in alone
    mixed = error_of(evaluate, *common, "--data", str(token_dir), str(small_corpus))
    assert "mixes token directories" in mixed and "separate runs" in mixed
    # a missing path among token directories is named as missing, not as raw text; a directory given twice
    # would count twice in the pooled loss
    missing = error_of(evaluate, *common, "--data", str(token_dir), str(tmp_path / "nope"))
    assert missing == f"error: input {tmp_path / 'nope'} does not exist: check the path", missing
    twice = error_of(evaluate, *common, "--data", str(token_dir), str(other), str(token_dir) + "/")
    assert "more than once" in twice and str(token_dir) in twice, twice
    # a directory with nothing to read: the advice names no flag of another command
    (tmp_path / "empty").mkdir()
    message = error_of(evaluate, *common, "--data", str(tmp_path / "empty"))
    assert "has no .txt/.jsonl/.parquet files" in message and "--input" not in message


def test_a_split_too_small_suggests_evaluates_own_flags_and_they_work(run_and_export, token_dir, tmp_path):
    from nl.evaluate import main as evaluate

    _, export = run_and_export
    small = tmp_path / "small_val"
    shutil.copytree(token_dir, small)

    def set_val(num_tokens: int) -> None:
        """Make the val split the first num_tokens tokens of train (0: no shard at all)."""
        replace_val_split(small, TokenShards(token_dir).window(0, num_tokens))

    common = ("--model", str(export), "--data", str(small), "--max-batches", "1")
    set_val(0)
    message = error_of(evaluate, *common)
    assert "split 'val'" in message and message.endswith(": pass --split train") and "data.seq_len" not in message
    assert evaluate([*common, "--split", "train"])["tokens"] > 0
    set_val(20)  # fewer than the export's seq_len + 1 = 33
    message = error_of(evaluate, *common)
    assert message.endswith(": pass --split train or --seq-len 19")
    assert evaluate([*common, "--seq-len", "19"])["windows"] == 1


def test_a_run_folder_as_model_suggests_an_export_beside_it_that_works(run_and_export, tmp_path, monkeypatch):
    from nl.evaluate import main as evaluate
    from nl.export import main as export_main
    from nl.generate import main as generate
    from nl.memory_health import main as memory_health
    from nl.niah import main as niah

    run, _ = run_and_export
    monkeypatch.chdir(tmp_path)
    messages = [error_of(evaluate, "--model", str(run), "--data", "x.txt"),
                error_of(generate, "--model", str(run), "--prompt", "The"),
                error_of(memory_health, "--model", str(run), "--text", "x.txt"),
                error_of(niah, "--model", str(run), "--lengths", "100")]
    for message in messages:
        assert "is a training run, not an exported model" in message
        assert f"python -m nl.export --run {run} --output exports/run`" in message
    argv = suggested_command(messages[0])
    assert argv[:2] == ["-m", "nl.export"]
    export_main(argv[2:])
    assert generate(["--model", "exports/run", "--prompt", "The", "--max-new-tokens", "2"]).startswith("The")

    # one checkpoint of the run, or its checkpoints/ folder: the advice names the run (and --step), and works
    step_dir = sorted((run / "checkpoints").glob("step_*"))[-1]
    step = int(step_dir.name.split("_")[1])
    message = error_of(generate, "--model", str(step_dir), "--prompt", "The")
    assert f"is a checkpoint of training run {run}" in message
    assert f"python -m nl.export --run {run} --step {step} --output exports/run_step{step}`" in message
    export_main(suggested_command(message)[2:])
    assert generate(["--model", f"exports/run_step{step}", "--prompt", "The", "--max-new-tokens", "2"])
    message = error_of(generate, "--model", str(run / "checkpoints"), "--prompt", "The")
    assert f"the checkpoints of training run {run}" in message and f"--run {run} --output exports/run`" in message
    # a non-empty folder that is no export: the advice does not write into it (nl.export would refuse that)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    message = error_of(generate, "--model", "notes", "--prompt", "The")
    assert message.endswith("--output exports/NAME"), message
    # from inside the run folder, the export goes beside the run, not into it
    monkeypatch.chdir(run)
    message = error_of(generate, "--model", ".", "--prompt", "The")
    assert "--run . --output ../exports/run`" in message


def test_a_raw_text_file_as_data_dir_suggests_tokenizing_it(token_dir, tmp_path, monkeypatch, small_corpus):
    spec = importlib.util.spec_from_file_location("tokenize_corpus", REPO / "data_prep/tokenize_corpus.py")
    tokenize_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tokenize_corpus)

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(token_dir / "tokenizer.model", "tokenizer.model")  # the name the advice uses
    shutil.copyfile(small_corpus, "more.jsonl")
    with pytest.raises(DataError) as error:
        TokenShards("more.jsonl")
    message = str(error.value)
    assert message.startswith("more.jsonl is a raw text file, not a token directory")
    argv = suggested_command(message)
    assert argv == ["data_prep/tokenize_corpus.py", "--input", "more.jsonl", "--tokenizer", "tokenizer.model",
                    "--output", "more_tokens"]
    tokenize_corpus.main([*argv[1:], "--num-workers", "1"])
    assert TokenShards("more_tokens").num_tokens > 0
    (tmp_path / "shards.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="shards.bin is a file, not a token directory"):
        TokenShards(tmp_path / "shards.bin")


def test_a_missing_local_path_is_refused_without_the_hub(run_and_export, tmp_path, monkeypatch):
    import nl.data.sources as sources
    from nl.evaluate import main as evaluate

    hub_names = []

    def no_hub(name, split="train", config=None):
        hub_names.append(name)
        raise DataError(f"hub asked for {name}")

    monkeypatch.setattr(sources, "_load_hub", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _, export = run_and_export
    for missing in ("data/nope", "data/tokens/val", "./nope", "nope.jsonl", "data\\nope"):
        message = error_of(evaluate, "--model", str(export), "--data", missing)
        assert message == f"error: input {missing} does not exist: check the path"
    assert hub_names == []
    # a hub dataset id (NAME or NAMESPACE/NAME, nothing of it here) still goes to the hub
    for name in ("someone/corpus", "corpus"):
        assert error_of(evaluate, "--model", str(export), "--data", name) == f"error: hub asked for {name}"
    assert hub_names == ["someone/corpus", "corpus"]


@pytest.fixture(scope="module")
def transformer_export(token_dir, tmp_path_factory):
    """A one-step tiny Transformer++ (RoPE, trained seq_len 32) run on token_dir, exported: the export dir."""
    from nl.export import export
    from nl.trainer import train

    root = tmp_path_factory.mktemp("eval_inputs_transformer")
    train(load_config(REPO / "configs/tiny.yaml", [
        "model.arch=transformer", "model.dim=32", "model.n_layers=1", "model.n_heads=2", f"data.dir={token_dir}",
        "data.seq_len=32", "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4", "eval.every=0",
        "checkpoint.every=1", f"run.dir={root / 'run'}"]))
    return export(root / "run", root / "export")


def test_lengths_past_a_rope_models_trained_seq_len_warn_once(run_and_export, transformer_export, small_corpus,
                                                            tmp_path, capsys):
    """nl.evaluate's --seq-len and nl.generate's prompt + new tokens past the trained seq_len (32) of a
    RoPE reader get one warning on stderr, worded as nl.niah's; stdout keeps its JSON / text; HOPE's
    recurrent memories have no position budget and never warn."""
    from nl.evaluate import main as evaluate
    from nl.generate import main as generate

    _, hope = run_and_export
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in text_documents(small_corpus, 20)))
    budget = "is past this model's position budget, its trained seq_len 32: RoPE positions beyond training"

    def stderr_of(main, *argv: str) -> tuple[str, object]:
        capsys.readouterr()
        result = main(list(argv))
        out, err = capsys.readouterr()
        if main is evaluate:
            assert json.loads(out) == result  # stdout: the one JSON line, as before
        else:
            assert out == result + "\n"
        return err, result

    common = ("--data", str(text), "--max-batches", "1", "--batch-size", "1")
    err, result = stderr_of(evaluate, "--model", str(transformer_export), *common, "--seq-len", "64")
    assert err.count("warning:") == 1 and f"warning: --seq-len 64 {budget}" in err, err
    assert result["seq_len"] == 64 and result["windows"] == 1
    for model, seq_len in ((transformer_export, "32"), (hope, "64")):  # within the budget; no budget
        assert stderr_of(evaluate, "--model", str(model), *common, "--seq-len", seq_len)[0] == ""

    prompt = ("--prompt", "The history of", "--temperature", "0", "--no-stop-at-eos")
    err, out = stderr_of(generate, "--model", str(transformer_export), *prompt, "--max-new-tokens", "40")
    assert err.count("warning:") == 1 and re.search(
        rf"warning: the prompt's (\d+) tokens \+ up to 40 new tokens {budget}", err), err
    assert out.startswith("The history of")
    assert stderr_of(generate, "--model", str(transformer_export), *prompt, "--max-new-tokens", "4")[0] == ""
    assert stderr_of(generate, "--model", str(hope), *prompt, "--max-new-tokens", "40")[0] == ""
