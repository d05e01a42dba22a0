"""The logit lens: what the model would predict if the plan stopped after each step.

After every executed step, the residual stream at the last prompt position is sent through the
model's own head (final norm, LM head, soft-capping where the architecture has it: `head_logits`)
and read as a next-token distribution (nostalgebraist 2020, "interpreting GPT: the logit lens";
Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens", which
also discusses its limits on early layers). The last step's row is the model's real prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..plan import Plan
from ..search import head_logits
from ..streams import place, record
from .attention import default_plan, encode, step_names


@dataclass
class LensRow:
    """The top-k next tokens read out after one step, most likely first."""

    step: str
    tokens: list[str]
    ids: list[int]
    probs: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def logit_lens(model, tokenizer, prompt: str, plan: Plan | None = None, top_k: int = 5) -> list[LensRow]:
    """One row per step of `plan`: the `top_k` tokens of the head applied to the stream leaving that step."""
    plan = default_plan(model, plan)
    ids, _ = encode(tokenizer, prompt, model.device)
    leaving = [place("resid_post", i) for i in range(len(plan.steps))]
    recorder = record(model, ids, plan, leaving)
    last = torch.stack([recorder[name][0, -1] for name in leaving])  # (steps, d)
    probs = torch.softmax(head_logits(model, last).double(), dim=-1)
    top = probs.topk(top_k, dim=-1)
    return [LensRow(step=name, tokens=[tokenizer.decode([i]) for i in row_ids], ids=row_ids, probs=row_probs)
            for name, row_ids, row_probs in zip(step_names(plan), top.indices.tolist(), top.values.tolist(),
                                                strict=True)]
