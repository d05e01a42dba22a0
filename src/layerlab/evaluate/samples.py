"""Sample continuations of prompts under one or more plans, for side-by-side reading."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..plan import Plan
from ..runtime import apply_plan


@dataclass(frozen=True)
class Sample:
    plan: str
    prompt: str
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str,
    plan: Plan,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    seed: int = 0,
) -> Sample:
    """Continue `prompt` with `plan` applied: greedy by default, seeded sampling with `do_sample`."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with apply_plan(model, plan):
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    seconds = time.perf_counter() - start
    new = output[0, inputs["input_ids"].shape[1]:]
    return Sample(plan.to_text(), prompt, tokenizer.decode(new, skip_special_tokens=True), len(new), seconds)


def generate_table(model, tokenizer, prompts: list[str], plans: list[Plan], **kwargs) -> list[Sample]:
    """Every prompt under every plan, plan-major (the order of the printed table)."""
    return [generate(model, tokenizer, prompt, plan, **kwargs) for plan in plans for prompt in prompts]
