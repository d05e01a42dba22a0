"""Evaluation data: bundled corpora by name, local files, or Hugging Face datasets when a hub is reachable.

Text sources: a bundled name (`wikitext2-test`, `wikitext2-valid`, `pride-and-prejudice`,
`frankenstein`), a path to a UTF-8 text file, or `hf:DATASET[:CONFIG]:SPLIT[:FIELD]` (needs the
`datasets` package and a hub). Multiple-choice sources: `hellaswag-2k` or a JSONL file with
`query`, `endings` and `label` per line (see `data/README.md`).
"""

from __future__ import annotations

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
    """One multiple-choice item: a context, its candidate endings and the index of the right one."""

    query: str
    endings: tuple[str, ...]
    label: int


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
    """Multiple-choice items from a JSONL file of `{"query", "endings", "label"}` objects."""
    items = []
    path = resolve(source)
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if limit is not None and len(items) >= limit:
                    break
                if line.strip():
                    items.append(_choice(line, path, number))
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text (a binary file?)") from None
    if not items:
        raise DataError(f"{path} holds no multiple-choice rows; expected one JSON object per line")
    return items


def _choice(line: str, path: Path, number: int) -> Choice:
    """One JSONL row, or an error naming the file and line."""
    try:
        row = json.loads(line)
        endings = row["endings"]
        if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
            raise ValueError("endings must be a list of at least two strings")
        if not isinstance(row["query"], str) or isinstance(row["label"], bool):
            raise ValueError("query must be a string and label an integer")
        item = Choice(row["query"], tuple(endings), int(row["label"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}:{number}: not a multiple-choice row with query, endings, label "
                        f"({str(exc)[:100]})") from None
    if not 0 <= item.label < len(item.endings):
        raise DataError(f"{path}:{number}: label {item.label} is not an index into its {len(item.endings)} endings")
    return item
