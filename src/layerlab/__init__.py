"""layerlab: run, score, search, evaluate and export layer plans of Hugging Face language models."""

from .errors import LayerlabError, ModelLoadError, PlanError, UnsupportedArchitectureError
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


def _register_with_lm_eval() -> None:
    """Make `--model layerlab` known to lm-evaluation-harness, when it is installed (a lazy entry)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        import _layerlab_lm_eval

        _layerlab_lm_eval.install()


_register_with_lm_eval()
