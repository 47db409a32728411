"""Member data files into training documents: plain text, instruction pairs and chat.

A member's folder may mix the ecosystem's usual layouts; each record is recognised by its fields:

| fields | document | trained on |
|---|---|---|
| `messages`: [{`role`, `content`}, ...] (roles system/user/assistant) | chat | the assistant turns |
| `instruction` (+ `input`) + `output` (Alpaca) or `response` | a user turn and an assistant turn | the answer |
| `prompt` + `completion` | a user turn and an assistant turn | the completion |
| `text`, or the field named by `data-column` | plain text | every token |

Files: `.txt` (one plain document), `.jsonl` (one record per line), `.json` (an array of
records), `.csv` (a header row; one record per row), `.parquet` (one record per row, read with
pyarrow). The Hugging Face `datasets` loaders would read the same files, but they cache Arrow
copies on disk and would take the member's private text out of its folder; this reader keeps
nothing. Any bad file (empty, not UTF-8, broken JSON, a record without a known field, a missing
column) is refused with one line naming file and line: a member with one bad file is refused
whole, since training on the rest would silently change what it contributes and what it is
credited for; `fedmoe join` checks this before it connects.

Chat and instruction records are rendered by model/tokenizer.py: with the base tokenizer's chat
template when it has one, else with the plain template there.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from model.corpus import DataError, clean_text

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
TEXT = "text"


@dataclass(frozen=True)
class Document:
    """Plain text (`text`), or a conversation (`messages`: (role, content) pairs)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    source: str = field(default="", compare=False)  # the file it came from (the quality report)

    @property
    def is_chat(self) -> bool:
        return self.text is None

    @property
    def content(self) -> str:
        """The document's text: a conversation's turns joined by newlines."""
        return self.text if self.text is not None else "\n".join(c for _, c in self.messages)


def read_texts(path: Path, column: str = TEXT) -> list[str]:
    """The documents' text, every token alike (the operator's validation and pre-training sets)."""
    return [doc.content for doc in read_documents(path, column)]


def read_documents(path: Path, column: str = TEXT) -> list[Document]:
    """Documents of a member file or folder (recursive, sorted by path); `column` names the plain-text
    field of `.jsonl`/`.json`/`.csv`/`.parquet` records. Raises DataError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        return _read_file(path, column)
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{path}: folder has no {', '.join(SUFFIXES)} files")
    return [doc for f in files for doc in _read_file(f, column)]


def _read_file(path: Path, column: str) -> list[Document]:
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected {', '.join(SUFFIXES)})")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".parquet":
        records: Iterator[tuple[str, object]] = _parquet(path, data)
    else:
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
        if path.suffix == ".txt":
            text = clean_text(raw)
            return [Document(text=text, source=str(path))] if text else _none(path)
        records = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[path.suffix](path, raw)
    docs = [replace(doc, source=str(path)) for where, record in records
            if (doc := _document(record, f"{path}: {where}", column)) is not None]
    return docs or _none(path)


def _none(path: Path) -> list[Document]:
    raise DataError(f"{path}: file yields no text")


def _jsonl(path: Path, raw: str) -> Iterator[tuple[str, object]]:
    # split("\n"), not splitlines(): JSON strings may hold \x1e, \x85 or U+2028 verbatim.
    for number, line in enumerate(raw.split("\n"), start=1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except (ValueError, RecursionError):
                raise DataError(f"{path}: line {number} is not valid JSON") from None


def _json(path: Path, raw: str) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for number, record in enumerate(records, start=1):
        yield f"record {number}", record


def _csv(path: Path, raw: str) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(raw, newline=""), strict=True)
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: no header row")
        width = len(reader.fieldnames)
        for row in reader:
            if None in row or any(v is None for v in row.values()):  # more fields than the header, or fewer
                raise DataError(f"{path}: line {reader.line_num} does not have the header's {width} fields")
            yield f"line {reader.line_num}", row
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: {e}") from None


def _parquet(path: Path, data: bytes) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for number, record in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", record


def _document(record: object, where: str, column: str) -> Document | None:
    """The record's document; None when it holds only blank text (skipped, like a blank line)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(record).__name__}")

    def value_of(name: str, required: bool = True) -> str:
        value = record.get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise DataError(f'{where}: "{name}" is not a string')
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates such as "\ud800" from JSON escapes
            raise DataError(f'{where}: "{name}" is not valid Unicode') from None
        return clean_text(value)

    if "messages" in record:
        return _chat(record["messages"], where)
    answer = "output" if "output" in record else "response" if "response" in record else None
    if "instruction" in record and answer:
        prompt = "\n\n".join(p for p in (value_of("instruction"), value_of("input", required=False)) if p)
        return _pair(prompt, value_of(answer), where)
    if "prompt" in record and "completion" in record:
        return _pair(value_of("prompt"), value_of("completion"), where)
    for name in dict.fromkeys((column, TEXT)):  # the named column, and "text" always
        if name in record:
            text = value_of(name)
            return Document(text=text) if text else None
    known = f'"{column}", "instruction" with "output" or "response", "prompt" with "completion", or "messages"'
    raise DataError(f"{where} has none of the fields {known} (it has {', '.join(sorted(map(str, record))) or 'none'})")


def _pair(prompt: str, answer: str, where: str) -> Document:
    if not prompt or not answer:
        raise DataError(f"{where}: {'the prompt' if not prompt else 'the answer'} is empty")
    return Document(messages=(("user", prompt), ("assistant", answer)))


def _chat(messages: object, where: str) -> Document:
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    turns = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f'{where}: message {number} needs a string "content"')
        if message.get("role") not in ROLES:
            raise DataError(f'{where}: message {number} has role {message.get("role")!r} (expected one of {", ".join(ROLES)})')
        turns.append((message["role"], clean_text(message["content"])))
    if not any(role == "assistant" and content for role, content in turns):
        raise DataError(f"{where}: no assistant message with text to train on")
    return Document(messages=tuple(turns))
