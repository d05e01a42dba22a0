"""Safe output: nothing a user had is ever lost, nothing is left half-written.

The rules every writer follows:
- an existing output is replaced only with `force`, and only when layerlab wrote it: a folder carries a
  manifest (`.layerlab.json`) listing the names layerlab put in it, a JSON file a `"producer": "layerlab"`
  key, a GGUF file a `layerlab.producer` metadata key, a text file a marker on its first line;
- an output is never an input, a folder holding an input, or a path inside an input folder;
- files are written to a temporary sibling and renamed into place, so a reader (or a run resumed after
  a crash) sees the old file or the new one, never a torn one; folders are built in a temporary
  sibling the same way (`export/files.py`); temporaries are removed on errors and interrupts;
- everything written gets the permissions a plainly created file would get (the umask), even where
  `mkstemp`/`mkdtemp` or a library (safetensors) created it with 0600/0700.
This module imports nothing heavy: the CLI checks outputs before torch is even imported.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError, ResumeError

MANIFEST = ".layerlab.json"
PRODUCER = "layerlab"
TEXT_MARKER = "<!-- written by layerlab -->"
GGUF_PRODUCER_KEY = "layerlab.producer"


class OutputExistsError(OutputError):
    """An output path that already exists."""


# ------------------------------------------------------------------------------------------ permissions
def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_permissions(path: str | Path) -> None:
    """Give a file or folder, and everything under a folder, the permissions plain creation would."""
    path = Path(path)
    umask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if path.is_dir():
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~umask)


def temporary_folder(parent: str | Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` to build an output in before renaming it into place."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    usual_permissions(folder)
    return folder


# ------------------------------------------------------------------------------------------ provenance
def manifest(kind: str, **extra) -> dict:
    """What a layerlab-written folder's `.layerlab.json` holds: who wrote it, what it is, its names."""
    from . import __version__

    return {"producer": PRODUCER, "version": __version__, "kind": kind, "names": [], **extra}


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of a folder layerlab wrote, or None."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("producer") == PRODUCER else None


def write_manifest(folder: str | Path, data: dict) -> None:
    """Write a folder's manifest (atomically; it is the folder's proof of origin)."""
    _write_atomically(Path(folder) / MANIFEST, json.dumps(data, indent=1).encode("utf-8"))


def own_folder(folder: str | Path, kind: str, **extra) -> Path:
    """Create `folder` (or take an empty one) as layerlab's own, with a manifest; an existing own folder stays."""
    folder = Path(folder)
    if read_manifest(folder) is None:
        folder.mkdir(parents=True, exist_ok=True)
        if any(folder.iterdir()):
            raise OutputError(f"{folder} holds files layerlab did not write; move them or choose another path")
        usual_permissions(folder)
        write_manifest(folder, manifest(kind, **extra))
    return folder


def record_name(path: Path) -> None:
    """Add `path`'s name to its folder's manifest, if the folder has one (a layerlab run folder)."""
    data = read_manifest(path.parent)
    if data is not None and path.name not in data.get("names", []) and path.name != MANIFEST:
        data["names"] = [*data.get("names", []), path.name]
        write_manifest(path.parent, data)


