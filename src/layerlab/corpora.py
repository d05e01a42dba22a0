"""Evaluation data: bundled corpora by name, local files, or Hugging Face datasets when a hub is reachable.

Text sources: a bundled name (`wikitext2-test`, `wikitext2-valid`, `pride-and-prejudice`,
`frankenstein`), a path to a UTF-8 text file, or `hf:DATASET[:CONFIG]:SPLIT[:FIELD]` (needs the
`datasets` package and a hub). Multiple-choice sources: `hellaswag-2k` or a JSONL file with
`query`, `endings` and `label` per line (see `data/README.md`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .errors import DataError

BUNDLED = {
    "wikitext2-test": "wikitext2_test.txt",
    "wikitext2-valid": "wikitext2_valid.txt",
    "pride-and-prejudice": "pg1342_pride_and_prejudice.txt",
    "frankenstein": "pg84_frankenstein.txt",
    "hellaswag-2k": "hellaswag_val_2k.jsonl",
}


@dataclass(frozen=True)
class Choice:
    """One multiple-choice item: a context, its candidate endings and the index of the right one.

    Each ending is scored as the continuation `" " + ending` after `query` (lm-eval's target
    delimiter); `subject` names an MMLU item's subject.
    """

    query: str
    endings: tuple[str, ...]
    label: int
    subject: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        return [(self.query, " " + ending) for ending in self.endings]

    def lengths(self) -> list[int]:
        """What `acc_norm` divides by: each choice's length in characters (lm-eval's `len(choice)`)."""
        return [len(ending) for ending in self.endings]


@dataclass(frozen=True)
class PartialChoice:
    """A WinoGrande item: the same continuation after each of several contexts (partial scoring).

    The continuation already holds lm-eval's delimiter space and is scored exactly as stored.
    """

    contexts: tuple[str, ...]
    continuation: str
    label: int

    def requests(self) -> list[tuple[str, str]]:
        return [(context, self.continuation) for context in self.contexts]

    def lengths(self) -> list[int]:
        return [len(context) for context in self.contexts]  # lm-eval's choices are the contexts here


@dataclass(frozen=True)
class Cloze:
    """A LAMBADA item: a context and the continuation (the last word, with its space) to predict."""

    context: str
    continuation: str

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, self.continuation)]


Item = Choice | PartialChoice | Cloze


def resolve(source: str) -> Path:
    """The file behind a bundled name or a path."""
    if source in BUNDLED:
        return Path(str(files("layerlab").joinpath("data", BUNDLED[source])))
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data source {source!r} is neither a file nor a bundled name ({', '.join(BUNDLED)})")
    return path


def check_source(source: str) -> None:
    """Fail now, with the file's name, if `source` cannot be read later (before any model loads)."""
    if source.startswith("hf:"):
        _hub_parts(source)
        return
    path = resolve(source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {source!r}: {exc.strerror}") from None
    if not data.strip():
        raise DataError(f"{source!r} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{source!r} is not UTF-8 text (a binary file?)") from None


def read_text(source: str) -> str:
    """The text of a bundled corpus, a file or `hf:DATASET[:CONFIG]:SPLIT[:FIELD]`."""
    if source.startswith("hf:"):
        return _hub_text(source)
    try:
        return resolve(source).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data source {source!r} is not UTF-8 text") from None


def _hub_parts(source: str) -> tuple[str, str | None, str, str | None]:
    """(dataset, config, split, field) of `hf:DATASET[:CONFIG]:SPLIT[:FIELD]`."""
    parts = source[3:].split(":")
    if len(parts) < 2 or len(parts) > 4 or not all(parts):
        raise DataError(f"hub source {source!r} must look like hf:DATASET[:CONFIG]:SPLIT[:FIELD]")
    if len(parts) == 2:
        return parts[0], None, parts[1], None
    return parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else None


def _hub_text(source: str) -> str:
    name, config, split, field = _hub_parts(source)
    try:
        import datasets

        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many kinds when offline or misnamed
        raise DataError(f"cannot load {source!r} from the hub: {str(exc).splitlines()[0]}") from None
    return "\n".join(row[field or "text"] for row in rows)


def read_choices(source: str, limit: int | None = None) -> list[Choice]:
    """Multiple-choice items from a bundled name or a JSONL file of `{"query", "endings", "label"}` objects."""
    return list(read_items(resolve(source), "choice")[:limit])


ROW_FORMATS = {  # kind -> (fields a row must have, how to build the item)
    "choice": ("query, endings, label", lambda row: Choice(
        _text(row["query"]), _texts(row["endings"]), _label(row["label"]), row.get("subject"))),
    "partial": ("contexts, continuation, label", lambda row: PartialChoice(
        _texts(row["contexts"]), _text(row["continuation"]), _label(row["label"]))),
    "cloze": ("context, continuation", lambda row: Cloze(_text(row["context"]), _text(row["continuation"]))),
}


@functools.lru_cache(maxsize=32)
def _read_items(path: Path, kind: str, stamp: tuple[int, int]) -> tuple[Item, ...]:
    fields, build = ROW_FORMATS[kind]
    items = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = build(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise DataError(f"{path}:{number}: not a row with {fields} ({_reason(exc)})") from None
            choices = len(item.requests())
            if not isinstance(item, Cloze) and not 0 <= item.label < choices:
                raise DataError(f"{path}:{number}: label {item.label} is not an index into its {choices} choices")
            items.append(item)
    if not items:
        raise DataError(f"{path} holds no rows; expected one JSON object with {fields} per line")
    return tuple(items)


def read_items(path: str | Path, kind: str) -> tuple[Item, ...]:
    """Every row of a task file (JSONL, one object per line; see `ROW_FORMATS`), checked row by row.

    A malformed row, an empty field, a label that is not an index into the choices, or a file without
    rows raises a `DataError` naming the file and line. Files are read once per process (cached by
    path, size and modification time).
    """
    path = Path(path)
    try:
        stat = path.stat()
        return _read_items(path, kind, (stat.st_size, stat.st_mtime_ns))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None


def _text(value) -> str:
    """A non-empty string (lm-eval asserts that contexts and continuations are not empty)."""
    if not isinstance(value, str) or not value:
        raise ValueError("empty or not text")
    return value


def _texts(values) -> tuple[str, ...]:
    if not isinstance(values, list) or len(values) < 2:
        raise ValueError("needs a list of at least two texts")
    return tuple(_text(v) for v in values)


def _label(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"label {value!r} is not an integer")
    return value


def _reason(exc: Exception) -> str:
    return f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
