"""Errors that carry a one-line message naming the problem and the fix.

The CLI prints these as `error: <message>` and exits with code 2; anything else is a bug.
"""


class LayerlabError(Exception):
    """Base class for user-facing errors."""


class PlanError(LayerlabError, ValueError):
    """A plan that cannot be parsed or does not fit the model."""


class ModelLoadError(LayerlabError):
    """A model source that cannot be found or loaded."""


class UnsupportedArchitectureError(LayerlabError):
    """A model whose layer layout layerlab does not know."""
