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
