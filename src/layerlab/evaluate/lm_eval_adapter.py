"""lm-evaluation-harness integration: a `layerlab` model type and local multiple-choice tasks.

Importing this module registers the model type `layerlab` in lm-eval's registry:

    lm_eval --model layerlab --model_args model=smollm2-135m,plan=skip:24-26 --tasks ...

`model_args` takes `model` (any `layerlab.load` source), `plan` (any plan text or file),
`dtype` and `device`; everything else goes to lm-eval's `HFLM`, which receives the already loaded
model with the plan applied. lm-eval 0.4.13 does not discover other packages' plugins, so the
`layerlab lm-eval ...` command imports this module and then runs lm-eval's own command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..plan import Plan
from ..runtime import apply_plan
from ..settings import ModelSpec, check_plan_source
from .tasks import TaskData


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


TASK_FORMATS = {  # row kind (corpora.ROW_FORMATS) -> lm-eval task fields that score it as lm-eval's own task does
    "choice": {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "endings",
               "doc_to_target": "label", "target_delimiter": " ", "metrics": ("acc", "acc_norm")},
    # WinoGrande: doc_to_text returns the gold index, so lm-eval puts the choices in the context (multiple
    # inputs); the stored continuation already starts with lm-eval's delimiter space
    "partial": {"output_type": "multiple_choice", "doc_to_text": "label", "doc_to_choice": "contexts",
                "doc_to_target": "continuation", "target_delimiter": "", "metrics": ("acc",)},
    "cloze": {"output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "continuation",
              "target_delimiter": "", "metrics": ("perplexity", "acc")},
}


def write_task(data: str | Path, folder: str | Path, name: str, kind: str = "choice") -> Path:
    """Write an lm-eval task over a local JSONL file of layerlab task rows of `kind`; return its folder.

    Pass the folder to lm-eval as `--include_path` (or `TaskManager(include_path=...)`) and the task
    as `--tasks NAME`. The rows are read from the local file; no hub is needed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(TASK_FORMATS[kind])
    metrics = fields.pop("metrics")
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(Path(data).resolve())}},
            "validation_split": "validation", **fields,
            "metric_list": [{"metric": m, "aggregation": m if m == "perplexity" else "mean",
                             "higher_is_better": m != "perplexity"} for m in metrics]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return folder


def write_task_rows(data: TaskData, folder: str | Path, name: str | None = None) -> str:
    """A layerlab task's selected rows as a local lm-eval task (`layerlab_<task>` unless named); returns its name."""
    name = name or f"layerlab_{data.task.name}"
    rows = Path(folder) / f"{name}.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text("".join(json.dumps({k: v for k, v in asdict(item).items() if v is not None}) + "\n"
                            for item in data.items))
    write_task(rows, folder, name, data.task.kind)
    return name


def write_choice_task(data: str | Path, folder: str | Path, name: str = "layerlab_choice") -> Path:
    """`write_task` for a JSONL file of `{"query", "endings", "label"}` rows (HellaSwag-style)."""
    return write_task(data, folder, name, "choice")
