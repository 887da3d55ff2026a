"""data.document_boundaries=reset: inside a packed window every EOS-terminated document is modelled on
its own. The reference runs each document as its own sequence through the unmodified model; the
packed forward with reset must equal it for every token (float64), as must the gradients. `none` is
today's forward, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nl.config import ConfigError, HopeConfig, ModelConfig, load_config
from nl.models import build_model
from nl.models import documents
from nl.models.documents import Documents, document_reset

EOS = 2
T = 29


def windows() -> torch.Tensor:
    """[3, T] windows over a stream of EOS-terminated documents:
    row 0 starts mid-document, has a 2-token document (shorter than any chunk) and EOS at 6, 8, 20;
    row 1 is one document (no EOS); row 2 starts with the EOS of a cut document (a 1-token document)
    and ends with an EOS in its last column (it starts nothing inside the window)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, T), generator=g)
    ids[0, [6, 8, 20]] = EOS
    ids[2, [0, 11, T - 1]] = EOS
    return ids


def split_documents(row: torch.Tensor) -> list[torch.Tensor]:
    """A window's documents, each up to and including its EOS (a plain loop over the tokens)."""
    docs, current = [], []
    for token in row.tolist():
        current.append(token)
        if token == EOS:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return [torch.tensor(d) for d in docs]


