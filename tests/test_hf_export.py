"""Hugging Face format (issue 13 item 1): every export loads with transformers' Auto classes with
nl's logits and tokenizer ids, generate() matches nl's greedy decoding (HOPE: prefill once, then one
step per token), the Transformer++ also loads as a plain Llama, and train.init_from continues from an
export. Local directories only (HF_HUB_OFFLINE=1); skipped when transformers is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nl.config import ConfigError
from nl.export import export, load_init_weights, load_pretrained
from nl.generate import sample
from nl.tokenizer import Tokenizer
from test_train import read_metrics, small_cfg

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported: local directories only
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -r requirements-test.txt)")

ARCHS = {  # name -> (arch, overrides)
    "transformer": ("transformer", []),
    "transformer_tied": ("transformer", ["model.tie_embeddings=true"]),
    "hope": ("hope", ["model.hope.mixer=self_modifying"]),
    "hope_attention": ("hope", ["model.hope.mixer=attention"]),
    "titans": ("hope", ["model.hope.mixer=titans"]),
}


def tiny_exports(token_dir: Path, root: Path, archs: dict[str, tuple[str, list[str]]]) -> dict[str, Path]:
    """{name: export dir} of a tiny model trained for 2 steps per entry name -> (arch, overrides)."""
    from nl.trainer import train

    out = {}
    for name, (arch, extra) in archs.items():
        train(small_cfg(token_dir, root / f"run_{name}", "train.steps=2", "eval.every=0", "checkpoint.every=2",
                        *extra, arch=arch))
        out[name] = export(root / f"run_{name}", root / f"export_{name}")
    return out


@pytest.fixture(scope="module")
def exports(token_dir, tmp_path_factory) -> dict[str, Path]:
    """One tiny trained-for-2-steps export per architecture."""
    return tiny_exports(token_dir, tmp_path_factory.mktemp("hf"), ARCHS)


def auto_model(path: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_auto_model_has_nl_logits_and_loss(exports, name):
    path = exports[name]
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "nl" and config["auto_map"]["AutoModelForCausalLM"] == "modeling_nl.NLForCausalLM"
    hf = auto_model(path, trust_remote_code=True)
    ref = load_pretrained(path)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids)
        out = hf(ids, labels=ids)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    # mean next-token cross-entropy, written from its definition
    logp = expected.log_softmax(-1)[:, :-1]
    ce = -logp.gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, ce, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["transformer", "hope", "hope_attention", "titans"])
def test_generate_equals_nl_greedy(exports, name):
    path = exports[name]
    hf = auto_model(path, trust_remote_code=True)
    ref = load_pretrained(path)
    prompt = torch.randint(3, 1024, (2, 7), generator=torch.Generator().manual_seed(1))
    calls = {"forward": 0, "prefill": 0, "step": 0}
    net = hf.net
    for method in [m for m in calls if hasattr(net, m)]:  # count how the HF wrapper drives the nl model
        original = getattr(net, method)

        def counted(*args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(*args, **kwargs)

        setattr(net, method, counted)
    eos = Tokenizer(path / "tokenizer.model").eos_id  # a finished row is padded with EOS, as nl does
    got = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=eos)
    expected = sample(ref, prompt, 10, temperature=0.0, eos_id=eos)
    assert got.tolist() == expected.tolist()
    new_tokens = got.shape[1] - prompt.shape[1]
    if name in ("hope", "titans"):  # recurrent: the prompt is read once, then one step per new token
        assert calls == {"forward": 0, "prefill": 1, "step": new_tokens - 1}, calls
    else:  # no KV cache: the growing sequence is re-run
        assert calls == {"forward": new_tokens, "prefill": 0, "step": 0}, calls


@pytest.mark.parametrize("name", ["hope", "titans"])
@pytest.mark.parametrize("prompt_len", [6, 70])  # 70: past the first 64-token chunk (anchors per row)
def test_beam_search_reorders_hope_state(exports, name, prompt_len):
    hf = auto_model(exports[name], trust_remote_code=True)
    prompt = torch.randint(3, 1024, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=2)
    recurrent = hf.generate(prompt, **kwargs)  # HopeState reordered after every step
    rerun = hf.generate(prompt, use_cache=False, **kwargs)  # every step re-reads the whole sequence
    assert recurrent.tolist() == rerun.tolist()


def test_generate_stops_at_eos_like_nl(exports):
    path = exports["hope"]
    hf = auto_model(path, trust_remote_code=True)
    tok = Tokenizer(path / "tokenizer.model")
    prompt = torch.tensor([tok.encode("The history of")])
    got = hf.generate(prompt, max_new_tokens=40, do_sample=False)
    expected = sample(load_pretrained(path), prompt, 40, temperature=0.0, eos_id=tok.eos_id)
    assert got.tolist() == expected.tolist()
    assert hf.generation_config.eos_token_id == tok.eos_id


@pytest.fixture
def prompts(monkeypatch) -> list[str]:
    """The questions transformers asks on stdin ("Do you wish to run the custom code?"), each answered no."""
    asked = []

    def answer_no(question=""):
        asked.append(question)
        return "n"

    monkeypatch.setattr("builtins.input", answer_no)
    return asked


def test_hf_tokenizer_gives_nl_ids_without_remote_code(exports, small_corpus, prompts):
    path = exports["hope"]
    ours = Tokenizer(path / "tokenizer.model")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))  # reads only the tokenizer files
    assert prompts == []
    auto = transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    assert prompts == [] and auto("Hello  world")["input_ids"] == ours.encode("Hello  world")
    # AutoTokenizer without trust_remote_code reads config.json's auto_map and asks (nl.hf docstring)
    transformers.AutoTokenizer.from_pretrained(str(path))
    assert len(prompts) == 1 and "custom code" in prompts[0]
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:300]]
    texts += ["", " leading space", "  two  spaces ", "tab\tand\nnewlines\n\n", "digits 1234567",
              "日本語 テキスト é ü 😀", "<s> </s> <unk> are plain text", "\u2028odd\u00a0spaces", "▁x ▁"]
    for text in texts:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text[:60]  # default call: no BOS, no EOS added
        assert hf.decode(ids) == ours.decode(ids), text[:60]
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (ours.bos_id, ours.eos_id, 0)


@pytest.mark.parametrize("name", ["transformer", "transformer_tied"])
def test_transformer_exports_as_plain_llama(exports, name):
    path = exports[name] / "llama"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not list(path.glob("*.py"))
    llama = auto_model(path)  # no trust_remote_code
    assert type(llama).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, load_pretrained(exports[name])(ids), atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok("Hello world")["input_ids"] == Tokenizer(exports[name] / "tokenizer.model").encode("Hello world")


def test_export_without_transformers_says_what_it_skipped(exports, monkeypatch, capsys, tmp_path):
    import sys

    from nl.export import main

    run = exports["hope"].parent / "run_hope"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    main(["--run", str(run), "--output", str(tmp_path / "out")])
    assert "tokenizer files skipped: transformers is not installed" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "nl"


def test_hope_export_has_no_llama_dir(exports):
    assert not (exports["hope"] / "llama").exists()


def test_init_from_continues_from_an_export(token_dir, tmp_path):
    from nl.trainer import train

    train(small_cfg(token_dir, tmp_path / "a", "train.steps=30", "eval.every=0", "checkpoint.every=30"))
    exported = export(tmp_path / "a", tmp_path / "export")
    model = load_pretrained(exported)
    fresh = small_cfg(token_dir, tmp_path / "x")
    from nl.models import build_model

    fresh.model.vocab_size = 1024
    target = build_model(fresh.model, seed=5)
    load_init_weights(target, exported)
    for (n, p), (m, q) in zip(model.state_dict().items(), target.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    train(small_cfg(token_dir, tmp_path / "b", "train.steps=1", "eval.every=0", "checkpoint.every=1",
                    f"train.init_from={exported}"))
    train(small_cfg(token_dir, tmp_path / "c", "train.steps=1", "eval.every=0", "checkpoint.every=1"))
    (a_rows, _), (b_rows, _), (c_rows, _) = (read_metrics(tmp_path / r) for r in "abc")
    # b starts where a ended (a fresh start c sits at ~ln(1024) = 6.93)
    assert b_rows[0]["loss"] < c_rows[0]["loss"] - 0.3, (a_rows[-1]["loss"], b_rows[0]["loss"], c_rows[0]["loss"])
    assert abs(b_rows[0]["loss"] - a_rows[-1]["loss"]) < 0.2


def test_init_from_refuses_a_shape_mismatch(exports, token_dir, tmp_path):
    from nl.trainer import train

    with pytest.raises(ConfigError, match=r"does not fit this model: \S+ is \(\d+, 32\) there, \(\d+, 64\) here") as e:
        train(small_cfg(token_dir, tmp_path / "r", "model.dim=64", f"train.init_from={exports['transformer']}"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="does not fit this model"):  # another architecture
        train(small_cfg(token_dir, tmp_path / "s", f"train.init_from={exports['transformer']}", arch="hope"))
    with pytest.raises(ConfigError, match="written by python -m nl.export"):
        train(small_cfg(token_dir, tmp_path / "t", f"train.init_from={tmp_path / 'nothing'}"))


# ------------------------------------------------------------------ the --output folder ----------

def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_exported_file_is_one_a_reexport_removes(exports):
    from nl.export import EXPORT_FILES

    for name in ("transformer", "hope"):
        assert set(files_under(exports[name])) <= set(EXPORT_FILES), name


def test_reexport_replaces_an_earlier_export_and_keeps_other_files(exports, tmp_path):
    out = tmp_path / "out"
    export(exports["transformer"].parent / "run_transformer", out)
    (out / "NOTES.md").write_text("mine\n")
    (out / "llama" / "mine.txt").write_text("mine too\n")
    export(exports["hope"].parent / "run_hope", out)
    fresh = files_under(export(exports["hope"].parent / "run_hope", tmp_path / "fresh"))
    assert files_under(out) == {**fresh, "NOTES.md": b"mine\n", "llama/mine.txt": b"mine too\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]  # no staging folder left


def test_export_refuses_a_folder_that_holds_no_export_and_writes_nothing(exports, tmp_path):
    from nl.export import main

    texts = tmp_path / "my_texts"
    texts.mkdir()
    (texts / "a.txt").write_text("some text\n")
    with pytest.raises(SystemExit) as exc:
        main(["--run", str(exports["hope"].parent / "run_hope"), "--output", str(texts)])
    message = str(exc.value.code)
    assert "\n" not in message and str(texts) in message and "new or empty folder" in message, message
    assert files_under(tmp_path) == {"my_texts/a.txt": b"some text\n"}
    (texts / "a.txt").unlink()  # empty: written
    assert (export(exports["hope"].parent / "run_hope", texts) / "config.json").is_file()


def test_failed_export_leaves_the_earlier_export_as_it_was(exports, tmp_path, monkeypatch):
    import nl.export

    out = tmp_path / "out"
    export(exports["transformer"].parent / "run_transformer", out)
    before = files_under(out)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nl.export, "write_tokenizer", fail)
    with pytest.raises(OSError, match="No space left"):
        export(exports["hope"].parent / "run_hope", out)
    assert files_under(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
