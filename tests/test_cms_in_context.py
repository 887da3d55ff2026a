"""In-context CMS (model.hope.cms_mode=in_context|both): the chunk-parallel level equals an independent
token-by-token reference (outputs, final fast weights, every outer gradient; float64), causality,
per-sequence state, decoding state (prefill + step == forward), restore_after_adaptation, the outer
schedule alongside (both), checkpoint/resume, export/generation, stability at 4 x seq_len, diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nl.ops.cms import ContextConfig, cms_chunked, cms_reference, initial_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def independent_reference(h, v, W0, C, lr, retention):
    """From the equations, with the inner gradient by autograd (not the closed form under test):
    tokens of chunk j read W_j; at each boundary W_{j+1} = W_0 + alpha (W_j - W_0) - eta G / N, G the sum
    of the chunk's gradients of 1/2 ||W h_t - v_t||^2 (target constant), N the sum of ||h_t||^2. Per
    sequence, one at a time."""
    ys, finals = [], []
    for b in range(h.shape[0]):
        W, G, N, out = W0, 0, 0, []
        for t in range(h.shape[1]):
            y = W @ h[b, t]
            out.append(y)
            # dL/dW = (dy/dW)^T e with e = y - v_t: the target is a constant of the inner gradient, and the
            # outer gradient still flows through e (into v and h), as for the Titans memories' targets
            G = G + torch.autograd.grad(y, W, grad_outputs=y - v[b, t], create_graph=True)[0]
            N = N + h[b, t].dot(h[b, t])
            if (t + 1) % C == 0:
                W, G, N = W0 + retention * (W - W0) - lr * G / N, 0, 0
        ys.append(torch.stack(out))
        finals.append(W)
    return torch.stack(ys), torch.stack(finals)


def _inputs(B=2, T=19, d=6, hidden=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, hidden, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, T, d, generator=g, dtype=torch.float64).requires_grad_()
    W0 = (0.4 * torch.randn(d, hidden, generator=g, dtype=torch.float64)).requires_grad_()
    return h, v, W0


@pytest.mark.parametrize("C", [1, 3, 16, 19])
@pytest.mark.parametrize("form", ["chunked", "reference"])
def test_level_equals_independent_reference_outputs_weights_and_outer_gradients(C, form):
    """T = 19: C = 3 and 16 do not divide it (a partial last chunk, its partial sums left in the state)."""
    cfg = ContextConfig(chunk_size=C, lr=0.7, retention=0.9)
    h, v, W0 = _inputs()
    run = cms_chunked if form == "chunked" else cms_reference
    y, state = run(h, v, initial_state(W0), cfg)
    y_ref, W_ref = independent_reference(h, v, W0, C, cfg.lr, cfg.retention)
    assert rel(y, y_ref) < 1e-10
    assert rel(state.cur.expand_as(W_ref), W_ref) < 1e-10
    assert state.pos == 19 and (state.acc is None) == (19 % C == 0)
    # every outer gradient (keys, targets, initial weights), through all the updates
    probe = torch.randn_like(y)
    loss = (y * probe).sum() + (state.cur.expand_as(W_ref) ** 2).sum()
    loss_ref = (y_ref * probe).sum() + (W_ref ** 2).sum()
    grads = torch.autograd.grad(loss, [h, v, W0])
    grads_ref = torch.autograd.grad(loss_ref, [h, v, W0])
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("C", [1, 3, 16])
def test_level_is_causal_and_per_sequence(C):
    """Perturbing token t of sequence 0 changes no output before t, and nothing of sequence 1."""
    cfg = ContextConfig(chunk_size=C, lr=0.7, retention=0.9)
    h, v, W0 = _inputs(T=24)
    with torch.no_grad():
        y, _ = cms_chunked(h, v, initial_state(W0), cfg)
        for t in (0, 5, 16, 23):
            h2, v2 = h.clone(), v.clone()
            h2[0, t] += 1.0
            v2[0, t] += 1.0
            y2, _ = cms_chunked(h2, v2, initial_state(W0), cfg)
            assert torch.equal(y2[0, :t], y[0, :t]) and torch.equal(y2[1], y[1])
            later = (y2[0, t:] - y[0, t:]).abs().amax(-1)
            assert later[0] > 0  # the perturbed token itself
            if C == 1 and t < 23:
                assert later[1] > 0  # the next token reads the update made from it


@pytest.mark.parametrize("C", [1, 4])
def test_chunked_continues_from_any_state(C):
    """Prefill 7 tokens, then one token at a time (partial chunks in the state) == one call over all."""
    cfg = ContextConfig(chunk_size=C, lr=0.5, retention=0.95)
    h, v, W0 = _inputs(T=13)
    with torch.no_grad():
        y, final = cms_chunked(h, v, initial_state(W0), cfg)
        parts, state = [], initial_state(W0)
        for hp, vp in zip((h[:, :7], *h[:, 7:].split(1, dim=1)), (v[:, :7], *v[:, 7:].split(1, dim=1))):
            out, state = cms_chunked(hp, vp, state, cfg)
            parts.append(out)
    assert rel(torch.cat(parts, 1), y) < 1e-12 and state.pos == 13
    assert rel(state.cur, final.cur) < 1e-12


# ------------------------------------------------------- the model ---------------------

from nl.config import ConfigError, HopeConfig, ModelConfig, load_config  # noqa: E402
from nl.models import build_model  # noqa: E402
from nl.models.hope import restore_after_adaptation  # noqa: E402


def small(mode: str = "in_context", **hope) -> ModelConfig:
    hc = dict(chunk_size=4, memory_chunk_size=4, cms_chunk_sizes=[1, 4], cms_context_chunk_sizes=[1, 3],
              cms_hidden=32, cms_mode=mode, cms_inner_lr=0.5, cms_retention=0.9)
    hc.update(hope)
    return ModelConfig(arch="hope", vocab_size=64, dim=16, n_layers=2, n_heads=2, hope=HopeConfig(**hc))


def _model(mode="in_context", dtype=torch.float64, **hope):
    model = build_model(small(mode, **hope), seed=0).to(dtype)
    with torch.no_grad():  # a non-zero target gain: the reconstruction term is exercised too
        for block in model.layers:
            for level in block.cms.levels:
                if level.context is not None:
                    level.target_scale.uniform_(0.5, 1.5)
    return model


def test_model_chunked_equals_reference_in_every_parameter_gradient():
    model = _model()
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    results = []
    for reference in (False, True):
        for block in model.layers:
            for level in block.cms.levels:
                level.reference = reference
        model.zero_grad()
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = results
    assert rel(a, b) < 1e-10
    for n in ga:
        assert rel(ga[n], gb[n]) < 1e-8, n
    assert ga["layers.0.cms.levels.1.target_scale"].abs().sum() > 0  # the outer gradient reaches s


def test_in_context_changes_the_model_and_outer_is_untouched():
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    outer = build_model(small("outer"), seed=0).double()
    ctx = _model()
    sd = {k: v for k, v in ctx.state_dict().items() if "target_scale" not in k}
    assert set(sd) == set(outer.state_dict())  # same outer weights, plus s per in-context level
    outer.load_state_dict(sd)
    with torch.no_grad():
        a, b = outer(ids), ctx(ids)
    assert torch.equal(a[:, 0], b[:, 0])  # the first token reads the outer weights
    assert rel(b[:, 1:], a[:, 1:]) > 1e-4  # later tokens read updated fast weights


def test_config_is_validated():
    for bad in (dict(cms_mode="sideways"), dict(cms_context_chunk_sizes=[1]), dict(cms_context_chunk_sizes=[1, 0]),
                dict(cms_inner_lr=1.5), dict(cms_inner_lr=0.0), dict(cms_retention=1.2)):
        with pytest.raises(ConfigError):
            build_model(small(**bad), device="meta")
    with pytest.raises(ConfigError, match="cms_mode"):
        load_config("configs/hope_tiny.yaml", ["model.hope.cms_mode=sideways"])


@pytest.mark.parametrize("mode", ["in_context", "both"])
def test_prefill_and_steps_equal_the_full_forward(mode):
    """Prefill 7 tokens, then step across several boundaries of both levels (C = 1 and 3): the state
    carries each level's fast weights and its partial sums."""
    model = _model(mode)
    ids = torch.randint(0, 64, (2, 18), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
    logits, states = model.prefill(ids[:, :7])
    assert rel(logits, full[:, :7]) < 1e-10
    assert states[0].cms[1].acc is not None  # 7 = 2 * 3 + 1: a partial chunk in flight
    for t in range(7, 18):
        step_logits, states = model.step(ids[:, t], states)
        assert rel(step_logits, full[:, t]) < 1e-9, t
    assert all(s.cms[0].cur.shape == (2, 16, 32) for s in states)  # per sequence: [B, d, hidden]


def test_restore_after_adaptation_covers_in_context_levels():
    model = _model()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with restore_after_adaptation(model):
        with torch.no_grad():
            model.prefill(ids)  # fast weights are per call: the module is untouched
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        assert not torch.equal(model.layers[0].cms.levels[0].target_scale, before["layers.0.cms.levels.0.target_scale"])
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode, slow_every", [("outer", 16), ("in_context", 1), ("both", 16)])
def test_outer_schedule_sees_the_levels_in_outer_and_both(mode, slow_every):
    from nl.optim import param_groups

    cfg = load_config("configs/hope_tiny.yaml", ["model.vocab_size=64", f"model.hope.cms_mode={mode}"])
    model = build_model(cfg.model, device="meta")
    groups, _ = param_groups(model, cfg)
    every = {id(p): g["every"] for g in groups for p in g["params"]}
    level2 = [p for n, p in model.named_parameters() if ".cms.levels.2." in n]
    assert level2 and {every[id(p)] for p in level2} == {slow_every}


def test_diagnostics_report_level_norms():
    model = _model()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids)
    diag = model.diagnostics()
    for key in ("memory/block0/cms0_norm", "memory/block1/cms1_dev"):
        assert key in diag and torch.isfinite(diag[key])
    assert diag["memory/block0/cms0_dev"] > 0
    assert not any("cms" in k for k in build_model(small("outer"), seed=0).diagnostics())


