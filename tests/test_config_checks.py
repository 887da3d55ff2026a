"""Bad config input is refused in one line naming the problem and the fix, before run.dir is created
or touched: YAML syntax, the shape of a preset, malformed overrides, unresolvable interpolations,
out-of-range numbers, an unusable run.dir; and validation without a val split says so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nl.config import ConfigError, load_config
from test_cli import _train_module
from test_train import small_cfg
from nl.trainer import train


def refused(*args: str) -> str:
    """train.py ARGS in this process: its `error: ...` line (it must exit that way, in one line)."""
    with pytest.raises(SystemExit) as exit_:
        _train_module().main(list(args))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("text,match", [
    ("model:\n  dim: [64\n", r"a\.yaml is not valid YAML: line 3, column 1: expected ',' or '\]'.*starts at line 2"),
    ("model:\n\tdim: 64\n", r"a\.yaml is not valid YAML: line 2, column 1: .*indent with spaces, not tabs"),
    ("5\n", r"a\.yaml holds a single value at its top level: it must be a mapping of sections"),
    ("- train\n- model\n", r"a\.yaml holds a list at its top level: it must be a mapping of sections"),
])
def test_a_bad_config_file_is_refused_naming_the_file_and_line(tmp_path, text, match):
    path = tmp_path / "a.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_a_directory_as_config_file_is_named_a_directory():
    with pytest.raises(ConfigError, match=r"config file configs is a directory: pass a YAML file, e\.g\. "
                                          r"--config configs/\S+\.yaml"):
        load_config("configs")


def test_print_config_refuses_a_yaml_error_in_one_line(tmp_path, capsys):
    path = tmp_path / "tab.yaml"
    path.write_text("train:\n\tsteps: 3\n")
    assert "tab.yaml is not valid YAML: line 2" in refused("--config", str(path), "--print-config")
    assert capsys.readouterr().out == ""


def test_a_malformed_list_override_is_refused():
    with pytest.raises(ConfigError, match=r"override 'model\.hope\.cms_chunk_sizes=\[1,2': its value is not valid "
                                          r"YAML .*close brackets and quotes"):
        load_config("configs/tiny.yaml", ["model.hope.cms_chunk_sizes=[1,2"])


def test_interpolations_are_resolved_or_refused_at_load(tmp_path, capsys):
    cfg = load_config("configs/tiny.yaml", ["train.steps=${train.log_every}", "data.dir=${run.dir}/tokens"])
    assert cfg.train.steps == cfg.train.log_every and cfg.data.dir == f"{cfg.run.dir}/tokens"
    with pytest.raises(ConfigError, match=r"train\.steps=\$\{oops\}: the interpolation does not resolve "
                                          r"\(Interpolation key 'oops' not found\)"):
        load_config("configs/tiny.yaml", ["train.steps=${oops}"])
    with pytest.raises(ConfigError, match=r"data\.sources=.*\$\{nope\}.*does not resolve"):
        load_config("configs/tiny.yaml", ["data.sources=[{dir: '${nope}'}]"])
    assert "train.steps=${oops}" in refused("--config", "configs/tiny.yaml", "train.steps=${oops}", "--print-config")
    assert capsys.readouterr().out == ""
    run = tmp_path / "run"
    refused("--config", "configs/tiny.yaml", "train.steps=${oops}", f"run.dir={run}")
    assert not run.exists()


@pytest.mark.parametrize("override,expected", [
    ("train.steps=0", "a positive number of optimizer steps"),
    ("train.steps=-5", "a positive number of optimizer steps"),
    ("train.batch_size=0", "a positive number of sequences"),
    ("train.micro_batch_size=-1", "0 (the whole per-rank batch)"),
    ("train.lr=-1", "a learning rate >= 0"),
    ("train.lr=nan", "a learning rate >= 0"),
    ("train.warmup_steps=-3", "0 (no warmup)"),
    ("train.grad_clip=-1", "0 (no clipping)"),
    ("train.min_lr_ratio=2", "a ratio in [0, 1]"),
    ("train.decay_fraction=1.5", "a fraction of train.steps in [0, 1]"),
    ("train.log_every=0", "a positive number of steps"),
    ("optim.weight_decay=-1", "0 (no weight decay)"),
    ("optim.beta2=1", "an EMA coefficient in [0, 1)"),
    ("eval.every=-1", "0 (no periodic validation)"),
    ("eval.max_batches=-1", "0 (the whole val split)"),
    ("checkpoint.every=-10", "0 (save at the end only)"),
    ("checkpoint.keep_last=-1", "0 (keep every checkpoint)"),
    ("checkpoint.load_step=-1", "0 (the latest checkpoint)"),
    ("dist.timeout_s=0", "a positive number of seconds"),
])
def test_out_of_range_numbers_are_refused(override, expected):
    key, value = override.split("=")
    pattern = rf"^{re.escape(key)}={value}(\.0)? is out of range: pass {re.escape(expected)}"
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config("configs/tiny.yaml", [override])
    assert "\n" not in str(err.value)


def test_zero_keeps_its_documented_meaning():
    cfg = load_config("configs/tiny.yaml", ["train.lr=0", "train.warmup_steps=0", "train.grad_clip=0",
                                            "train.micro_batch_size=0", "train.min_lr_ratio=0", "eval.every=0",
                                            "eval.max_batches=0", "checkpoint.every=0", "checkpoint.keep_last=0",
                                            "optim.weight_decay=0"])
    assert cfg.train.lr == 0 and cfg.eval.max_batches == 0


def test_a_run_dir_that_cannot_be_a_directory_is_refused(token_dir, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    base = ("--config", "configs/tiny.yaml", f"data.dir={token_dir}", "data.seq_len=32", "train.batch_size=8")
    assert f"run.dir={file} is an existing file, not a directory" in refused(*base, f"run.dir={file}")
    assert file.read_text() == "mine\n"
    assert "cannot be created (Not a directory)" in refused(*base, f"run.dir={file}/run")
    assert "/proc/nlrun cannot be created" in refused(*base, "run.dir=/proc/nlrun")


def test_a_refused_model_config_leaves_run_dir_uncreated(token_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="model.n_heads must be positive, got 0"):
        train(small_cfg(token_dir, run, "model.n_heads=0"))
    assert not run.exists()


def test_validation_without_a_val_split_says_so(token_dir, tmp_path, capsys):
    from data_prep.tokenize_corpus import tokenize_corpus

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "line {i} of a small corpus with no val split at all."}}\n'
                              for i in range(400)))
    noval = tmp_path / "noval"
    tokenize_corpus([str(corpus)], Path(token_dir) / "tokenizer.model", noval, val_fraction=0.0, num_workers=1)
    capsys.readouterr()
    summary = train(small_cfg(noval, tmp_path / "run", "train.steps=2", "eval.every=1", "checkpoint.every=0"))
    assert summary["val_loss"] is None
    out = capsys.readouterr().out
    assert out.count(f"validation: data.dir {noval} has no val split") == 1, out


def _export_like(token_dir: Path, folder: Path, *overrides: str, fingerprint: str | None = None) -> Path:
    """A folder train.init_from accepts (model.safetensors and config.json, as nl.export writes them)
    of the small_cfg model with `overrides`, recording `fingerprint` (default: token_dir's tokenizer's)."""
    import json

    from safetensors.torch import save_model

    from nl.config import to_dict
    from nl.data.shards import TokenShards
    from nl.models import build_model

    cfg = small_cfg(token_dir, folder / "unused", "model.vocab_size=1024", *overrides)  # token_dir's
    folder.mkdir(parents=True)
    save_model(build_model(cfg.model, seed=0), str(folder / "model.safetensors"))
    fingerprint = fingerprint or TokenShards(token_dir, "train").fingerprint
    (folder / "config.json").write_text(json.dumps({"model": to_dict(cfg)["model"],
                                                    "tokenizer_fingerprint": fingerprint}))
    return folder


def test_a_refused_init_from_leaves_run_dir_as_it_was(token_dir, tmp_path):
    """Another shape or tokenizer is refused before run.dir is created, or touched when it exists;
    a resume ignores train.init_from, as before."""
    wider = _export_like(token_dir, tmp_path / "wider", "model.dim=64")
    other_tok = _export_like(token_dir, tmp_path / "other_tok", fingerprint="0" * 64)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"does not fit this model: \S+ is \(\d+, 64\) there, \(\d+, 32\) here"):
        train(small_cfg(token_dir, run, f"train.init_from={wider}"))
    assert not run.exists()
    with pytest.raises(ConfigError, match=r"was trained with another tokenizer \(fingerprint 000000000000\)"):
        train(small_cfg(token_dir, run, f"train.init_from={other_tok}"))
    assert not run.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match="does not fit this model"):
        train(small_cfg(token_dir, existing, f"train.init_from={wider}"))
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]

    fits = _export_like(token_dir, tmp_path / "fits")
    one_step = ("train.steps=1", "eval.every=0", "checkpoint.every=1")
    assert train(small_cfg(token_dir, run, *one_step, f"train.init_from={fits}"))["step"] == 1
    summary = train(small_cfg(token_dir, run, "train.steps=2", "eval.every=0", "checkpoint.every=1",
                              "checkpoint.resume=true", f"train.init_from={wider}"))
    assert summary["step"] == 2  # resumed from step 1: the mismatched init_from is not looked at


def test_a_refused_eval_task_leaves_run_dir_uncreated(token_dir, tmp_path, monkeypatch):
    import nl.lm_eval
    from nl.cli import UsageError

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"niah:64: length 64 is too short"):
        train(small_cfg(token_dir, run, "eval.tasks=[niah:64]"))
    assert not run.exists()

    def unknown(tasks, include_path=None):  # what task_manager says, without indexing lm-eval's ~15K task YAMLs
        raise UsageError(f"unknown lm-eval task {tasks[0]!r} (not in lm-eval): check the name with `lm_eval ls "
                         f"tasks`, or pass --include-path DIR with its YAML")

    monkeypatch.setattr(nl.lm_eval, "task_manager", unknown)
    with pytest.raises(ConfigError, match=r"eval.tasks: unknown lm-eval task 'tiny_mcq'.*eval.task_include_path"):
        train(small_cfg(token_dir, run, "eval.tasks=[tiny_mcq]"))
    assert not run.exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_process_group_left():
    """dist.strategy=deepspeed makes a private 1-rank process group at start; a refused start leaves it."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_refused_resumes_and_strategies_leave_run_dir_as_it_was(token_dir, tmp_path, monkeypatch,
                                                                 no_process_group_left):
    """Refusals that came after config.yaml (and ds_config.json) were rewritten: a checkpoint of another
    strategy, a shape only the checkpoint's tensors show, train.compile with deepspeed; and deepspeed or
    wandb not installed, which came after run.dir was created. One config, changed between the attempts
    (a load_config per attempt would double this test's time)."""
    import sys
    import types

    from nl.checkpoint import CheckpointError

    run = tmp_path / "run"
    cfg = small_cfg(token_dir, run, "train.steps=1", "eval.every=0", "checkpoint.every=1")
    train(cfg)
    ckpt = run / "checkpoints" / "step_00000001"
    cfg.train.steps = 2  # every attempt's config.yaml differs from the saved one
    before = _files(run)
    # DeepSpeed importable without loading it (~5 s): the refusals come before anything would call it.
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    cfg.dist.strategy = "deepspeed"
    with pytest.raises(CheckpointError, match=r"written by dist.strategy=single/ddp/fsdp \(DCP format\)"):
        train(cfg)
    cfg.train.compile = True
    with pytest.raises(ConfigError, match="train.compile=true with dist.strategy=deepspeed is not supported"):
        train(cfg)
    cfg.train.compile, cfg.dist.strategy = False, "single"
    assert _files(run) == before
    (ckpt / "config.yaml").rename(tmp_path / "config.yaml")  # a checkpoint without its config: shapes tell
    before = _files(run)
    cfg.model.dim = 64
    with pytest.raises(CheckpointError, match=r"was written by a different model shape") as err:
        train(cfg)
    assert "\n" not in str(err.value) and _files(run) == before
    cfg.model.dim = 32
    (tmp_path / "config.yaml").rename(ckpt / "config.yaml")
    (ckpt / "deepspeed.json").write_text('{"strategy": "deepspeed", "zero_stage": 1, "world_size": 1}\n')
    before = _files(run)
    with pytest.raises(CheckpointError, match=r"written by dist.strategy=deepspeed: resume it with"):
        train(cfg)
    assert _files(run) == before

    cfg.run.dir = str(tmp_path / "fresh")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    cfg.dist.strategy = "deepspeed"
    with pytest.raises(ConfigError, match=r"dist.strategy=deepspeed needs the deepspeed package"):
        train(cfg)
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg.dist.strategy, cfg.wandb.enabled = "single", True
    with pytest.raises(ConfigError, match=r"wandb.enabled=true but the wandb package is not installed"):
        train(cfg)
    assert not (tmp_path / "fresh").exists()


