"""Errors that carry a one-line message naming the problem and the fix.

The contract (README, "On bad input"): every user mistake raises a `LayerlabError` subclass from
library code, checked before any model loads where it can be; the CLI prints `error: <message>` as
one line on stderr and exits with code 2. Anything else is a bug: exit code 1, one line, and the
traceback with `--debug`. This module imports nothing heavy, so the CLI can use it at start-up.
"""

from __future__ import annotations


class LayerlabError(Exception):
    """Base class for user-facing errors."""


class PlanError(LayerlabError, ValueError):
    """A plan that cannot be parsed or does not fit the model."""


class ModelLoadError(LayerlabError):
    """A model source that cannot be found or loaded."""


class UnsupportedArchitectureError(LayerlabError):
    """A model whose layer layout layerlab does not know."""


class DataError(LayerlabError):
    """A data source (text, task rows) that cannot be found or read."""


class SettingsError(LayerlabError, ValueError):
    """A setting out of range, or settings that contradict each other."""


class OutputError(LayerlabError):
    """An output path that cannot be written, or whose replacement would lose something."""


class ResumeError(LayerlabError):
    """A saved state that does not belong to the run asked to resume from it."""


class MissingExtraError(LayerlabError):
    """An optional dependency that is not installed."""


def require(module: str, extra: str, purpose: str) -> None:
    """Fail with the pip command when the optional `module` (of extra `extra`) is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{purpose} needs the '{extra}' extra: pip install 'layerlab[{extra}]'")


def one_line(text: str) -> str:
    """A message as one line (messages quoting files or exceptions may carry newlines)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "(no message)"
