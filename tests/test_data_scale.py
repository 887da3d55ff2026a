"""Data at scale: tokenize_corpus parts (--num-shards/--shard-index) + merge_shards, streamed
`datasets` inputs (save_to_disk, parquet, hub via streaming), bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script
from nl.data.shards import DataError, TokenShards
from nl.tokenizer import Tokenizer

sys.path.insert(0, str(REPO))  # data_prep/ holds scripts, not an installed package
import data_prep.tokenize_corpus as tc  # noqa: E402
from data_prep.merge_shards import merge_shards  # noqa: E402
from data_prep.tokenize_corpus import tokenize_corpus  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402


def val_rule(index: int, seed: int, val_fraction: float) -> bool:
    """tokenize_corpus's documented split rule, restated (doc 0 train, doc 1 val, else the hash)."""
    if index < 2:
        return index == 1
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def stream(token_dir: Path, split: str) -> np.ndarray:
    shards = TokenShards(token_dir, split)
    return shards.window(0, shards.num_tokens)


def documents_of(token_dir: Path, split: str, eos: int) -> list[list[int]]:
    s = stream(token_dir, split)
    ends = np.flatnonzero(s == eos)
    return [s[a + 1:b].tolist() for a, b in zip(np.r_[-1, ends[:-1]], ends)]


@pytest.fixture(scope="module")
def texts(small_corpus) -> list[str]:
    return [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:240]]


@pytest.fixture(scope="module")
def model(token_dir) -> Path:
    return token_dir / "tokenizer.model"


def array_task(index: int, count: int, *args: str, cpus: int = 1, check: bool = True,
               ) -> subprocess.CompletedProcess:
    """Run launch/tokenize_array.sbatch as slurm runs array task `index` of `count` (from /)."""
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_TASK_COUNT": str(count),
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": str(count - 1),
           "SLURM_CPUS_PER_TASK": str(cpus), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "launch" / "tokenize_array.sbatch"), *args], cwd="/", env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"array task {index} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def parts(tmp_path_factory, texts, model) -> tuple[Path, list[Path]]:
    """The corpus (with an empty line, which is no document) and its 3 parts, written by the slurm
    array script's tasks 0..2 (task 1 on 2 worker processes)."""
    root = tmp_path_factory.mktemp("parts")
    corpus = root / "corpus.jsonl"
    rows = texts[:10] + [""] + texts[10:]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    for i in range(3):
        array_task(i, 3, str(root / "parts"), "--input", str(corpus), "--tokenizer", str(model),
                   "--val-fraction", "0.1", "--seed", "7", "--shard-tokens", "9000", cpus=1 + i % 2)
    dirs = sorted((root / "parts").iterdir())
    assert [d.name for d in dirs] == ["part_00000", "part_00001", "part_00002"]
    return corpus, dirs


