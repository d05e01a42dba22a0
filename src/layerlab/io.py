"""Safe output: never overwrite without being asked, never leave half-written files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import LayerlabError


class OutputExistsError(LayerlabError):
    """An output path that already exists."""


def usual_permissions(path: str | Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the permissions plain creation would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


def temporary_folder(parent: str | Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` to build an output in before renaming it into place."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    usual_permissions(folder)
    return folder


def check_output(out: str | Path, folder: bool = False, force: bool = False) -> None:
    """Refuse an existing output (a non-empty folder, or any file) unless `force`; call it before long work."""
    out = Path(out)
    if force or not out.exists():
        return
    if folder and out.is_dir() and not any(out.iterdir()):
        return
    what = "is not an empty folder" if folder else "already exists"
    raise OutputExistsError(f"{out} {what}; choose another path or pass --force to replace it")


def atomic_write_text(path: str | Path, text: str, force: bool = False) -> Path:
    """Write `text` to `path` through a temporary file and a rename; refuse to replace unless `force`."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def atomic_write_bytes(path: str | Path, data: bytes, force: bool = False) -> Path:
    """Write `data` to `path` through a temporary file and a rename; refuse to replace unless `force`.

    A reader (or a run resumed after a crash) sees the old file or the new one, never a torn one.
    """
    path = Path(path)
    check_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        usual_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