def test_resume_export_and_generation_with_in_context_levels(token_dir, tmp_path):
    """cms_mode=both through train.py's loop: a resume from the step-4 checkpoint repeats the losses
    exactly; the export loads with the same logits and decodes (prefill/step) like the full forward."""
    import shutil

    import nl
    from conftest import run_script
    from nl.checkpoint import list_checkpoints
    from nl.trainer import train
    from test_train import read_metrics, small_cfg

    run = tmp_path / "run"
    extra = ["model.hope.cms_mode=both", "model.hope.cms_chunk_sizes=[1,2]", "model.hope.cms_context_chunk_sizes=[4,8]",
             "model.hope.chunk_size=8", "model.hope.memory_chunk_size=8", "train.steps=8", "checkpoint.every=4",
             "eval.every=0"]
    train(small_cfg(token_dir, run, *extra, arch="hope"))
    full, _ = read_metrics(run)
    shutil.rmtree(dict(list_checkpoints(run))[8])
    (run / "metrics.jsonl").write_text("")
    train(small_cfg(token_dir, run, *extra, arch="hope"))
    resumed, _ = read_metrics(run)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[4:]]

    out = tmp_path / "export"
    run_script("-m", "nl.export", "--run", str(run), "--output", str(out))
    model = nl.load_pretrained(out).eval()
    assert model.layers[0].cms.levels[1].context.chunk_size == 8
    prompt = torch.randint(0, 1024, (2, 5), generator=torch.Generator().manual_seed(0))
    gen = model.generate(prompt, max_new_tokens=6, temperature=0, stop_at_eos=False)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(model(gen[:, :t])[:, -1].argmax(-1), gen[:, t])
        # after training (s != 0), over 4 x seq_len: finite, within the band docs/HOPE.md records
        model(torch.randint(0, 1024, (2, 128), generator=torch.Generator().manual_seed(1)))
    norms = {k: v.item() for k, v in model.diagnostics().items() if "/cms" in k and k.endswith("_norm")}
    assert len(norms) == 4 and all(0.5 < v < 2 for v in norms.values()), norms


