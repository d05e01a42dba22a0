"""lm-evaluation-harness integration: a `layerlab` model type and local multiple-choice tasks.

Importing this module registers the model type `layerlab` in lm-eval's registry:

    lm_eval --model layerlab --model_args model=smollm2-135m,plan=skip:24-26 --tasks ...

`model_args` takes `model` (any `layerlab.load` source), `plan` (any plan text or file),
`dtype` and `device`; everything else goes to lm-eval's `HFLM`, which receives the already loaded
model with the plan applied. lm-eval 0.4.13 does not discover other packages' plugins, so the
`layerlab lm-eval ...` command imports this module and then runs lm-eval's own command line.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..plan import Plan
from ..runtime import apply_plan
from ..settings import ModelSpec, check_plan_source


@register_model("layerlab")
class LayerlabLM(HFLM):
    """lm-eval's Hugging Face model, running a layerlab model with a plan applied."""

    def __init__(self, model: str = "smollm2-135m", plan: str = "all", dtype: str = "float32",
                 device: str | None = None, trust_remote_code: bool = False, **kwargs) -> None:
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI defaults to cuda
        spec = ModelSpec(str(model), str(dtype), device, trust_remote_code in (True, "True", "true", "1"))
        check_plan_source(str(plan))
        self.plan = Plan.load(str(plan), spec.inspect().num_layers)  # a bad plan fails before the model loads
        loaded, tokenizer = spec.load()
        self.applied = apply_plan(loaded, self.plan)  # stays applied for the life of this object
        kwargs.pop("pretrained", None)
        super().__init__(pretrained=loaded, tokenizer=tokenizer, **kwargs)


def write_choice_task(data: str | Path, folder: str | Path, name: str = "layerlab_choice") -> Path:
    """Write an lm-eval task over a JSONL file of `{"query", "endings", "label"}` rows; return its folder.

    Pass the folder to lm-eval as `--include_path` (or `TaskManager(include_path=...)`) and the task
    as `--tasks NAME`. The rows are read from the local file; no hub is needed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(Path(data).resolve())}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{endings}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder
