"""lm-eval on nl exports (issue 13 items 2 and 5): padded batches equal unpadded rows (left and right
padding, every architecture), lm-eval's HFLM gives the same results at batch size 4 as at 1,
`python -m nl.lm_eval` prints the paper's Table 1 columns and writes JSON, bad input ends in one line,
and eval.tasks runs local lm-eval tasks and NIAH inside training. Local tasks only (written here:
a multiple-choice task with acc/acc_norm and a rolling-loglikelihood perplexity task); skipped when
lm-eval or transformers is absent."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from nl.export import load_pretrained
from test_train import read_metrics, small_cfg

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported: local directories only
pytest.importorskip("transformers", reason="transformers is not installed (pip install -r requirements-test.txt)")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-test.txt)")
from test_hf_export import tiny_exports  # noqa: E402  (after the skips: it needs transformers)

ARCHS = {"transformer": ("transformer", []),
         "hope": ("hope", ["model.hope.mixer=self_modifying", "model.hope.chunk_size=8",
                           "model.hope.memory_chunk_size=8"])}
MC_EXAMPLES = [  # question, choices, gold
    ("The capital of France is", ["Paris", "a river", "green", "seven"], 0),
    ("Water freezes at zero degrees", ["Celsius", "purple", "the king", "dogs"], 0),
    ("The history of the city begins in", ["the year 1200", "blue", "run", "of of"], 0),
    ("She played the", ["piano", "the the", "and", "sky it"], 0),
    ("The river flows into the", ["sea", "seven", "were", "quickly quickly"], 0),
    ("He was born in", ["London", "is", "above", "green green"], 0),
    ("The album was released", ["in 1999", "the of", "blue", "cat"], 0),
]
DOCS = ["The history of the city begins in the year 1200.",  # each under 31 tokens: one window
        "The album was released in 1999 in several countries.",
        "Water freezes at zero degrees Celsius.",
        "The species is found in forests of the north."]


def write_local_tasks(root: Path) -> Path:
    """root/tasks/: tiny_mc (multiple_choice: acc, acc_norm) and tiny_ppl (loglikelihood_rolling:
    word_perplexity, byte_perplexity, bits_per_byte), each over a local JSONL file."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    with open(tasks / "mc.jsonl", "w") as f:
        for q, choices, gold in MC_EXAMPLES:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    with open(tasks / "docs.jsonl", "w") as f:
        for text in DOCS:
            f.write(json.dumps({"text": text}) + "\n")
    (tasks / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (tasks / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'docs.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return tasks


@pytest.fixture(scope="module")
def exports(token_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny trained-for-2-steps export per architecture (HOPE: 8-token chunks, so requests cross chunk boundaries)."""
    return tiny_exports(token_dir, tmp_path_factory.mktemp("lmeval"), ARCHS)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory) -> Path:
    return write_local_tasks(tmp_path_factory.mktemp("lmeval_tasks"))


def padded(ids: torch.Tensor, lengths: list[int], side: str) -> torch.Tensor:
    """attention_mask [B, T]: lengths[i] ones at the right end (side='left' padding) or the left end."""
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, ids.shape[1] - n:] = 1
    return mask


def auto_model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_padded_batch_equals_unpadded_rows(exports, name, side):
    hf, ref = auto_model(exports[name]), load_pretrained(exports[name])
    ids = torch.randint(3, 1024, (4, 40), generator=torch.Generator().manual_seed(0))
    lengths = [40, 23, 9, 31]  # HOPE's chunks are 8 tokens: spans end inside and on chunk boundaries
    mask = padded(ids, lengths, side)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, labels=ids)
        rows = [ref(ids[i][mask[i].bool()][None])[0] for i in range(4)]  # each row alone, no padding
    for i, expected in enumerate(rows):
        torch.testing.assert_close(out.logits[i][mask[i].bool()], expected, atol=1e-5, rtol=0)
    # the loss is the mean next-token cross-entropy over real (prediction, target) pairs only
    nll = torch.cat([-r[:-1].log_softmax(-1).gather(-1, ids[i][mask[i].bool()][1:, None])[:, 0]
                     for i, r in enumerate(rows)])
    torch.testing.assert_close(out.loss, nll.mean(), atol=1e-5, rtol=0)


def test_every_call_starts_with_fresh_memories(exports):
    hf = auto_model(exports["hope"])
    a, b = torch.randint(3, 1024, (2, 1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = hf(b).logits
        hf(a)  # an earlier request must leave nothing behind
        after = hf(b).logits
    torch.testing.assert_close(after, alone, atol=0, rtol=0)


def test_left_padded_generate_equals_each_row_alone(exports):
    hf = auto_model(exports["hope"])
    ids = torch.randint(3, 1024, (3, 12), generator=torch.Generator().manual_seed(2))
    lengths = [12, 5, 9]
    mask = padded(ids, lengths, "left")
    got = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    for i, n in enumerate(lengths):
        alone = hf.generate(ids[i:i + 1, 12 - n:], max_new_tokens=6, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
        assert got[i, 12:].tolist() == alone[0, n:].tolist()


def test_mask_with_a_hole_is_refused(exports):
    hf = auto_model(exports["transformer"])
    with pytest.raises(ValueError, match="contiguous span"):
        hf(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))


@pytest.mark.parametrize("name", list(ARCHS))
def test_lm_eval_batch_of_4_equals_one_at_a_time(exports, local_tasks, name):
    from nl.lm_eval import load_export, metrics, run_tasks

    model, tokenizer, seq_len = load_export(exports[name])
    runs = [metrics(run_tasks(model, tokenizer, ["tiny_mc", "tiny_ppl"], batch_size=b, max_length=seq_len,
                              include_path=str(local_tasks))) for b in (1, 4)]
    one, four = runs
    assert set(one["tiny_mc"]) >= {"acc", "acc_norm"} and set(one["tiny_ppl"]) >= {"word_perplexity"}
    assert one["tiny_mc"] == four["tiny_mc"]  # the same choice wins every example
    for metric, value in one["tiny_ppl"].items():
        assert math.isfinite(value) and four["tiny_ppl"][metric] == pytest.approx(value, rel=1e-5), metric


def test_lm_eval_word_perplexity_is_the_models_own(exports, local_tasks):
    """tiny_ppl's word perplexity = exp(total NLL of the documents / their words), the NLL computed here
    from the nl model directly: one window each (documents are shorter than seq_len), the first token
    predicted from EOS alone (the document separator nl trains with)."""
    from nl.lm_eval import load_export, metrics, run_tasks

    model, tokenizer, seq_len = load_export(exports["hope"])
    got = metrics(run_tasks(model, tokenizer, ["tiny_ppl"], batch_size=2, max_length=seq_len,
                            include_path=str(local_tasks)))["tiny_ppl"]["word_perplexity"]
    ref = load_pretrained(exports["hope"])
    prefix = tokenizer.eos_token_id
    total, words = 0.0, 0
    for text in DOCS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) < seq_len
        x = torch.tensor([[prefix] + ids])
        with torch.no_grad():
            logp = ref(x)[0, :-1].log_softmax(-1)
        total += -logp.gather(-1, x[0, 1:, None]).sum().item()
        words += len(text.split())
    assert got == pytest.approx(math.exp(total / words), rel=1e-4)


def test_table1_columns_and_average():
    from nl.lm_eval import markdown, table1

    per_task = {"wikitext": {"word_perplexity": 31.5}, "piqa": {"acc": 0.6, "acc_norm": 0.9},
                "arc_challenge": {"acc": 0.1, "acc_norm": 0.3}, "tiny_mc": {"acc": 0.25}}
    row = table1(per_task)
    assert row["Wiki ppl"] == 31.5 and row["PIQA acc"] == 0.6 and row["ARC-c acc_norm"] == 0.3
    assert row["LMB ppl"] is None and row["BoolQ acc"] is None
    assert row["Avg acc"] == pytest.approx((0.6 + 0.3) / 2)  # accuracies that were run; ppl excluded
    lines = markdown(row, per_task, "m").splitlines()
    assert lines[0].startswith("| Model | Wiki ppl | LMB ppl | LMB acc | PIQA acc | Hella acc_norm | Wino acc |")
    assert lines[2] == "| m | 31.50 | - | - | 60.0 | - | - | - | 30.0 | - | - | 45.0 |"
    assert "| tiny_mc | acc | 0.2500 |" in lines  # tasks outside the paper's set: every metric


def test_cli_prints_table_and_writes_json(exports, local_tasks, tmp_path, capsys):
    from nl.lm_eval import main

    out = tmp_path / "res" / "lm_eval.json"
    result = main(["--model", str(exports["transformer"]), "--tasks", "tiny_mc", "tiny_ppl", "--limit", "5",
                   "--batch-size", "4", "--include-path", str(local_tasks), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| Model | Wiki ppl |" in printed and "| tiny_mc | acc_norm |" in printed
    saved = json.loads(out.read_text())
    assert saved["table1"]["PIQA acc"] is None and saved["max_length"] == 32
    assert saved["metrics"]["tiny_mc"] == result["metrics"]["tiny_mc"]
    assert saved["results"]["tiny_mc"]["sample_len"] == 5  # --limit reached lm-eval


def test_cli_bad_input_is_one_line(exports, local_tasks, tmp_path):
    from nl.lm_eval import main

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"^error: .*lacks model.safetensors.*python -m nl.export"):
        main(["--model", str(incomplete), "--tasks", "tiny_mc", "--include-path", str(local_tasks)])
    with pytest.raises(SystemExit, match=r"^error: --include-path .* is not a directory"):
        main(["--model", str(exports["hope"]), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"^error: --batch-size and --limit must be >= 1"):
        main(["--model", str(exports["hope"]), "--tasks", "tiny_mc", "--include-path", str(local_tasks),
              "--batch-size", "0"])


def test_a_continuation_longer_than_max_length_is_one_line_naming_the_request_and_the_fix(exports, local_tasks):
    """lm-eval's HFLM stops on a bare assert there; nl.lm_eval names the task, the document and the
    --max-length that fits, before any request runs, and that --max-length works."""
    from nl.cli import UsageError
    from nl.lm_eval import load_export, run_tasks, task_manager

    model, tokenizer, _ = load_export(exports["transformer"])
    manager = task_manager(["tiny_mc"], str(local_tasks))
    with pytest.raises(UsageError) as error:
        run_tasks(model, tokenizer, ["tiny_mc"], limit=1, max_length=1, manager=manager)
    found = re.fullmatch(r"tiny_mc doc 0: its continuation '.+' is (\d+) tokens, longer than --max-length 1 "
                         r"\([1-4] request\(s\) are\): pass --max-length \1 or more", str(error.value))
    assert found, error.value
    results = run_tasks(model, tokenizer, ["tiny_mc"], limit=1, max_length=int(found[1]), manager=manager)
    assert results["tiny_mc"]["acc,none"] in (0.0, 1.0)


def test_a_run_folder_as_model_suggests_an_export_beside_the_others(tmp_path):
    from nl.data.shards import DataError
    from nl.lm_eval import load_export

    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(DataError, match=r"is a training run.*--run .*mine --output exports/mine"):
        load_export(run)


def test_task_manager_uses_no_deprecated_lm_eval_argument(local_tasks):
    """lm-eval 0.4.13 deprecates TaskManager's verbosity argument (a DeprecationWarning on every run of the CLI)."""
    import warnings

    from nl.lm_eval import task_manager

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert "tiny_mc" in task_manager(["tiny_mc"], str(local_tasks)).all_tasks


@pytest.mark.slow  # indexes lm-eval's ~15K bundled task YAMLs: ~45 s on 2 busy cores
def test_unknown_task_is_one_line(exports, local_tasks):
    from nl.lm_eval import main

    with pytest.raises(SystemExit, match=r"^error: unknown lm-eval task 'tiny_mcq' .*lm_eval ls tasks"):
        main(["--model", str(exports["hope"]), "--tasks", "tiny_mc", "tiny_mcq", "--include-path", str(local_tasks)])


def test_eval_tasks_in_the_training_loop(token_dir, local_tasks, tmp_path):
    from nl.trainer import train

    run = tmp_path / "run"
    train(small_cfg(token_dir, run, "train.steps=4", "eval.every=2", "checkpoint.every=4",
                    "eval.tasks=[tiny_mc,tiny_ppl,niah:192]", "eval.task_limit=3",
                    f"eval.task_include_path={local_tasks}"))
    _, val_rows = read_metrics(run)
    assert [r["step"] for r in val_rows] == [2, 4]
    for row in val_rows:
        assert 0.0 <= row["eval/tiny_mc/acc"] <= 1.0 and 0.0 <= row["eval/tiny_mc/acc_norm"] <= 1.0
        assert row["eval/tiny_ppl/word_perplexity"] > 1.0
        assert row["eval/niah:192/accuracy"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # 5 depths x 3 prompts: /15
        assert row["eval/niah:192/accuracy"] * 15 == pytest.approx(round(row["eval/niah:192/accuracy"] * 15))


def test_eval_tasks_leave_training_unchanged(token_dir, local_tasks, tmp_path):
    """The in-loop evaluation neither changes the weights nor the random numbers training draws."""
    from nl.trainer import train

    runs = {}
    for name, extra in {"plain": [], "tasks": ["eval.tasks=[tiny_mc]", "eval.task_limit=2",
                                                f"eval.task_include_path={local_tasks}"]}.items():
        train(small_cfg(token_dir, tmp_path / name, "train.steps=4", "eval.every=2", "checkpoint.every=4", *extra,
                        arch="hope"))
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)[0]]
    assert runs["tasks"] == runs["plain"]


def test_eval_tasks_config_errors(token_dir, local_tasks, tmp_path):
    from nl.config import ConfigError
    from nl.trainer import train

    with pytest.raises(ConfigError, match=r"niah:<LENGTH>"):
        small_cfg(token_dir, tmp_path / "a", "eval.tasks=[niah:abc]")
    with pytest.raises(ConfigError, match=r"eval.every=0"):
        small_cfg(token_dir, tmp_path / "b", "eval.tasks=[niah:64]", "eval.every=0")
    with pytest.raises(ConfigError, match=r"niah:64: length 64 is too short .* lengths > "):
        train(small_cfg(token_dir, tmp_path / "c", "eval.tasks=[niah:64]"))
    with pytest.raises(ConfigError, match=r"dist.strategy=single or ddp"):
        train(small_cfg(token_dir, tmp_path / "c", "eval.tasks=[niah:64]", "dist.strategy=fsdp"))
    assert not (tmp_path / "c" / "metrics.jsonl").exists()


LONG_ANSWER = ("the old stone bridge that crosses the wide river near the market square of the town, "
               "built by hand in the year 1200 and rebuilt twice after the floods of the spring")


def write_long_task(root: Path) -> Path:
    """root/tasks/tiny_long: multiple_choice like tiny_mc, its docs 0 and 1 short, doc 2 with one choice
    (LONG_ANSWER) longer than small_cfg's data.seq_len 32 in tokens."""
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    with open(tasks / "long.jsonl", "w") as f:
        for q, choices, gold in [*MC_EXAMPLES[:2], ("The history of the city begins with", ["blue", LONG_ANSWER], 1)]:
            f.write(json.dumps({"question": q, "choices": choices, "gold": gold}) + "\n")
    text = (write_local_tasks(root) / "tiny_mc.yaml").read_text()
    (tasks / "tiny_long.yaml").write_text(text.replace("task: tiny_mc", "task: tiny_long")
                                          .replace(str(tasks / "mc.jsonl"), str(tasks / "long.jsonl")))
    (tasks / "tiny_mc.yaml").unlink()
    (tasks / "tiny_ppl.yaml").unlink()
    return tasks


LONG_REFUSAL = (r"eval.tasks: tiny_long doc 2: its continuation ' the old stone bridge that crosses th\.\.\.' is (\d+) "
                r"tokens, longer than data.seq_len 32 \(1 request\(s\) are\), and lm-eval cannot score it: raise "
                r"data.seq_len to \1 or more, or drop tiny_long from eval.tasks, or set eval.task_limit=2 \(the "
                r"documents before doc 2 fit\)")


def test_a_continuation_longer_than_seq_len_stops_training_before_the_first_step(token_dir, tmp_path):
    """lm-eval cannot score a continuation longer than its window (data.seq_len): refused at the start,
    naming the task, the document, the token count and the fixes (was: at the first validation step,
    naming --max-length); each fix passes: data.seq_len = that count, eval.task_limit=2."""
    from nl.config import ConfigError
    from nl.lm_eval import InLoopTasks
    from nl.trainer import train

    tasks = write_long_task(tmp_path)
    run = tmp_path / "run"
    args = ("eval.tasks=[tiny_long]", f"eval.task_include_path={tasks}")
    with pytest.raises(ConfigError) as error:
        train(small_cfg(token_dir, run, *args))
    found = re.fullmatch(LONG_REFUSAL, str(error.value))
    assert found, error.value
    assert not run.exists()  # before run.dir is created
    for fix in (f"data.seq_len={found[1]}", "eval.task_limit=2"):
        assert InLoopTasks(small_cfg(token_dir, run, *args, fix), token_dir / "tokenizer.model").lm_tasks


def test_a_long_continuation_at_eval_time_counts_as_lm_eval_does_and_names_data_seq_len(token_dir, tmp_path):
    """The start check counts tokens as lm-eval's HFLM does (its own refusal at eval time, reached here
    by raising eval.task_limit after the check, names the same count), and that refusal is in training's
    words (data.seq_len, not --max-length)."""
    from nl.config import ConfigError
    from nl.lm_eval import InLoopTasks
    from nl.models import build_model

    tasks = write_long_task(tmp_path)
    cfg = small_cfg(token_dir, tmp_path / "run", "eval.tasks=[tiny_long]", f"eval.task_include_path={tasks}",
                    "model.vocab_size=1024")
    with pytest.raises(ConfigError) as error:
        InLoopTasks(cfg, token_dir / "tokenizer.model")
    n = re.fullmatch(LONG_REFUSAL, str(error.value))[1]
    cfg.eval.task_limit = 2
    in_loop = InLoopTasks(cfg, token_dir / "tokenizer.model")
    cfg.eval.task_limit = 3  # doc 2 now runs, unchecked
    with pytest.raises(ConfigError, match=rf"^eval.tasks: tiny_long doc 2: its continuation '.+' is {n} tokens, "
                                          rf"longer than data.seq_len 32 \(1 request\(s\) are\): raise data.seq_len "
                                          rf"to {n} or more$"):
        in_loop(build_model(cfg.model, seed=0))


@pytest.mark.slow  # indexes lm-eval's ~15K bundled task YAMLs: ~45 s on 2 busy cores
def test_unknown_eval_task_stops_before_the_first_step(token_dir, local_tasks, tmp_path):
    from nl.config import ConfigError
    from nl.trainer import train

    with pytest.raises(ConfigError, match=r"eval.tasks: unknown lm-eval task 'tiny_mcq'.*eval.task_include_path"):
        train(small_cfg(token_dir, tmp_path / "run", "eval.tasks=[tiny_mcq]", f"eval.task_include_path={local_tasks}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow  # lm-eval's own CLI indexes its ~15K bundled task YAMLs: ~60 s on 2 busy cores
def test_plain_lm_eval_cli_on_an_export_gives_our_numbers(exports, local_tasks, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,...` reads an export as it is;
    with our window (max_length = seq_len) and prefix token (EOS) it gives python -m nl.lm_eval's numbers."""
    import subprocess
    import sys

    from nl.lm_eval import main

    path = exports["hope"]
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    ours = main(["--model", str(path), "--tasks", "tiny_mc", "tiny_ppl", "--include-path", str(local_tasks),
                 "--batch-size", "4"])["metrics"]
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={path},trust_remote_code=True,prefix_token_id={eos},max_length=32",
                    "--tasks", "tiny_mc,tiny_ppl", "--include_path", str(local_tasks), "--batch_size", "4",
                    "--output_path", str(tmp_path / "out")],
                   check=True, env={**os.environ, "HF_HOME": str(tmp_path / "hf")}, capture_output=True)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert results["tiny_mc"]["acc,none"] == ours["tiny_mc"]["acc"]
    assert results["tiny_mc"]["acc_norm,none"] == ours["tiny_mc"]["acc_norm"]
    assert results["tiny_ppl"]["word_perplexity,none"] == pytest.approx(ours["tiny_ppl"]["word_perplexity"],
                                                                        rel=1e-5)


@pytest.mark.slow  # a 2-rank torchrun launch: ~1 min on 2 busy cores
def test_eval_tasks_under_ddp_run_on_rank_0_while_rank_1_waits(token_dir, local_tasks, tmp_path):
    from test_distributed import launch

    run = tmp_path / "run"
    launch(2, token_dir, run, "dist.strategy=ddp", "eval.tasks=[tiny_mc,niah:192]", "eval.task_limit=2",
           f"eval.task_include_path={local_tasks}")
    _, val_rows = read_metrics(run)
    assert [r["step"] for r in val_rows] == [5, 10]  # one row per eval step: rank 0 writes, rank 1 waited
    assert all({"val_loss", "eval/tiny_mc/acc", "eval/niah:192/accuracy"} <= set(r) for r in val_rows)
