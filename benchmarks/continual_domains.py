"""Split the demo corpus into topic domains for `python -m nl.continual` (docs/BENCHMARKS.md).

    python benchmarks/continual_domains.py [--corpus data/demo/corpus.jsonl] [--out data/continual]

Writes OUT/{places,people,general}.jsonl by a keyword rule on each article's opening (a rough
topic classifier, not a curated one): places = geography words (city, river, country in, ...) in
the first 300 characters; people = a life-span or birth date in parentheses, or "was/is a
<occupation>", in the first 400 characters (checked first); general = the first --general-docs of
the rest. Then tokenizes each with the demo tokenizer (data_prep/tokenize_corpus.py, 10% val) into
OUT/<domain>/tokens, so every domain shares one tokenizer.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PEOPLE = re.compile(r"\((born |[^()]*\b1?[0-9]{3}\s*[–-]\s*(c\. )?1?[0-9]{3}\b)|\b(was|is) an? ([A-Z][a-z]+ )*"
                    r"(actor|actress|singer|politician|writer|footballer|musician|painter|poet|philosopher|"
                    r"composer|player|scientist|mathematician|physicist|chemist|king|queen|emperor|author)")
PLACES = re.compile(r"\b(city|town|village|municipality|county|province|capital|river|island|located in|"
                    r"country in|region of|district)\b")


def topic(text: str) -> str:
    """"people", "places" or "general" for one article (title + extract) by the rule above."""
    return "people" if PEOPLE.search(text[:400]) else "places" if PLACES.search(text[:300]) else "general"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/demo/corpus.jsonl")
    ap.add_argument("--tokenizer", default="data/demo/tokenizer.model")
    ap.add_argument("--out", default="data/continual")
    ap.add_argument("--general-docs", type=int, default=1500)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    domains: dict[str, list[str]] = {"places": [], "people": [], "general": []}
    for line in Path(args.corpus).read_text(encoding="utf-8").splitlines():
        domains[topic(json.loads(line)["text"])].append(line)
    domains["general"] = domains["general"][:args.general_docs]
    for name, lines in domains.items():
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        subprocess.run([sys.executable, "data_prep/tokenize_corpus.py", "--input", str(out / f"{name}.jsonl"),
                        "--tokenizer", args.tokenizer, "--output", str(out / name / "tokens"),
                        "--val-fraction", "0.1", "--overwrite"], check=True)
        print(f"{name}: {len(lines)} articles, {sum(map(len, lines)) / 1e6:.2f} MB of jsonl")


if __name__ == "__main__":
    main()
