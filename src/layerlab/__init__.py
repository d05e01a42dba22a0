"""layerlab: run, score, search, evaluate and export layer plans of Hugging Face language models.

The names below are imported lazily (PEP 562): `import layerlab` and `layerlab --help` stay instant,
and torch / transformers load only when a model-facing name is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import LayerlabError, ModelLoadError, PlanError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from .models import load
    from .plan import Plan, Step
    from .runtime import AppliedPlan, apply_plan, current_plan

__all__ = [
    "AppliedPlan",
    "LayerlabError",
    "ModelLoadError",
    "Plan",
    "PlanError",
    "Step",
    "UnsupportedArchitectureError",
    "apply_plan",
    "current_plan",
    "load",
]
__version__ = "0.1.0"

_LAZY = {"load": "models", "Plan": "plan", "Step": "plan", "AppliedPlan": "runtime", "apply_plan": "runtime",
         "current_plan": "runtime"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'layerlab' has no attribute {name!r}")


def _register_with_lm_eval() -> None:
    """Make `--model layerlab` known to lm-evaluation-harness, when it is installed (a lazy entry)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        import _layerlab_lm_eval

        _layerlab_lm_eval.install()


_register_with_lm_eval()