def test_array_script_refusals(tmp_path, model):
    proc = array_task(0, 3, str(tmp_path), "--input", "x.jsonl", "--output", "y", check=False)
    assert proc.returncode != 0 and "--output is set by this script" in proc.stderr
    env_less = subprocess.run(["bash", str(REPO / "launch" / "tokenize_array.sbatch"), str(tmp_path)],
                              capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert env_less.returncode != 0 and "not an array task" in env_less.stderr


def test_three_parts_merged_equal_one_machine(parts, texts, model, tmp_path):
    corpus, dirs = parts
    one = tokenize_corpus([str(corpus)], model, tmp_path / "one", val_fraction=0.1, num_workers=1,
                          shard_tokens=9000, seed=7, progress=False)
    proc = run_script("data_prep/merge_shards.py", "--parts", *map(str, dirs[::-1]), "--output",
                      str(tmp_path / "merged"), "--shard-tokens", "9000")
    assert "merged 3 parts" in proc.stdout
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert merged["splits"] == one["splits"]  # same shards, token counts and sha256
    assert len(merged["splits"]["train"]["shards"]) > 2  # several shards: the merge crosses shard bounds
    for split in ("train", "val"):
        assert np.array_equal(stream(tmp_path / "merged", split), stream(tmp_path / "one", split))

    # Against the spec, not the code: each document in its split by the hash rule, in corpus order.
    tok = Tokenizer(model)
    want = {"train": [], "val": []}
    for i, text in enumerate(texts):
        want["val" if val_rule(i, 7, 0.1) else "train"].append(tok.encode(text))
    assert 5 < len(want["val"]) < 60
    for split in ("train", "val"):
        assert documents_of(tmp_path / "merged", split, tok.eos_id) == want[split]

    # Each part holds exactly its documents i % 3 == I, each split by the same rule.
    for i, d in enumerate(dirs):
        m = json.loads((d / "manifest.json").read_text())
        assert m["part"]["index"] == i and m["part"]["corpus_documents"] == len(texts)
        for split in ("train", "val"):
            docs = [want_i for k, want_i in enumerate(texts) if k % 3 == i
                    and val_rule(k, 7, 0.1) == (split == "val")]
            assert documents_of(d, split, tok.eos_id) == [tok.encode(t) for t in docs]


def test_merge_refusals(parts, model, tmp_path, texts):
    corpus, dirs = parts

    def refused(part_dirs: list[Path], message: str) -> None:
        with pytest.raises(DataError, match=message):
            merge_shards(part_dirs, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    refused(dirs[:2], r"missing part 2 of 3")
    refused([dirs[0], dirs[1], dirs[1], dirs[2]], r"both part 1 of 3 \(overlap\)")
    copy = tmp_path / "copy_of_1"
    shutil.copytree(dirs[1], copy)
    refused([dirs[0], dirs[1], copy, dirs[2]], r"both part 1 of 3 \(overlap\)")
    refused([dirs[0], dirs[1], model.parent], r"is not a part directory")

    # A part tokenized with another tokenizer.
    other = tmp_path / "other.model"
    train_tokenizer([str(corpus)], 400, other)
    tokenize_corpus([str(corpus)], other, tmp_path / "other_2", val_fraction=0.1, num_workers=1, seed=7,
                    shard_tokens=9000, num_shards=3, shard_index=2, progress=False)
    refused([dirs[0], dirs[1], tmp_path / "other_2"], r"differ in tokenizer \(fingerprint\)")

    # Parts of another split of the work, or with another seed.
    tokenize_corpus([str(corpus)], model, tmp_path / "of4", val_fraction=0.1, num_workers=1, seed=7,
                    num_shards=4, shard_index=2, progress=False)
    refused([dirs[0], dirs[1], tmp_path / "of4"], r"differ in --num-shards")
    tokenize_corpus([str(corpus)], model, tmp_path / "seed8", val_fraction=0.1, num_workers=1, seed=8,
                    shard_tokens=9000, num_shards=3, shard_index=2, progress=False)
    refused([dirs[0], dirs[1], tmp_path / "seed8"], r"differ in --seed")

    # A part whose document index was cut short (an interrupted copy).
    cut = tmp_path / "cut"
    shutil.copytree(dirs[2], cut)
    index = cut / "train_docs.bin"
    index.write_bytes(index.read_bytes()[:-tc.DOC_DTYPE.itemsize])
    refused([dirs[0], dirs[1], cut], r"train_docs.bin does not match")

    # A failed task is rerun over its partial part: --overwrite counts the part's index files as its own.
    rerun = tokenize_corpus([str(corpus)], model, cut, val_fraction=0.1, num_workers=1, seed=7, shard_tokens=9000,
                            num_shards=3, shard_index=2, overwrite=True, progress=False)
    assert rerun["part"]["index"] == 2
    assert merge_shards([dirs[0], dirs[1], cut], tmp_path / "out")["splits"]["train"]["num_documents"] > 0

    proc = run_script("data_prep/merge_shards.py", "--parts", str(dirs[0]), "--output", str(tmp_path / "out2"),
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "missing parts 1, 2 of 3" in proc.stderr
    proc = run_script("data_prep/tokenize_corpus.py", "--input", str(corpus), "--tokenizer", str(model),
                      "--output", str(tmp_path / "x"), "--num-shards", "3", check=False)
    assert proc.returncode != 0 and "--num-shards and --shard-index go together" in proc.stderr
    with pytest.raises(DataError, match=r"--shard-index must be in \[0, --num-shards\)"):
        tokenize_corpus([str(corpus)], model, tmp_path / "x", num_shards=3, shard_index=3)


def test_datasets_inputs_are_streamed(texts, model, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    docs = texts[:60]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(saved))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=7)

    # A hub name is loaded with streaming=True (rows fetched as read), with the split and config
    # asked for; here the "hub" serves the local parquet file as a streamed dataset.
    calls = []
    real_load = datasets.load_dataset

    def fake_hub(name, config=None, *, split, streaming=False):
        calls.append((name, config, split, streaming))
        return real_load("parquet", data_files={"validation": str(parquet)}, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    outs = {}
    for name, inputs in (("jsonl", [str(jsonl)]), ("saved", [str(saved)]), ("parquet", [str(parquet)]),
                         ("hub", ["some-user/some-corpus"])):
        outs[name] = tokenize_corpus(inputs, model, tmp_path / f"tokens_{name}", val_fraction=0.1, num_workers=1,
                                     progress=False, hub_split="validation", hub_config="sample-10BT")
    assert calls == [("some-user/some-corpus", "sample-10BT", "validation", True)]
    for name in ("saved", "parquet", "hub"):
        assert outs[name]["splits"] == outs["jsonl"]["splits"], name
    # a streamed dataset without the text field says so
    with pytest.raises(DataError, match=r"has no column 'body'"):
        tokenize_corpus(["some-user/some-corpus"], model, tmp_path / "x", num_workers=1, progress=False,
                        hub_split="validation", text_field="body")

    # A streamed dataset whose columns are known only from its rows (features None): read row by row.
    def generated_hub(name, config=None, *, split, streaming=False):
        def rows():
            for i, t in enumerate(docs):
                yield {"body": t, "id": i}
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", generated_hub)
    assert datasets.load_dataset("x", split="train").column_names is None
    m = tokenize_corpus(["some-user/generated"], model, tmp_path / "tokens_gen", val_fraction=0.1, num_workers=1,
                        progress=False, text_field="body")
    assert m["splits"] == outs["jsonl"]["splits"]
    with pytest.raises(DataError, match=r"row 0 has no field 'text' \(has: body, id\)"):
        tokenize_corpus(["some-user/generated"], model, tmp_path / "x", num_workers=1, progress=False)


def test_memory_stays_bounded_for_a_generator_corpus(texts, model, tmp_path, monkeypatch):
    """2 MB of text read from a generator: the peak Python allocation (~0.5 MB, set by the job size,
    not the corpus) stays well under it."""
    monkeypatch.setattr(tc, "BATCH_DOCS", 32)  # smaller jobs make the bound below tight
    monkeypatch.setattr(tc, "BATCH_CHARS", 1 << 16)
    n_docs, total = 0, 0

    def generated():
        nonlocal n_docs, total
        while total < 2_000_000:
            text = f"{n_docs} " + texts[n_docs % len(texts)]
            n_docs += 1
            total += len(text)
            yield f"generated {n_docs}", text

    tracemalloc.start()
    try:
        m = tokenize_corpus(["generated"], model, tmp_path / "gen", val_fraction=0.01, num_workers=1,
                            progress=False, documents=generated(), num_shards=2, shard_index=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m["part"]["corpus_documents"] == n_docs
    assert m["splits"]["train"]["num_documents"] + m["splits"]["val"]["num_documents"] == n_docs // 2
    assert peak < 800_000, f"peak {peak / 1e6:.1f} MB while streaming {total / 1e6:.1f} MB of text"