def test_level_weights_stay_in_band_over_four_training_lengths_at_init():
    """At initialisation (target gain s = 0) the step is W <- alpha W + (1 - alpha) W_0 - eta W P with P =
    sum h h^T / sum ||h||^2 (eigenvalues in [0, 1]), so ||W_j|| <= ||W_0|| for every chunk j (docs/HOPE.md);
    and the fast weights do move. 4 x seq_len (seq_len 32) tokens, default lr and retention."""
    cfg = small(cms_context_chunk_sizes=[1, 4], cms_inner_lr=0.1, cms_retention=0.99)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, states = model.prefill(ids[:, :32])
        for t in range(32, 128, 32):  # one 32-token window at a time through the recurrent state
            h = model.tok_embeddings(ids[:, t:t + 32])
            for block, state in zip(model.layers, states):
                o, _ = block.mixer.forward_with_state(block.mixer_norm(h))  # the mixer restarts: CMS is under test
                h, state.cms = block.cms.forward_with_state(h + o, state.cms)
            for state in states:
                for level in state.cms:
                    ratio = level.cur.flatten(-2).norm(dim=-1) / level.init.norm()
                    assert torch.isfinite(level.cur).all() and (ratio <= 1 + 1e-6).all(), ratio
    dev = [((s.cur - s.init).flatten(-2).norm(dim=-1) / s.init.norm()).min() for st in states for s in st.cms]
    assert min(dev) > 1e-3


