"""Staged outputs: build in a temporary sibling, rename into place at the end, refuse to clobber."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..io import check_output, temporary_folder


@contextlib.contextmanager
def _staged(out: str | Path, force: bool, folder: bool) -> Iterator[Path]:
    out = Path(out)
    check_output(out, folder=folder, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(out.parent, f".{out.name}.")
    target = staging if folder else staging / out.name
    try:
        yield target
        _replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staged_folder(out: str | Path, force: bool = False):
    """Yield an empty temporary folder that replaces `out` only if the block succeeds."""
    return _staged(out, force, folder=True)


def staged_file(out: str | Path, force: bool = False):
    """Yield a temporary file path that replaces `out` only if the block succeeds."""
    return _staged(out, force, folder=False)


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` (allowed by --force) is removed only after that works."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.replaced")
    out.rename(old)
    new.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