def per_document_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Every document of every window run alone through `model` (no reset), logits back in place."""
    assert model.document_eos_id is None
    return torch.stack([torch.cat([model(d[None])[0] for d in split_documents(row)]) for row in ids])


def hope(**hope) -> ModelConfig:
    hc = dict(chunk_size=4, memory_chunk_size=3, cms_chunk_sizes=[1, 4], cms_hidden=32, momentum=True)
    hc.update(hope)
    return ModelConfig(arch="hope", vocab_size=64, dim=16, n_layers=2, n_heads=2, hope=HopeConfig(**hc))


MODELS = {
    "hope_mlp": hope(),
    "hope_linear": hope(memory_type="linear", chunk_size=5, memory_chunk_size=5),
    "hope_in_context_cms": hope(cms_mode="in_context", cms_context_chunk_sizes=[3, 4]),
    "hope_static_kv": hope(static_k=True, static_v=True, adaptive_q=True, chunk_size=3, memory_chunk_size=6),
    "titans": hope(mixer="titans", dgd=False, cms_chunk_sizes=[1]),
    "hope_attention": hope(mixer="attention"),
    "transformer": ModelConfig(arch="transformer", vocab_size=64, dim=16, n_layers=2, n_heads=2),
}


def models(name: str):
    """(reset model, plain model) with equal float64 weights; large init so every path matters."""
    cfg = dataclasses.replace(MODELS[name], init_std=0.2)
    plain = build_model(cfg, seed=0).double()
    reset = build_model(cfg, seed=0).double()
    document_reset(reset, EOS)
    return reset, plain


@pytest.mark.parametrize("floor", [64, 2])  # one padded batch | documents grouped by length (4 groups)
@pytest.mark.parametrize("name", list(MODELS))
def test_reset_equals_each_document_alone(name, floor, monkeypatch):
    monkeypatch.setattr(documents, "MIN_GROUP_LEN", floor)
    reset, plain = models(name)
    ids = windows()
    with torch.no_grad():
        got, want, carried = reset(ids), per_document_logits(plain, ids), plain(ids)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (got - want).abs().max()
    if hasattr(reset, "diagnostics"):  # HOPE's memory health: means over the documents, the keys of a plain run
        stats = reset.diagnostics()
        assert set(stats) == set(plain.diagnostics()) and all(torch.isfinite(v) for v in stats.values())
    # The switch matters: without it, row 0's later documents see the earlier ones.
    assert (carried[0, 7:] - want[0, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["hope_mlp", "hope_linear", "hope_attention", "transformer"])
def test_reset_gradients_equal_per_document_gradients(name, monkeypatch):
    monkeypatch.setattr(documents, "MIN_GROUP_LEN", 2)  # several groups
    reset, plain = models(name)
    ids = windows()
    targets = torch.roll(ids, -1, dims=1)
    F.cross_entropy(reset(ids).flatten(0, 1), targets.flatten(), reduction="sum").backward()
    F.cross_entropy(per_document_logits(plain, ids).flatten(0, 1), targets.flatten(), reduction="sum").backward()
    for (n, a), (_, b) in zip(reset.named_parameters(), plain.named_parameters()):
        assert a.grad is not None and torch.isfinite(a.grad).all(), n
        # 1e-6, not 1e-12: RMSNorm runs in fp32 even in a float64 model, so the norm gains' gradients are
        # fp32 sums over tokens, summed in another order here (measured: <= 1.7e-7; 0 for the logits).
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 1e-6, n


@pytest.mark.parametrize("name", ["hope_mlp", "hope_attention", "transformer"])
def test_none_is_todays_forward_bit_for_bit(name):
    """The default leaves the model as built (no reset) and the forward unchanged: equal, bit for bit, to
    a model whose reset was switched on and off again, also with EOS inside the window."""
    cfg = MODELS[name]
    model = build_model(cfg, seed=0)
    assert model.document_eos_id is None and load_config().data.document_boundaries == "none"
    toggled = build_model(cfg, seed=0)
    document_reset(toggled, EOS)
    document_reset(toggled, None)
    ids = windows()
    with torch.no_grad():
        assert torch.equal(model(ids), toggled(ids))


@pytest.mark.parametrize("floor", [64, 2])
def test_documents_index_maps(floor, monkeypatch):
    monkeypatch.setattr(documents, "MIN_GROUP_LEN", floor)
    ids = windows()
    docs = Documents.from_eos(ids, EOS)
    lengths = [len(d) for row in ids for d in split_documents(row)]
    assert docs.n_docs == len(lengths)
    seen = []

    def record(x):  # a per-token layer that records what it is given
        seen.append(x)
        return 2 * x

    x = torch.randn(3, T, 5)
    assert torch.equal(docs.apply(record, x), 2 * x)
    rows = [r for batch in seen for r in batch]
    assert sorted(int((r.abs().sum(-1) > 0).sum()) for r in rows) == sorted(lengths)  # one document per row
    for batch in seen:  # each row: a document's tokens in order, then zeros
        for r in batch:
            n = int((r.abs().sum(-1) > 0).sum())
            assert r[n:].abs().sum() == 0 and any(torch.equal(r[:n], d) for d in x.flatten(0, 1).split(lengths))
        if floor == 2:  # groups by powers of two: padding at most doubles a group
            assert batch.shape[1] <= 2 * min(int((r.abs().sum(-1) > 0).sum()) for r in batch)
    assert len(seen) == (1 if floor == 64 else 4)  # lengths {1, 2}, {7, 8}, {11, 12}, {17, 29}
    assert docs.padded_tokens() == sum(b.shape[0] * b.shape[1] for b in seen)
    # Positions restart after each EOS; attention only within a document and causally.
    assert docs.positions[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 0]
    assert docs.positions[2, :3].tolist() == [0, 0, 1] and docs.positions[1].tolist() == list(range(T))
    mask = docs.attention_mask()
    for b in range(3):
        doc_of = [i for i, d in enumerate(split_documents(ids[b])) for _ in range(len(d))]
        want = torch.tensor([[doc_of[s] == doc_of[t] and t <= s for t in range(T)] for s in range(T)])
        assert torch.equal(mask[b, 0], want)


def test_config_and_refusals():
    with pytest.raises(ConfigError, match="document_boundaries"):
        load_config(overrides=["data.document_boundaries=per_doc"])
    assert load_config(overrides=["data.document_boundaries=reset"]).data.document_boundaries == "reset"
    with pytest.raises(ValueError, match="document_boundaries=none"):
        document_reset(torch.nn.Linear(2, 2), EOS)
    model = build_model(MODELS["hope_mlp"], seed=0)
    document_reset(model, EOS)
    with pytest.raises(ValueError, match="one document per prompt"):
        model.prefill(windows())
    model.prefill(torch.tensor([[5, 6, 7]]))  # a prompt within one document decodes as before


def test_trainer_trains_on_documents_alone(token_dir, tmp_path):
    """The first logged loss of a run with reset is the initial model's per-document loss on the first
    batch (an independent recomputation); with none it is the packed-window loss."""
    import json

    from nl.data.loader import TokenLoader
    from nl.data.shards import TokenShards
    from nl.trainer import train

    def first_loss(mode: str) -> float:
        run = tmp_path / mode
        cfg = load_config("configs/hope_tiny.yaml", [
            "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.init_std=0.2", "model.hope.chunk_size=8",
            "model.hope.memory_chunk_size=8", f"data.dir={token_dir}", "data.seq_len=64",
            f"data.document_boundaries={mode}", "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4",
            "train.log_every=1", "eval.every=0", "checkpoint.every=0", f"run.dir={run}"])
        train(cfg)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if "loss" in r), load_config(run / "config.yaml")

    got, cfg = first_loss("reset")
    packed, _ = first_loss("none")
    inputs, targets = TokenLoader(TokenShards(token_dir), 64, 4, seed=cfg.train.seed).next_batch()
    eos = TokenShards(token_dir).eos_id
    assert (inputs[:, :-1] == eos).any(), "the first batch should hold a document boundary"
    model = build_model(cfg.model, seed=cfg.train.seed)
    with torch.no_grad():
        total = 0.0
        for row, target in zip(inputs, targets):
            cuts = [0] + [i + 1 for i in (row[:-1] == eos).nonzero().flatten().tolist()] + [len(row)]
            for a, b in zip(cuts, cuts[1:]):
                total += F.cross_entropy(model(row[None, a:b])[0], target[a:b], reduction="sum").item()
    want = total / targets.numel()
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(packed - want) > 1e-4


def test_export_and_evaluate_keep_the_runs_document_boundaries(token_dir, tmp_path):
    """A run trained with reset exports the setting, and nl.evaluate then scores each document alone:
    its val loss equals the trainer's own validation (whole val split); --document-boundaries none
    scores the packed windows instead (a different number)."""
    import json

    from conftest import run_script
    from nl.evaluate import main as evaluate

    run = tmp_path / "run"
    cfg = load_config("configs/hope_tiny.yaml", [
        "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.init_std=0.2", "model.hope.chunk_size=8",
        "model.hope.memory_chunk_size=8", f"data.dir={token_dir}", "data.seq_len=64",
        "data.document_boundaries=reset", "train.steps=1", "train.batch_size=4", "train.micro_batch_size=4",
        "eval.every=1", "eval.max_batches=0", "checkpoint.every=1", f"run.dir={run}"])
    from nl.trainer import train

    train(cfg)
    val = next(r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "val_loss" in r)
    run_script("-m", "nl.export", "--run", str(run), "--output", str(tmp_path / "export"))
    assert json.loads((tmp_path / "export" / "config.json").read_text())["document_boundaries"] == "reset"
    args = ["--model", str(tmp_path / "export"), "--data", str(token_dir), "--batch-size", "4"]
    reset = evaluate(args)
    packed = evaluate([*args, "--document-boundaries", "none"])
    assert reset["document_boundaries"] == "reset" and packed["document_boundaries"] == "none"
    assert reset["val_loss"] == pytest.approx(val, rel=1e-5)
    assert abs(packed["val_loss"] - val) > 1e-4
