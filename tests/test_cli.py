"""train.py's command line: every key in --help, --print-config, warnings for keys the run does
not read, intra-op threads per local rank; and the README's Python API block, run as written."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from nl.config import describe_keys, load_config, to_dict, valid_keys
from nl.train_cli import default_threads, set_keys, unread_keys


def _train_module():
    """train.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("train_entry", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_py(capsys, *args: str) -> tuple[str, str]:
    """`python train.py ARGS` in this process (the import of torch is paid once): stdout, stderr."""
    capsys.readouterr()
    _train_module().main(list(args))
    return capsys.readouterr()


def test_help_lists_every_key_with_type_default_and_doc():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--print-config" in out
    for key in valid_keys():
        assert re.search(rf"^  {re.escape(key)}  \S", out, re.M), f"{key} missing from --help"
    # type, choices and default as the schema declares them, and the doc written beside the field
    assert re.search(r"^  train\.steps  int = 200\n      optimizer steps", out, re.M)
    assert "  model.hope.mixer  str {self_modifying|attention|titans} = \"self_modifying\"" in out
    assert "  model.hope.cms_chunk_sizes  list[int] = [1, 16, 256]" in out
    assert re.search(r"^  train\.grad_clip  float = 1\.0\n      max global grad norm; 0 disables clipping$", out, re.M)


def test_every_key_has_a_doc_from_its_field_comment():
    docs = {k.key: k for k in describe_keys()}
    assert list(docs) == valid_keys()
    assert not [key for key, k in docs.items() if not k.doc], "write a comment beside these fields in nl/config.py"
    # a comment block above a field and a trailing comment both count
    assert docs["model.vocab_size"].doc.startswith("0 = take it from the data manifest")
    assert docs["data.dir"].doc == "a data_prep/tokenize_corpus.py output directory"
    assert docs["dist.zero_stage"].choices == (0, 1, 2, 3) and docs["dist.zero_stage"].default == 1


def transformer_parameters(vocab: int, dim: int, layers: int, ffn: int = 0) -> int:
    """Transformer++ by its definition: untied embedding and head (V x d each), per block q, k, v,
    o (d x d) and a SwiGLU of width F (default round_up(8/3 d, 64)) (three d x F matrices), two
    RMSNorm gains per block and a final one; no biases."""
    ffn = ffn or 64 * math.ceil(8 * dim / 3 / 64)
    return 2 * vocab * dim + layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim) + dim


