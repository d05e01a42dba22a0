"""Safe output: never overwrite without being asked, never leave half-written files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import LayerlabError


class OutputExistsError(LayerlabError):
    """An output path that already exists."""


def refuse_existing(path: str | Path, force: bool = False) -> None:
    """Fail early when an output exists and replacing it was not asked for."""
    if Path(path).exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another path or pass --force to replace it")


def atomic_write_text(path: str | Path, text: str, force: bool = False) -> Path:
    """Write `text` to `path` through a temporary file and a rename; refuse to replace unless `force`."""
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