def test_a_wandb_that_cannot_start_is_refused_in_one_line_and_keeps_the_metrics(tmp_path, monkeypatch):
    import sys
    import types

    from nl.config import WandbConfig
    from nl.metrics import MetricsLogger

    def no_key(dir, **kwargs):  # as wandb 0.31 does before it fails: its logs under dir/wandb
        logs = Path(dir) / "wandb" / "run-1-abc" / "logs"
        logs.mkdir(parents=True)
        (logs / "debug.log").write_text("...")
        (Path(dir) / "wandb" / "debug.log").write_text("...")
        raise RuntimeError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=no_key))
    records = "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(records)
    with pytest.raises(ConfigError, match=r"wandb could not start \(RuntimeError: No API key configured.; Use "
                                          r"`wandb login` to log in.\): .*wandb.enabled=false") as err:
        MetricsLogger(tmp_path, wandb_cfg=WandbConfig(enabled=True, mode="online"), start_step=1)
    assert "\n" not in str(err.value)
    assert (tmp_path / "metrics.jsonl").read_text() == records  # not cut back to step 1 for a run that never began
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # nothing of the failed start is left
    (tmp_path / "wandb" / "run-0-old").mkdir(parents=True)  # a resumed run's earlier wandb runs are kept
    with pytest.raises(ConfigError, match="wandb could not start"):
        MetricsLogger(tmp_path, wandb_cfg=WandbConfig(enabled=True, mode="online"), start_step=1)
    assert [p.name for p in (tmp_path / "wandb").iterdir()] == ["run-0-old"]


def test_under_torchrun_a_refusal_is_printed_by_rank_0_and_in_each_ranks_error_file(tmp_path, monkeypatch, capsys):
    """Every rank of a torchrun launch hits the same bad config: rank 0 prints its line, the others exit 1
    quietly, and each writes it to its torchrun error file, which torchrun's failure summary shows."""
    import json

    main = _train_module().main
    bad = ["--config", "configs/tiny.yaml", "train.stpes=1"]
    line = "error: unknown config key 'train.stpes'"
    for rank, printed in (("1", False), ("0", True)):
        error_file = tmp_path / f"error_{rank}.json"
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
        with pytest.raises(SystemExit) as exit_:
            main(bad)
        code = exit_.value.code
        assert (isinstance(code, str) and code.startswith(line)) if printed else code == 1, code
        assert json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"].startswith(line)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")  # a rank no torchrun summary reports prints its own line
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit, match=re.escape(line)):
        main(bad)