def test_print_config_prints_resolved_config_and_derived_figures_without_training(token_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    args = ["--config", "configs/tiny.yaml", f"data.dir={token_dir}", f"run.dir={run}", "model.dim=64",
            "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=2"]
    out, _ = train_py(capsys, *args, "--print-config", "model.n_layers=3")  # overrides on both sides of an option
    assert not run.exists()  # nothing trained, nothing written
    printed = yaml.safe_load(out)  # the figures are YAML comments: the whole output is a config
    assert printed == to_dict(load_config("configs/tiny.yaml", [*args[2:], "model.n_layers=3"]))
    assert f"# parameters: {transformer_parameters(1024, 64, 3):,} (vocabulary 1,024 from {token_dir}" in out
    assert "# tokens per step: 256 " in out
    # 8 sequences of 2 per micro-batch: 1 rank accumulates 4, 2 ranks 2, 4 ranks 1; 8 ranks cannot
    assert "#   1: 2 x 4\n#   2: 2 x 2\n#   4: 2 x 1\n#   8: refused: per-rank batch 1" in out
    # the printed config runs as a preset
    (tmp_path / "printed.yaml").write_text(out)
    again, _ = train_py(capsys, "--config", str(tmp_path / "printed.yaml"), "--print-config")
    assert again == out


def test_print_config_counts_a_paper_size_preset_on_the_meta_device(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out, _ = train_py(capsys, "--config", "configs/transformer_1.3b.yaml", "--print-config")
    cfg = yaml.safe_load(out)
    m = cfg["model"]
    assert not m["tie_embeddings"]
    count = transformer_parameters(m["vocab_size"], m["dim"], m["n_layers"], ffn=m["ffn_hidden"])
    assert 1.2e9 < count < 1.4e9
    assert f"# parameters: {count:,} (vocabulary {m['vocab_size']:,} from model.vocab_size)" in out
    assert f"# tokens per step: {cfg['train']['batch_size'] * cfg['data']['seq_len']:,} " in out


def test_keys_of_another_architecture_warn(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    _, err = train_py(capsys, "--config", "configs/hope_tiny.yaml", "model.arch=transformer",
                      "model.hope.eta_max=0.25", "dist.zero_stage=2", "--print-config")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    hope = next(w for w in warnings if "model.arch=transformer (only arch 'hope'" in w)
    assert "model.hope.cms_chunk_sizes" in hope and "(set in configs/hope_tiny.yaml)" in hope
    assert "model.hope.eta_max (set on the command line)" in hope
    assert any("optim.cms.lr_scale" in w for w in warnings)  # CMS levels exist in HOPE only
    assert any("dist.zero_stage" in w and "dist.strategy=single" in w for w in warnings)
    # the same keys with the architecture that reads them: silent
    _, err = train_py(capsys, "--config", "configs/hope_tiny.yaml", "model.hope.eta_max=0.05", "--print-config")
    assert "warning" not in err, err


def test_unread_keys_follow_the_mixer_and_optimizer():
    keys = set_keys(["configs/hope_tiny.yaml"], ["model.hope.mixer=attention", "optim.m3.ns_steps=3",
                                                "model.rope_theta=500000"])
    hope_attention = load_config("configs/hope_tiny.yaml", ["model.hope.mixer=attention", "optim.m3.ns_steps=3",
                                                           "model.rope_theta=500000"])
    text = "\n".join(unread_keys(hope_attention, keys))
    assert "model.hope.chunk_size" in text and "mixer=attention" in text  # softmax attention has no memories
    assert "optim.m3.ns_steps" in text and "optim.name=adamw" in text
    assert "rope_theta" not in text and "model.hope.cms_chunk_sizes" not in text  # read by Hope-Attention
    hope = load_config("configs/hope_tiny.yaml", ["model.rope_theta=500000"])
    assert "model.rope_theta" in "\n".join(unread_keys(hope, set_keys(["configs/hope_tiny.yaml"],
                                                                      ["model.rope_theta=500000"])))


def test_unread_keys_of_the_new_switches():
    """Keys read only with another switch on: the in-context CMS's with cms_mode != outer, the compile
    backend with train.compile, the task options with eval.tasks, the memory-health and kernel keys
    with a memory mixer."""
    over = ["model.hope.cms_inner_lr=0.2", "train.compile_backend=aot_eager", "eval.task_limit=5",
            "model.hope.mixer=attention", "model.hope.kernel=torch", "model.hope.chunk_read=anchor"]
    text = "\n".join(unread_keys(load_config("configs/hope_tiny.yaml", over), set_keys(["configs/hope_tiny.yaml"], over)))
    for key, reason in (("model.hope.cms_inner_lr", "cms_mode=outer"), ("train.compile_backend", "train.compile=false"),
                        ("eval.task_limit", "eval.tasks=[]"), ("model.hope.kernel", "mixer=attention"),
                        ("model.hope.chunk_read", "mixer=attention")):
        assert key in text and reason in text, (key, text)
    on = ["model.hope.cms_mode=in_context", "model.hope.cms_inner_lr=0.2", "train.compile=true",
          "train.compile_backend=aot_eager", "model.hope.kernel=torch"]
    assert unread_keys(load_config("configs/hope_tiny.yaml", on), set_keys(["configs/hope_tiny.yaml"], on)) == []


def test_default_threads_are_the_cpus_per_local_rank(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert default_threads({}) == 8
    assert default_threads({"LOCAL_WORLD_SIZE": "2"}) == 4
    assert default_threads({"LOCAL_WORLD_SIZE": "3"}) == 2
    assert default_threads({"LOCAL_WORLD_SIZE": "16"}) == 1  # at least one
    assert default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) is None  # the user's choice


@pytest.mark.parametrize("omp", [None, "3"])
def test_train_py_sets_threads_unless_omp_num_threads_is_set(monkeypatch, omp):
    import nl.trainer

    class Trained(Exception):
        """Raised by the stand-in trainer once it has seen the thread count."""

    def fake_train(cfg):
        raise Trained(torch.get_num_threads())

    monkeypatch.setattr(nl.trainer, "train", fake_train)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(Trained) as trained:
            _train_module().main(["--config", "configs/tiny.yaml"])
    finally:
        torch.set_num_threads(before)
    assert trained.value.args[0] == (3 if omp is None else 1)  # 6 CPUs / 2 local ranks; else as it was


def test_readme_python_api_block_runs_as_written(token_dir, tmp_path, capsys, monkeypatch):
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- python-api -->\n```python\n(.*?)```", readme, re.S).group(1)
    # the block runs from the repo root after `make demo`: give it that layout with the test corpus
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "tokens").symlink_to(token_dir)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    train_loss, val_loss = map(float, re.search(r"train loss ([\d.]+), val loss ([\d.]+)", out).groups())
    assert 0 < val_loss < math.log(1024) + 1 and train_loss > 0  # a real loss of the 1,024-token vocabulary
    assert (tmp_path / "exports" / "api" / "model.safetensors").is_file()
