"""Staged outputs: build in a temporary sibling, rename into place at the end, refuse to clobber.

A staged folder gets a manifest (`io.MANIFEST`) listing what it holds, so a later `--force` knows
layerlab wrote it; a staged GGUF or text file carries its own marker (`io.written_by_layerlab`).
The temporary sibling is removed when the block fails or is interrupted (Ctrl-C, and SIGTERM, which
the CLI turns into an exception), so a failed run leaves the output path as it was.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..io import MANIFEST, check_output, manifest, record_name, temporary_folder, usual_permissions, write_manifest


@contextlib.contextmanager
def _staged(out: str | Path, force: bool, folder: bool, kind: str, inputs: Iterable[str | Path],
            extra: dict) -> Iterator[Path]:
    out = Path(out)
    check_output(out, folder=folder, force=force, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_folder(out.parent, f".{out.name}.layerlab-")
    target = staging if folder else staging / out.name
    try:
        yield target
        if folder:
            names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST)
            write_manifest(staging, manifest(kind, **extra) | {"names": names})
        usual_permissions(target)
        _replace(target, out)
        record_name(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def staged_folder(out: str | Path, force: bool = False, kind: str = "folder", inputs: Iterable[str | Path] = (),
                  **manifest_extra):
    """Yield an empty temporary folder that replaces `out` only if the block succeeds; its manifest records
    `kind`, every name in it and `manifest_extra`."""
    return _staged(out, force, True, kind, inputs, manifest_extra)


def staged_file(out: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()):
    """Yield a temporary file path that replaces `out` only if the block succeeds."""
    return _staged(out, force, False, "file", inputs, {})


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` (allowed by --force) is removed only after that works."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.layerlab-replaced")
    out.rename(old)
    new.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
