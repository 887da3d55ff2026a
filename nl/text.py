"""The one text-decoding policy for every place that reads user text (corpus files, prompts).

- A UTF-8 byte-order mark (EF BB BF, U+FEFF) at the start of a file or prompt is dropped: it
  marks the encoding and is not text (kept, it would become 4 tokens of every document).
- Bytes that are not UTF-8 (e.g. a Latin-1 "é", 0xE9) and characters UTF-8 cannot encode (a
  lone UTF-16 surrogate such as the JSON escape "\\ud83d" of a cut-off emoji, or the stand-in
  Python puts in sys.argv for a byte the locale could not decode) become U+FFFD, with one
  warning per source on stderr naming the lines; with strict=True (`--strict-text` on the
  command lines) they are refused with a DataError naming the source and line.
- A UTF-16/UTF-32 file (its byte-order mark FF FE / FE FF) is refused: replacing every other
  byte would only feed garbage to the tokenizer.

Line numbers count "\\n"-separated lines from 1; for a .jsonl file the line is the record's.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

from nl.data.shards import DataError

UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SURROGATE = re.compile("[\ud800-\udfff]")
_LISTED_LINES = 5  # a warning names this many lines, then counts the rest
STRICT_FLAG = "--strict-text"


def warn(message: str) -> None:
    """Print one `warning: ...` line on stderr (the CLIs' channel for input problems they repair)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # clears and redraws a progress bar on the same stream


class TextPolicy:
    """Applies the policy to one source (a file or a prompt), remembering the lines it repaired.

    `source` names it in messages ("corpus.jsonl", "--prompt"); call `report()` once the source
    is read to print the single warning that lists the repaired lines.
    """

    def __init__(self, source: str, strict: bool = False):
        self.source, self.strict = source, strict
        self.repaired_lines: list[int] = []

    def decode_line(self, raw: bytes, line: int) -> str:
        """One line of bytes (no "\\n" inside) -> str; invalid UTF-8 replaced, or refused when strict."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.strict:
                raise DataError(f"{self.source}:{line} is not valid UTF-8 (byte 0x{raw[e.start]:02X} at byte "
                                f"{e.start + 1} of the line): convert the file to UTF-8, or drop {STRICT_FLAG} "
                                f"to replace such bytes with U+FFFD") from None
            self._note(line)
            return raw.decode("utf-8", errors="replace")

    def clean(self, text: str, line: int = 1, record: bool = False) -> str:
        """`text` with lone surrogates replaced (or refused when strict).

        line: where `text` starts in the source; its own newlines count on from there, unless
        `record` (a value parsed from one .jsonl line, which is then the line named)."""
        try:
            text.encode("utf-8")  # the common case, checked at C speed (~10x a regex search)
            return text
        except UnicodeEncodeError as e:
            first = e.start  # only surrogates are unencodable in UTF-8
        if self.strict:
            at = line if record else line + text.count("\n", 0, first)
            code = ord(text[first])
            # U+DC80-U+DCFF is how Python hands over a byte of sys.argv or a file name that was not UTF-8 (PEP 383).
            why = (f"standing for the byte 0x{code - 0xDC00:02X}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF
                   else f"half of a cut-off character, e.g. a JSON escape \\u{code:04x}")
            raise DataError(f"{self.source}:{at} holds U+{code:04X}, a lone UTF-16 surrogate ({why}) that UTF-8 "
                            f"cannot encode: fix the text, or drop {STRICT_FLAG} to replace it with U+FFFD")
        for m in _SURROGATE.finditer(text):
            self._note(line if record else line + text.count("\n", 0, m.start()))
        return _SURROGATE.sub("\ufffd", text)

    def decode(self, data: bytes) -> str:
        """A whole file's bytes -> str: BOM dropped, then `decode_line` per line where needed."""
        if data.startswith(_UTF16_BOMS):
            raise DataError(f"{self.source} starts with a UTF-16/32 byte-order mark ({data[:2].hex(' ').upper()}): "
                            f"convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
        if data.startswith(UTF8_BOM):
            data = data[len(UTF8_BOM):]
        try:
            return data.decode("utf-8")  # fast path: valid UTF-8 holds no surrogates
        except UnicodeDecodeError:
            pass
        # "\n" (0x0A) never occurs inside a UTF-8 multi-byte sequence, so splitting bytes is safe.
        return "\n".join(self.decode_line(raw, i) for i, raw in enumerate(data.split(b"\n"), 1))

    def _note(self, line: int) -> None:
        if not self.repaired_lines or self.repaired_lines[-1] != line:
            self.repaired_lines.append(line)

    def report(self) -> None:
        """Warn once about the repaired lines, if any."""
        lines = self.repaired_lines
        if not lines:
            return
        listed = ", ".join(map(str, lines[:_LISTED_LINES]))
        more = f" and {len(lines) - _LISTED_LINES} more" if len(lines) > _LISTED_LINES else ""
        warn(f"{self.source}: replaced text that is not valid UTF-8 (undecodable bytes or lone surrogates) "
             f"with U+FFFD on line{'s' if len(lines) > 1 else ''} {listed}{more}; pass {STRICT_FLAG} to refuse it")


def read_text(path: str | Path, strict: bool = False) -> str:
    """The text of a file under the policy (see the module docstring). Raises DataError."""
    policy = TextPolicy(str(path), strict)
    text = policy.decode(Path(path).read_bytes())
    policy.report()
    return text


def iter_lines(path: str | Path, policy: TextPolicy) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a file, decoded by `policy`, BOM dropped; streams.

    The caller owns `policy` (to clean values parsed from a line) and calls its `report()`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1:
                if raw.startswith(_UTF16_BOMS):
                    raise DataError(f"{path} starts with a UTF-16/32 byte-order mark "
                                    f"({raw[:2].hex(' ').upper()}): convert it to UTF-8, e.g. "
                                    f"iconv -f UTF-16 -t UTF-8")
                if raw.startswith(UTF8_BOM):
                    raw = raw[len(UTF8_BOM):]
            yield line_no, policy.decode_line(raw, line_no)


def clean_text(text: str, source: str, strict: bool = False) -> str:
    """A str from outside (a prompt, sys.argv) under the policy: leading BOM dropped, lone surrogates
    (including sys.argv's stand-ins U+DC80-U+DCFF for undecodable bytes) replaced or refused."""
    policy = TextPolicy(source, strict)
    text = policy.clean(text.removeprefix("\ufeff"))
    policy.report()
    return text