def written_by_layerlab(path: str | Path) -> bool:
    """Whether layerlab wrote `path` (see the module docstring for how each kind is recognised)."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path) is not None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and data.get("producer") == PRODUCER
        if suffix == ".gguf":
            from gguf import GGUFReader

            field = GGUFReader(str(path)).fields.get(GGUF_PRODUCER_KEY)
            return field is not None and field.contents() == PRODUCER
        with path.open(encoding="utf-8") as handle:  # the marker opens the file, or follows an HTML doctype
            return TEXT_MARKER in (handle.readline() + handle.readline())
    except Exception:  # unreadable, truncated or foreign: not ours
        return False


def foreign_names(folder: Path) -> list[str]:
    """Names in a layerlab-written folder that its manifest does not list (a user put them there)."""
    data = read_manifest(folder) or {}
    listed = set(data.get("names", [])) | {MANIFEST}
    return sorted(p.name for p in folder.iterdir() if p.name not in listed and not _is_temporary(p.name))


def _is_temporary(name: str) -> bool:
    """Leftovers of an interrupted write of layerlab's own (hidden temporaries beside their target)."""
    return name.startswith(".") and (".layerlab-" in name or name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------ checks
def check_not_an_input(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is an input, holds an input, or lies inside an input folder."""
    target = Path(out).expanduser().resolve()
    for raw in inputs:
        source = Path(raw).expanduser().resolve()
        if target == source:
            raise OutputError(f"output {out} is the input {raw}; layerlab never writes over its inputs: "
                              "choose another output path")
        if target in source.parents:
            raise OutputError(f"output {out} holds the input {raw}; replacing it would delete the input: "
                              "choose another output path")
        if source.is_dir() and source in target.parents:
            raise OutputError(f"output {out} lies inside the input folder {raw}; layerlab never changes its "
                              "inputs: choose a path outside it")


def check_writable(out: str | Path) -> None:
    """Refuse an output whose nearest existing parent is not a writable folder (before any work)."""
    parent = Path(out).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: the folder {parent} is not writable")


def check_output(out: str | Path, folder: bool = False, force: bool = False,
                 inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output that would lose something; call it before long work (and writers call it again).

    A missing path or an empty folder is fine. An existing one needs `force`, and `force` replaces only
    what layerlab wrote (a folder also must hold nothing its manifest does not list).
    """
    out = Path(out)
    check_not_an_input(out, inputs)
    check_writable(out)
    if not out.exists() and not out.is_symlink():
        return
    if folder and out.is_file():
        raise OutputError(f"{out} is a file, but the output is a folder; choose another path")
    if not folder and out.is_dir():
        raise OutputError(f"{out} is a folder, but the output is a file; choose another path")
    if folder and out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        what = "is not an empty folder" if folder else "already exists"
        raise OutputExistsError(f"{out} {what}; choose another path or pass --force to replace it")
    if out.is_symlink() or not written_by_layerlab(out):
        raise OutputError(f"{out} was not written by layerlab, so --force will not replace it; "
                          "choose another path or move it away yourself")
    if folder and (foreign := foreign_names(out)):
        raise OutputError(f"{out} holds files layerlab did not write ({', '.join(foreign[:3])}); --force will not "
                          "delete them: move them away or choose another path")


# ------------------------------------------------------------------------------------------ writers
def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.layerlab-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        usual_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, force: bool = False) -> Path:
    """Write `data` to `path` through a temporary file and a rename; refuse to replace unless `force`
    (and then only a file layerlab wrote). Inside a layerlab run folder, the name joins its manifest."""
    path = Path(path)
    check_output(path, force=force)
    _write_atomically(path, data)
    record_name(path)
    return path


def update_file(path: str | Path, data: bytes | str) -> Path:
    """Atomically rewrite a file the running job owns (state saved every round, a run folder's report):
    the job checked the path when it started, so no check is repeated here."""
    path = Path(path)
    _write_atomically(path, data.encode("utf-8") if isinstance(data, str) else data)
    record_name(path)
    return path


def atomic_write_text(path: str | Path, text: str, force: bool = False) -> Path:
    """`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def atomic_write_json(path: str | Path, data: dict, force: bool = False, indent: int | None = 2) -> Path:
    """Write a JSON object marked as layerlab's (`"producer": "layerlab"`), so --force may replace it later."""
    return atomic_write_text(path, json.dumps({"producer": PRODUCER, **data}, indent=indent), force=force)


# ------------------------------------------------------------------------------------------ resume
_PROVENANCE = {"text_sha256": "calibration text", "data_sha256": "training text", "model": "model",
               "texts": "calibration, evaluation or healing text"}


def flat(data: dict, prefix: str = "") -> dict:
    """Nested settings as one mapping with dotted keys (`evaluation.ppl_windows`), to name a difference."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in _PROVENANCE:
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict, wanted: dict, where: str) -> None:
    """Refuse to resume an artifact written with other settings or inputs, naming the first difference."""
    saved, wanted = flat(json.loads(json.dumps(saved))), flat(json.loads(json.dumps(wanted)))  # tuples as lists
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) == wanted.get(key):
            continue
        if key in _PROVENANCE:
            raise ResumeError(f"{where} was written for another {_PROVENANCE[key]}; resume with the same one, "
                              "or start over with --force")
        raise ResumeError(f"{where} was written with {key}={_short(saved.get(key))}, but this run has "
                          f"{key}={_short(wanted.get(key))}; resume with the same settings, or start over with --force")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