def test_beam_search_reorder_picks_level_state_rows():
    from nl.hf.modeling import HopeState

    model = _model()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, states = model.prefill(ids)
        cache = HopeState(states, 8)
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped, _ = model.step(ids[:, -1].flip(0), cache.states)
        _, states_flip = model.prefill(ids.flip(0))
        expect, _ = model.step(ids[:, -1].flip(0), states_flip)
    assert rel(swapped, expect) < 1e-12


def test_mixing_flops_count_the_in_context_gradient_sums():
    """What torch's flop counter sees beyond the outer mode's forward is exactly the added count."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))
    counts = {}
    for mode in ("outer", "in_context"):
        model = build_model(small(mode), seed=0)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(ids)
        counts[mode] = (fc.get_total_flops(), model.mixing_flops_per_token(12))
    extra = counts["in_context"][0] - counts["outer"][0]
    assert extra == 2 * 2 * (2 * 16 * 32) * 12 * 2  # blocks x levels x (2 d hidden) x T x B
    assert (counts["in_context"][1] - counts["outer"][1]) * 12 * 2 == extra


# ------------------------------------------------- backward memory (segments recomputed) ---------

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from nl.ops.cms import chunk_loop  # noqa: E402


@pytest.fixture
def bench_memory(monkeypatch):
    """benchmarks/bench_memory.py, whose byte counts (saved-tensor hooks over unique storages; every
    storage still alive) these tests use."""
    spec = importlib.util.spec_from_file_location("bench_memory", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_memory", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_backward_keeps_sublinearly_many_fast_weight_copies(bench_memory):
    """C = 1: a backward that keeps one W [B, d, hidden] per chunk saves >= T B d hidden 8 bytes (float64).
    The level must save under a quarter of that at T = 256, and 4x the tokens must cost ~2x (sqrt), not 4x."""
    B, d, hidden = 2, 8, 16
    saved = {}
    for T in (256, 1024):
        h, v, W0 = _inputs(B=B, T=T, d=d, hidden=hidden)
        cfg = ContextConfig(1, 0.5, 0.9)
        saved[T] = bench_memory.saved_tensor_bytes(lambda: cms_chunked(h, v, initial_state(W0), cfg)[0], [h, v, W0])
        assert saved[T] < T * B * d * hidden * 8 / 4, (T, saved[T])
    assert saved[1024] < 2.5 * saved[256], saved


@pytest.mark.parametrize("C, T, start", [(1, 37, 0), (3, 40, 2), (5, 64, 7), (4, 19, 0)])
def test_segmented_backward_equals_the_stored_loop(C, T, start):
    """cms_chunked (segments recomputed) == chunk_loop (every chunk stored): outputs, final state and every
    outer gradient (keys, targets, W_0, and the incoming state's W and partial sums), float64 within 1e-12;
    from a state `start` tokens in (mid-chunk for C = 3, 5), T not a multiple of C."""
    cfg = ContextConfig(chunk_size=C, lr=0.7, retention=0.9)
    h, v, W0 = _inputs(T=start + T)
    results = []
    for run in (cms_chunked, chunk_loop):
        state = initial_state(W0)
        if start:  # the incoming state carries the graph of its first tokens
            _, state = cms_chunked(h[:, :start], v[:, :start], state, cfg)
        y, final = run(h[:, start:], v[:, start:], state, cfg)
        probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        loss = (y * probe).sum() + (final.cur ** 2).sum() + sum((a ** 2).sum() for a in final.acc or ())
        results.append((y, final, torch.autograd.grad(loss, [h, v, W0])))
    (y, final, grads), (y_ref, final_ref, grads_ref) = results
    assert rel(y, y_ref) < 1e-12 and final.pos == final_ref.pos == start + T
    assert rel(final.cur, final_ref.cur) < 1e-12
    assert (final.acc is None) == (final_ref.acc is None) == ((start + T) % C == 0)
    for a, b in zip(final.acc or (), final_ref.acc or ()):
        assert rel(a, b) < 1e-12
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-12


@pytest.mark.parametrize("ac, bf16", [(True, False), (False, True), (True, True)])
def test_model_gradients_unchanged_under_block_checkpointing_and_autocast(monkeypatch, ac, bf16):
    """The segment checkpoints nest inside the blocks' activation checkpointing (nl.distributed) and run
    under bf16 autocast: every parameter gradient equals the model with the stored chunk loop (float64;
    fp32 weights under autocast, where both paths take the same bf16 matmuls outside the recurrence)."""
    import contextlib

    import nl.models.hope as hope
    from nl.distributed import apply_activation_checkpointing

    dtype = torch.float32 if bf16 else torch.float64
    ids = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(8))
    grads = []
    for loop, checkpointed in ((chunk_loop, False), (cms_chunked, ac)):
        monkeypatch.setattr(hope, "cms_chunked", loop)
        torch.manual_seed(0)  # _model draws the target gains from the global generator
        model = _model(dtype=dtype)
        if checkpointed:
            apply_activation_checkpointing(model, "full", 1)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append([(n.replace("_checkpoint_wrapped_module.", ""), p.grad) for n, p in model.named_parameters()])
    tol = 1e-6 if bf16 else 1e-12
    for (n, g), (n_ref, g_ref) in zip(grads[1], grads[0], strict=True):
        assert n == n_ref and rel(g, g_ref) < tol, n


def test_bench_memory_measures_the_in_context_level_on_fake_tensors_as_on_real_ones(bench_memory):
    """benchmarks/bench_memory.py's in-context table (FakeTensorMode at preset T): the same kept bytes as
    real tensors for the model's path and the stored loop, and the stored loop keeps >= 2 W per chunk."""
    cfg = small(cms_context_chunk_sizes=[], cms_chunk_sizes=[1, 4])
    T, B, W = 24, 2, 16 * 32 * 4  # W: one fp32 [d, hidden] copy
    for level, C in enumerate((1, 4)):
        got = {}
        for stored in (False, True):
            real = bench_memory.cms_level_bytes(cfg, level, B, T, False, stored)
            with bench_memory._fake_mode():
                fake = bench_memory.cms_level_bytes(cfg, level, B, T, False, stored)
            assert fake == real
            got[stored] = real
        assert got[True] >= 2 * B * W * (T // C - 1) and got[False] < got[True]
