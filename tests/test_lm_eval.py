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
from pathlib import Path

import pytest
import torch

from nl.export import export, load_pretrained
from test_train import read_metrics, small_cfg

os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported: local directories only
pytest.importorskip("transformers", reason="transformers is not installed (pip install -r requirements-test.txt)")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements-test.txt)")

ARCHS = {"transformer": ("transformer", []), "hope": ("hope", ["model.hope.mixer=self_modifying", "model.hope.chunk_size=8",
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
DOCS = ["The history of the city begins in the year 1200, when a small market town grew on the river.",
        "The album was released in 1999 and reached the top of the charts in several countries.",
        "Water is a chemical compound of hydrogen and oxygen; it freezes at zero degrees Celsius.",
        "The species is found in forests and grasslands of the northern part of the continent."]


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
    """A tiny trained-for-2-steps export per architecture (HOPE: chunks of 8 tokens, so requests cross chunk boundaries)."""
    from nl.trainer import train

    root = tmp_path_factory.mktemp("lmeval")
    out = {}
    for name, (arch, extra) in ARCHS.items():
        train(small_cfg(token_dir, root / f"run_{name}", "train.steps=2", "eval.every=0", "checkpoint.every=2",
                        *extra, arch=arch))
        out[name] = export(root / f"run_{name}", root / f"export_{name}")
    return out


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
