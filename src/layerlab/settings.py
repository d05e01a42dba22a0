"""Settings: what a user asked for, validated at the edge, before any work.

One frozen dataclass per job (generate, eval, score, analyze, search, heal, prune, speculate, export),
built by the CLI or by Python callers. Values are checked when the object is built (`__post_init__`:
ranges, names against the registries below); what needs the file system is checked by `check()`
(input files exist and are readable, outputs writable and not replacing anything layerlab did not
write, never an input); the model is inspected from its config alone (`ModelSpec.inspect`). The jobs
(`jobs.py`, `prune.py`) run these checks first, so a mistake costs a second, not a model load.

This module imports nothing heavy: `layerlab --help` and the checks run before torch is imported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError, OutputError, PlanError, SettingsError
from .io import check_not_an_input, check_output, check_writable
from .quant import QUANT_TYPES, Quant

if TYPE_CHECKING:
    from .models import ModelInfo
    from .plan import Plan

# ------------------------------------------------------------------------------------------ registries
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")  # auto: bf16 where the device has it
GRANULARITIES = ("layer", "attn", "mlp", "sublayer")
ONE_SHOT_METHODS = ("bi", "angular", "cosine")  # implemented by search.one_shot
SEARCH_METHODS = ("greedy", *ONE_SHOT_METHODS)
PRUNE_METHODS = ("auto", *ONE_SHOT_METHODS)  # auto: the full job (greedy and one-shot compared)
TOKEN_MODES = ("all", "last")  # which tokens the angular distance averages over
EXPORT_FORMATS = ("hf", "gguf")  # None (the default): the source's format
QUANT_CHOICES = ("source", *QUANT_TYPES)  # and HIGH/LOW@BUDGET mixed precision (layerlab.quant)
PLAN_FORMATS = ("table", "text", "json", "llm-drop", "llama-cpp", "mergekit")
RECOVERIES = {  # implemented by recover.recover
    "none": "the pruned model as it is",
    "patch": "a training-free linear map per removed block, fitted on calibration text and folded into the weights",
    "lora": "LoRA fine-tuning on language-model loss over the training text",
    "kd": "LoRA trained to match the full model's next-token distributions (the same weights, every layer)",
    "patch+kd": "the linear patch, then distillation on top of it",
    "auto": "the linear patch when it lowers the calibration loss, else none",
}
PATCH_FORMS = ("auto", "full", "diagonal", "hadamard", "rotation")  # implemented by patch.py
PATCH_OBJECTIVES = ("lstsq", "cosine")
CALIBRATION_MIX = ("wikitext2-valid", "pride-and-prejudice", "frankenstein")  # see calibration.py
KV_ORDERS = ("dissimilar", "similar", "loss")  # pair orders of kv_search.search_kv
_DEVICE = re.compile(r"(cpu|mps|auto|cuda)(:\d{1,3})?")

# ------------------------------------------------------------------------------------------ eval tasks
# Zero-shot tasks under lm-evaluation-harness 0.4.13's names (scored in evaluate/tasks.py), layerlab's own
# measures (evaluate/compare.py) and shorthands. `parse_tasks` checks a `--tasks` text before any model loads.
MMLU_GROUPS = {  # lm-eval's MMLU groups and their subjects
    "stem": ("abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "social_sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"),
}
GROUP_OF = {subject: group for group, subjects in MMLU_GROUPS.items() for subject in subjects}
MMLU_SUBJECTS = tuple(sorted(GROUP_OF))  # lm-eval's order: alphabetical, as in the data file


@dataclass(frozen=True)
class Task:
    """A zero-shot task: its row format, its file, what lm-eval reports for it."""

    name: str
    kind: str  # row format: "choice", "partial" (WinoGrande) or "cloze" (LAMBADA); see corpora.ROW_FORMATS
    file: str  # file name, in a task folder and among the bundled subsets
    metrics: tuple[str, ...]  # what lm-eval reports for it
    headline: str  # the metric shown in tables and averaged over tasks: acc_norm where lm-eval reports it
    subjects: tuple[str, ...] = ()  # MMLU: the subjects it covers


def _mmlu(name: str, subjects: tuple[str, ...]) -> Task:
    return Task(name, "choice", "mmlu_test.jsonl", ("acc",), "acc", subjects)


ZERO_SHOT_TASKS: dict[str, Task] = {task.name: task for task in [
    Task("arc_easy", "choice", "arc_easy_test.jsonl", ("acc", "acc_norm"), "acc_norm"),
    Task("piqa", "choice", "piqa_val.jsonl", ("acc", "acc_norm"), "acc_norm"),
    Task("winogrande", "partial", "winogrande_val.jsonl", ("acc",), "acc"),
    Task("boolq", "choice", "boolq_val.jsonl", ("acc",), "acc"),
    Task("openbookqa", "choice", "openbookqa_test.jsonl", ("acc", "acc_norm"), "acc_norm"),
    Task("lambada_openai", "cloze", "lambada_openai_test.jsonl", ("perplexity", "acc"), "acc"),
    Task("hellaswag", "choice", "hellaswag_val.jsonl", ("acc", "acc_norm"), "acc_norm"),
    _mmlu("mmlu", MMLU_SUBJECTS),
    *(_mmlu(f"mmlu_{group}", subjects) for group, subjects in MMLU_GROUPS.items()),
    *(_mmlu(f"mmlu_{subject}", (subject,)) for subject in MMLU_SUBJECTS),
]}
SUITE = ("arc_easy", "piqa", "winogrande", "boolq", "openbookqa", "lambada_openai", "mmlu", "hellaswag")
MEASURES = {
    "ppl": "perplexity over windows of a text",
    "samples": "greedy continuations of prompts",
    "speed": "prefill and decode speed-ups over interleaved rounds, parameter bytes, peak memory",
}
TASK_ALIASES = {"suite": SUITE, "mc": ("hellaswag",)}  # mc: HellaSwag's old name here
_SUBJECT_TASKS = tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)
EVAL_TASKS = (*MEASURES, *TASK_ALIASES, *(t for t in ZERO_SHOT_TASKS if t not in _SUBJECT_TASKS))  # + mmlu_<subject>


def parse_tasks(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Task names from `--tasks` text (comma-separated), aliases expanded, duplicates dropped, each checked."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    out: list[str] = []
    for name in filter(None, names):
        for resolved in TASK_ALIASES.get(name, (name,)):
            if resolved not in ZERO_SHOT_TASKS and resolved not in MEASURES:
                raise SettingsError(_unknown_task(resolved))
            if resolved not in out:
                out.append(resolved)
    if not out:
        raise SettingsError("no task given; name at least one, e.g. --tasks ppl,hellaswag or --tasks suite")
    return tuple(out)


def _unknown_task(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, [*EVAL_TASKS, *_SUBJECT_TASKS], n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown task {name!r}; {hint}known: {', '.join(EVAL_TASKS)}, mmlu_<subject> (57 subjects)"



def _choose(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise SettingsError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def _at_least(value: int | float | None, low: int | float, what: str) -> None:
    """`value` is None or a finite number >= `low` (NaN and infinity are refused too)."""
    if value is not None and (isinstance(value, bool) or not math.isfinite(value) or not value >= low):
        raise SettingsError(f"{what} must be a number of at least {low}, got {value!r}")


def _seed(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise SettingsError(f"seed must be an integer in [0, 2**32), got {value!r}")


def _share(value: float | None, what: str) -> None:
    if value is not None and not 0 < value < 1:  # NaN fails the comparison too
        raise SettingsError(f"{what} must be a share between 0 and 1 (exclusive), got {value!r}")


def check_text_source(source: str, what: str) -> None:
    """A text or rows source (bundled name, file or hf:...) that exists and reads as UTF-8, checked up front."""
    from .corpora import check_source

    try:
        check_source(source)
    except DataError as exc:
        raise DataError(f"{what}: {exc}") from None


def check_windows(model: ModelSpec, needs: list[tuple]) -> None:
    """Each `(option, source, ctx[, window])` text holds at least `ctx` tokens of the model's tokenizer, and
    no window (`ctx` unless given) is longer than the model's positions.

    Only the tokenizer loads (not the weights), and only a prefix is tokenized when it already suffices.
    """
    from .corpora import read_text
    from .evaluate.perplexity import encode_text

    tokenizer = model.tokenizer()
    limit = model.context_length()
    for option, source, ctx, *window in needs:
        window = window[0] if window else ctx
        if limit is not None and window > limit:
            raise SettingsError(f"a window of {window} tokens for {option} is longer than the {limit} positions the "
                                "model was built for; use a smaller --ctx")
        text = read_text(source)
        if len(encode_text(tokenizer, text[: 16 * ctx])) > ctx:
            continue
        count = len(encode_text(tokenizer, text))
        if count < ctx:
            raise DataError(f"{option} {source} has {count} tokens, fewer than one window of {ctx}; use a longer "
                            "text or a smaller --ctx")


def check_plan_source(plan: str) -> None:
    """A plan file named by a plan argument is readable JSON / YAML (its content is checked against the model)."""
    from .plan import PLAN_FILE_SUFFIXES, read_plan_file

    if Path(plan).suffix.lower() in PLAN_FILE_SUFFIXES:
        read_plan_file(Path(plan))


def plan_inputs(plans: tuple[str, ...]) -> list[str]:
    """The plan arguments that are files (inputs that no output may replace)."""
    return [p for p in plans if Path(p).suffix.lower() in (".json", ".yaml", ".yml")]


def _check_prompts(prompts: tuple[str, ...]) -> None:
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise SettingsError("a prompt is empty; give some text to continue, e.g. --prompt 'Once upon a time'")


def _file_inputs(*sources: str) -> list[str]:
    """The sources that are local files (bundled names and hub datasets cannot be overwritten by accident)."""
    return [s for s in sources if s and Path(s).expanduser().is_file()]


def _inputs(info: ModelInfo | None, others: list[str]) -> list[str | Path]:
    return [*(info.input_paths if info is not None else []), *others]


def check_distinct_texts(first: str, second: str, first_name: str, second_name: str) -> None:
    """Refuse training or calibrating on the text a job evaluates on (same name, same file or same content)."""
    from .corpora import read_text

    if first == second or read_text(first) == read_text(second):
        raise SettingsError(f"{first_name} {first} is {second_name}; use another text (e.g. frankenstein) so the "
                            "evaluation stays held out")


def as_dict(settings) -> dict:
    """A settings object as plain data (nested settings too), for reports and resume fingerprints."""
    out = {}
    for item in fields(settings):
        value = getattr(settings, item.name)
        out[item.name] = as_dict(value) if hasattr(value, "__dataclass_fields__") else (
            list(value) if isinstance(value, tuple) else value)
    return out


# ------------------------------------------------------------------------------------------ the model

# ------------------------------------------------------------------------------------------ KV caches
@dataclass(frozen=True)
class CacheType:
    """A KV cache type the CLI and `kvcache.kv_cache` offer (implemented in `kvcache.py`)."""

    name: str
    description: str
    bits: int | None = None  # layerlab's per-token types
    backend: str | None = None  # transformers' QuantizedCache backend
    nbits: int | None = None
    package: str | None = None  # the Python module the backend needs


CACHE_TYPES: dict[str, CacheType] = {t.name: t for t in (
    CacheType("full", "transformers' DynamicCache at the model's dtype"),
    CacheType("int8", "layerlab: 8-bit codes per token and head, float16 scale and min", bits=8),
    CacheType("int4", "layerlab: 4-bit codes per token and head, float16 scale and min", bits=4),
    CacheType("fp8", "transformers: float8 e4m3, one frozen scale per tensor (full attention only)", backend="fp8"),
    CacheType("quanto-int4", "transformers + optimum-quanto: 4-bit groups (full attention only)", backend="quanto",
              nbits=4, package="optimum.quanto"),
    CacheType("quanto-int2", "transformers + optimum-quanto: 2-bit groups (full attention only)", backend="quanto",
              nbits=2, package="optimum.quanto"),
    CacheType("hqq-int8", "transformers + hqq: 8-bit groups (full attention only)", backend="hqq", nbits=8,
              package="hqq"),
    CacheType("hqq-int4", "transformers + hqq: 4-bit groups (full attention only)", backend="hqq", nbits=4,
              package="hqq"),
)}
_PIP_NAMES = {"optimum.quanto": "optimum-quanto", "hqq": "hqq"}


@dataclass(frozen=True)
class CacheSettings:
    """Which KV cache a model runs with (`CACHE_TYPES`)."""

    kind: str = "full"

    def __post_init__(self) -> None:
        _choose(self.kind, tuple(CACHE_TYPES), "KV cache type")

    @property
    def type(self) -> CacheType:
        return CACHE_TYPES[self.kind]

    def check(self, layer_types: Iterable[str], model_type: str) -> None:
        """Refuse a cache type this model cannot take, from its config's attention types (before any work)."""
        import importlib.util

        kind = self.type
        if kind.package and importlib.util.find_spec(kind.package.split(".")[0]) is None:
            raise SettingsError(f"KV cache {self.kind!r} needs the {_PIP_NAMES[kind.package]} package "
                                f"(pip install {_PIP_NAMES[kind.package]}), which is not installed; "
                                f"use int{kind.nbits if kind.nbits in (4, 8) else 4} (layerlab's own) instead")
        others = sorted(set(layer_types) - {"full_attention", "dummy"})
        if kind.backend and others:
            raise SettingsError(f"KV cache {self.kind!r} is transformers' QuantizedCache, which takes only models "
                                f"whose layers all use full attention; {model_type} has {', '.join(others)} "
                                "layers: use int8 or int4")


@dataclass(frozen=True)
class KVSearchSettings:
    """How `kv_search.search_kv` searches: the budget, the tolerance, the pair order, the calibration windows."""

    budget: float = 0.3  # at most this share of the plan's attention layers (of its KV memory) read another's KV
    tolerance: float = 0.05  # calibration perplexity may grow by at most this share over the start plan's
    order: str = "dissimilar"
    ctx: int = 256
    windows: int = 4
    reuse: bool = True
    merge: bool = False  # then also try MiniCache-style merges of adjacent layers from the middle down
    merge_angle: float | None = None  # their largest merging angle in degrees (None: the plan's default)
    chunk: int = 32  # merges act across forwards: their calibration loss is fed in chunks of this many tokens

    def __post_init__(self) -> None:
        _share(self.budget, "the KV budget (share of the attention layers that read another layer's KV)")
        if self.merge_angle is not None and not 0 <= self.merge_angle <= 180:
            raise SettingsError(f"--merge-angle is in degrees, 0 to 180, got {self.merge_angle}")
        if self.merge_angle is not None and not self.merge:
            raise SettingsError("--merge-angle sets the angle of --kv-merge; add --kv-merge")
        _at_least(self.chunk, 1, "chunk")
        _at_least(self.tolerance, 0, "the tolerance (share of calibration perplexity)")
        _choose(self.order, KV_ORDERS, "pair order")
        _at_least(self.ctx, 2, "ctx")
        _at_least(self.windows, 1, "windows")


def check_kv_types(plan: Plan, layer_types: tuple[str, ...]) -> None:
    """Refuse KV pairs whose layers differ in attention type (Gemma 3's sliding and global layers have
    different masks and rotary embeddings), and merged pairs that are not both full attention. Runs on the
    config's `layer_types`, so before any model loads."""
    for consumer, source in plan.kv if len(layer_types) == plan.num_layers else ():
        if layer_types[consumer] != layer_types[source]:
            raise PlanError(f"kv pair {consumer}<-{source}: layer {consumer} is {layer_types[consumer]} but "
                            f"layer {source} is {layer_types[source]}; pair layers of the same attention type")
    for first, second, _ in plan.merge if len(layer_types) == plan.num_layers else ():
        kinds = {layer_types[first], layer_types[second]}
        if kinds != {"full_attention"}:
            raise PlanError(f"kvmerge pair {first}+{second}: layer {first} is {layer_types[first]} and layer {second} "
                            f"is {layer_types[second]}; only two full-attention layers merge (sliding-window "
                            "layers are not supported)")


@dataclass(frozen=True)
class ModelSpec:
    """Which model, in which precision, on which device, and whether its own code may run."""

    source: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise SettingsError("--model is empty; give an embedded name, a folder, a .gguf file or a hub id")
        _choose(self.dtype, DTYPES, "dtype")
        if not _DEVICE.fullmatch(self.device) or (":" in self.device and not self.device.startswith("cuda")):
            raise SettingsError(f"unknown device {self.device!r}; use cpu, cuda, cuda:N, mps or auto")

    def inspect(self) -> ModelInfo:
        """The model's layer count, architecture and fingerprint from its config, and the device checked."""
        from .models import check_device, inspect_model, parse_dtype

        info = inspect_model(self.source, self.trust_remote_code)
        check_device(self.device)
        parse_dtype(self.dtype, self.device)  # bf16 on a GPU without it is refused here
        return info

    def torch_dtype(self):
        """The torch dtype this spec loads in (`auto` resolved for the device)."""
        from .models import parse_dtype

        return parse_dtype(self.dtype, self.device)

    def tokenizer(self):
        """The model's tokenizer alone (no weights load)."""
        from .models import load_tokenizer

        return load_tokenizer(self.source, self.trust_remote_code)

    def context_length(self) -> int | None:
        """The positions the model was built for, from its config (no weights load)."""
        from .models import context_length

        return context_length(self.source, self.trust_remote_code)

    def load(self):
        """(model, tokenizer)."""
        from .models import load

        return load(self.source, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code)


@dataclass(frozen=True)
class ParallelSettings:
    """Where candidate plans are evaluated: here, one after another (the default), or on Ray workers.

    `workers` N starts a local Ray runtime with N workers (each with this machine's cores // N torch
    threads unless `threads` says), or N workers on the cluster at `ray_address`.
    """

    workers: int | None = None
    ray_address: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise SettingsError(f"--workers must be at least 1 (leave it out to evaluate serially), got "
                                f"{self.workers!r}")
        if self.ray_address is not None and self.workers is None:
            raise SettingsError("--ray-address needs --workers N: how many workers to start on the cluster")
        if self.ray_address is not None and not _RAY_ADDRESS.fullmatch(self.ray_address):
            raise SettingsError(f"--ray-address {self.ray_address!r} is not HOST:PORT, ray://HOST:PORT or auto")
        _at_least(self.threads, 1, "--worker-threads")
        if self.threads is not None and self.workers is None:
            raise SettingsError("--worker-threads sets the threads of each Ray worker; give --workers N too")

    @property
    def parallel(self) -> bool:
        return self.workers is not None

    def check(self) -> None:
        """The cluster answers and Ray is installed (before any model loads); the address is checked first,
        so a wrong address is named whether or not Ray is installed yet."""
        if not self.parallel:
            return
        from .errors import require

        if self.ray_address:
            check_ray_address(self.ray_address)
        require("ray", "ray", "--workers")


_RAY_ADDRESS = re.compile(r"auto|(?:ray://)?[A-Za-z0-9_.\-]+:\d{1,5}")


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A Ray head answers at `address` (a TCP connection to its port), or a one-line error."""
    import socket

    if address == "auto":
        if not Path("/tmp/ray/ray_current_cluster").is_file():
            raise SettingsError("--ray-address auto: no Ray cluster runs on this machine; start one with "
                                "`ray start --head` or give HOST:PORT")
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SettingsError(f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); start the "
                            "head with `ray start --head` or check the address") from None


# ------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class GenerateSettings:
    model: ModelSpec = field(default_factory=ModelSpec)
    plans: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ("Once upon a time",)
    max_new_tokens: int = 32
    sample: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check_prompts(self.prompts)
        _at_least(self.max_new_tokens, 1, "max_new_tokens")
        _seed(self.seed)

    def check(self) -> None:
        for plan in self.plans:
            check_plan_source(plan)


@dataclass(frozen=True)
class EvalSettings:
    """What `evaluate_plans` measures and on which data; `None` limits mean all the data has."""

    tasks: tuple[str, ...] = ("ppl", "hellaswag", "samples", "speed")  # or text, e.g. "suite,ppl"
    rows: int | None = 100  # rows per zero-shot task (MMLU groups: round-robin over subjects)
    task_data: str | None = None  # folder with the full task files; None = the bundled subsets
    task_batch_size: int | None = None  # None: shared contexts (CPU); B: whole sequences B at a time (GPU)
    ppl_text: str = "wikitext2-test"
    ctx: int = 512
    stride: int | None = None
    ppl_windows: int | None = 20
    batch_size: int = 4  # perplexity windows per forward pass
    prompts: tuple[str, ...] = ("Once upon a time",)
    max_new_tokens: int = 32
    speed_prompt_tokens: int = 128
    speed_decode_tokens: int = 32
    speed_rounds: int = 3  # interleaved rounds at least ...
    speed_max_rounds: int = 9  # ... added while the per-round ratios disagree, up to this many
    speed_max_spread: float = 0.10  # disagreement: interquartile range / median of the per-round ratios
    confidence: float = 0.95
    seed: int = 0  # of the bootstrap behind the average's interval

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", parse_tasks(self.tasks))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        _at_least(self.ctx, 2, "ctx")
        _at_least(self.stride, 1, "stride")
        if self.stride is not None and self.stride > self.ctx:
            raise SettingsError(f"stride {self.stride} is larger than ctx {self.ctx}; use a stride up to ctx")
        for name in ("rows", "task_batch_size", "ppl_windows", "batch_size", "max_new_tokens", "speed_prompt_tokens",
                     "speed_decode_tokens", "speed_rounds"):
            _at_least(getattr(self, name), 1, name)
        _check_prompts(self.prompts)
        if self.speed_max_rounds < self.speed_rounds:
            raise SettingsError(f"speed_max_rounds {self.speed_max_rounds} is below speed_rounds "
                                f"{self.speed_rounds}; raise it")
        _share(self.speed_max_spread, "speed_max_spread")
        if not 0.5 <= self.confidence < 1:
            raise SettingsError(f"confidence {self.confidence} must be between 0.5 and 1, e.g. 0.95")
        _seed(self.seed)

    @property
    def zero_shot(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t in ZERO_SHOT_TASKS)

    def check(self) -> dict:
        """Every task's rows (`evaluate.tasks.TaskData` by name), read and checked row by row, and the
        perplexity text: a missing or malformed file fails with its name and line before a model loads."""
        from .evaluate.tasks import load_task

        if "ppl" in self.tasks:
            check_text_source(self.ppl_text, "--ppl-text")
        return {name: load_task(name, self.rows, self.task_data) for name in self.zero_shot}


@dataclass(frozen=True)
class EvalJob:
    """`layerlab eval`: several plans side by side in one model load, written to `out`; with `store`,
    each (plan, task) result is kept in that folder as soon as it is measured and reused by a rerun."""

    model: ModelSpec = field(default_factory=ModelSpec)
    plans: tuple[str, ...] = ()
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    out: str = "layerlab-eval.json"
    force: bool = False
    store: str | None = None
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)  # the KV cache every plan runs with

    def __post_init__(self) -> None:
        if self.cache.kind != "full" and self.parallel.parallel:
            raise SettingsError("--kv-cache runs in this process only; drop --workers / --ray-address")
        if self.store and self.cache.kind != "full":
            raise SettingsError("--store keeps results without the KV cache type; evaluate --kv-cache "
                                f"{self.cache.kind} without --store (or into another --out)")

    def check(self, info: ModelInfo | None = None) -> None:
        self.parallel.check()
        for plan in self.plans:
            check_plan_source(plan)
        self.evaluation.check()
        if info is not None:
            self.cache.check(info.layer_types, info.model_type)
        task_data = [self.evaluation.task_data] if self.evaluation.task_data else []
        inputs = _inputs(info, [*plan_inputs(self.plans), *task_data])
        check_output(self.out, force=self.force, inputs=inputs)
        if self.store:
            check_store(self.store, inputs)


def check_store(folder: str, inputs: list[str | Path]) -> None:
    """A results folder to continue: missing, empty, or one layerlab wrote (never an input)."""
    from .io import read_manifest

    path = Path(folder)
    check_not_an_input(path, inputs)
    check_writable(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--store {folder} is a file; give a folder for the per-task results")
    if path.is_dir() and any(path.iterdir()) and read_manifest(path) is None:
        raise OutputError(f"--store {folder} holds files layerlab did not write; choose another folder")


@dataclass(frozen=True)
class ScoreSettings:
    """`layerlab score`: the hook metrics (and optionally perplexity deltas) of a plan's steps."""

    model: ModelSpec = field(default_factory=ModelSpec)
    plan: str = "all"
    text: str = "wikitext2-valid"
    ctx: int = 512
    windows: int = 8
    tokens: str = "all"
    ppl_delta: bool = False
    out: str = "layerlab-score"
    force: bool = False
    streamed: bool = False  # one decoder layer in memory at a time (models larger than memory)

    def __post_init__(self) -> None:
        if self.streamed and self.ppl_delta:
            raise SettingsError("--ppl-delta runs the whole model for every unit; drop --streamed or --ppl-delta")
        if self.streamed and self.model.device == "auto":
            raise SettingsError("--streamed runs one layer at a time on one device; give --device cpu or cuda")
        _at_least(self.ctx, 2, "ctx")
        _at_least(self.windows, 1, "windows")
        _choose(self.tokens, TOKEN_MODES, "--tokens")

    def check(self, info: ModelInfo | None = None) -> None:
        check_plan_source(self.plan)
        check_text_source(self.text, "--text")
        check_output(self.out, folder=True, force=self.force,
                     inputs=_inputs(info, [*plan_inputs((self.plan,)), *_file_inputs(self.text)]))


@dataclass(frozen=True)
class AnalyzeSettings:
    """`layerlab analyze`: attention maps, spectra, hidden-state cosine and logit lens of plans."""

    model: ModelSpec = field(default_factory=ModelSpec)
    plans: tuple[str, ...] = ()
    prompt: str = "The capital of France is"
    out: str = "layerlab-analysis"
    force: bool = False
    max_heads: int = 8
    top_k: int = 5

    def __post_init__(self) -> None:
        _check_prompts((self.prompt,))
        _at_least(self.max_heads, 1, "max_heads")
        _at_least(self.top_k, 1, "top_k")

    def check(self, info: ModelInfo | None = None) -> None:
        for plan in self.plans:
            check_plan_source(plan)
        check_output(self.out, folder=True, force=self.force, inputs=_inputs(info, plan_inputs(self.plans)))


@dataclass(frozen=True)
class SearchSettings:
    """`layerlab search`: how much to remove, by which method, on which calibration text."""

    model: ModelSpec = field(default_factory=ModelSpec)
    remove: int | None = None
    fraction: float | None = None
    target_speedup: float | None = None
    method: str = "greedy"
    granularity: str = "layer"
    text: str = "wikitext2-valid"
    ctx: int = 256
    windows: int = 4
    keep: float = 1.0
    state: str | None = None
    resume: bool = False
    force: bool = False
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    streamed: bool = False  # one-shot methods: score one decoder layer at a time (models larger than memory)
    kv: KVSearchSettings | None = None  # search a KV-sharing map (its budget is --fraction) instead of removals
    start: str | None = None  # --kv: the plan the map is searched on top of (text or file; no repeats)

    def __post_init__(self) -> None:
        if self.parallel.parallel and self.method != "greedy":
            raise SettingsError("--workers fans out the rounds of a greedy search; a one-shot method is one "
                                "scoring pass: drop --workers")
        if self.streamed and self.method == "greedy":
            raise SettingsError("--streamed scores one layer at a time for the one-shot methods (bi, angular, "
                                "cosine); the greedy search needs the whole model: choose --method bi, angular "
                                "or cosine")
        if self.streamed and self.model.device == "auto":
            raise SettingsError("--streamed runs one layer at a time on one device; give --device cpu or cuda")
        given = sum(x is not None for x in (self.remove, self.fraction, self.target_speedup))
        if self.kv is not None:
            self._check_kv()
        elif given != 1:
            raise SettingsError("give exactly one of --remove, --fraction or --target-speedup")
        elif self.start is not None:
            raise SettingsError("--start is the plan a --kv search starts from; add --kv")
        _choose(self.method, SEARCH_METHODS, "method")
        _choose(self.granularity, GRANULARITIES, "granularity")
        _at_least(self.remove, 1, "--remove")
        _share(self.fraction, "--fraction")
        if self.target_speedup is not None and not 1 < self.target_speedup < math.inf:
            raise SettingsError(f"--target-speedup must be a number larger than 1, got {self.target_speedup}")
        if self.method != "greedy" and self.target_speedup is not None:
            raise SettingsError("one-shot methods take --remove or --fraction; --target-speedup needs greedy")
        _at_least(self.ctx, 2, "ctx")
        _at_least(self.windows, 1, "windows")
        if not 0 < self.keep <= 1:
            raise SettingsError(f"--keep must be in (0, 1], got {self.keep}")
        if (self.resume or self.force) and not self.state:
            raise SettingsError("--resume and --force refer to a --state file; give --state")
        if self.resume and self.force:
            raise SettingsError("--resume continues a search and --force starts over; give one")
        if self.state and self.method != "greedy":
            raise SettingsError("--state records a greedy search; one-shot methods have no state")

    def _check_kv(self) -> None:
        """`search --kv`: the budget is the KV share (--fraction); the layer-removal options do not apply."""
        if any(x is not None for x in (self.remove, self.fraction, self.target_speedup)):
            raise SettingsError("--kv takes its budget as --fraction (share of the KV memory to share) in "
                                "KVSearchSettings.budget; drop --remove / --target-speedup")
        if self.method != "greedy" or self.granularity != "layer" or self.keep != 1:
            raise SettingsError("--kv searches pairs of layers; drop --method, --granularity and --keep")
        if self.parallel.parallel:
            raise SettingsError("--kv searches in this process only; drop --workers / --ray-address")

    def units(self, num_layers: int) -> int:
        return num_layers * (2 if self.granularity == "sublayer" else 1)

    def removals(self, num_layers: int) -> int | None:
        """The number of units to remove (None for a speed-up target), checked against the model."""
        if self.target_speedup is not None:
            return None
        units = self.units(num_layers)
        remove = self.remove if self.remove is not None else round(self.fraction * units)
        if not 1 <= remove < units:
            raise SettingsError(f"the budget removes {remove} of the model's {units} units; ask for 1 to {units - 1}")
        return remove

    def check(self, info: ModelInfo | None = None) -> None:
        self.parallel.check()
        check_text_source(self.text, "--text")
        if self.start is not None:
            check_plan_source(self.start)
        if info is not None and self.kv is None:
            self.removals(info.num_layers)
        if not self.state:
            return
        inputs = _inputs(info, _file_inputs(self.text))
        if self.resume:  # the state is continued in place: it only must not be an input, and be writable
            check_not_an_input(self.state, inputs)
            check_writable(self.state)
        else:
            check_output(self.state, force=self.force, inputs=inputs)


@dataclass(frozen=True)
class HealSettings:
    """LoRA training settings. The defaults heal SmolLM2-135M minus 6 layers in about 9 minutes on 2 CPU
    cores (5.1 s per step; 100 steps of 4 x 256 tokens are about one pass over Frankenstein)."""

    steps: int = 100
    lr: float = 2e-4
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: the architecture's row in arch.py
    ctx: int = 256
    batch_size: int = 4
    warmup: int = 10  # linear warm-up steps, then a cosine decay to 10 % of lr
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "alpha", "batch_size", "checkpoint_every"):
            _at_least(getattr(self, name), 1, name)
        _at_least(self.ctx, 2, "ctx")
        _at_least(self.warmup, 0, "warmup")
        _seed(self.seed)
        if not 0 < self.lr < 1:
            raise SettingsError(f"lr must be between 0 and 1, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not all(m and isinstance(m, str) for m in self.target_modules):
            raise SettingsError(f"--modules must name modules, got {self.target_modules!r}")


@dataclass(frozen=True)
class PatchSettings:
    """How to fit the linear patch (patch.py). The defaults fit SmolLM2 minus 6 layers in minutes on 2 CPU cores."""

    calibration: tuple[str, ...] = CALIBRATION_MIX  # texts (bundled names or files), mixed evenly
    tokens: int = 8192  # calibration token budget
    ctx: int = 256
    form: str = "auto"
    objective: str = "lstsq"
    ridge: float = 1e-4  # times the mean of diag(XᵀX)
    steps: int = 300  # Adam steps (cosine objective; rotation form)
    lr: float = 1e-4
    batch_tokens: int = 1024  # tokens per Adam step (cosine objective)
    seed: int = 0
    store: str | None = None  # folder for the streamed activations of the cosine objective (default: temp)

    def __post_init__(self) -> None:
        _choose(self.form, PATCH_FORMS, "patch form")
        _choose(self.objective, PATCH_OBJECTIVES, "patch objective")
        if not self.calibration:
            raise SettingsError("no calibration text given; name at least one (e.g. wikitext2-valid)")
        for name, low in (("tokens", 2), ("ctx", 2), ("steps", 1), ("batch_tokens", 1)):
            _at_least(getattr(self, name), low, f"patch {name}")
        _at_least(self.ridge, 0, "patch ridge")
        if not 0 < self.lr < 1:
            raise SettingsError(f"patch lr must be between 0 and 1, got {self.lr}")
        _seed(self.seed)
        if self.windows_per_text == 0:
            raise SettingsError(f"a budget of {self.tokens} tokens gives none of the {len(self.calibration)} "
                                f"calibration texts a window of {self.ctx} tokens; raise it to at least "
                                f"{self.ctx * len(self.calibration)}")

    @property
    def windows_per_text(self) -> int:
        """Windows of `ctx` tokens each calibration text gives (the budget split evenly)."""
        return self.tokens // (self.ctx * len(self.calibration))

    def check(self) -> None:
        for source in self.calibration:
            check_text_source(source, "calibration text")


@dataclass(frozen=True)
class DistillSettings:
    """Distillation on top of the LoRA loop's settings (`training`: steps, lr, rank, batch, seed, checkpoints)."""

    training: HealSettings = field(default_factory=HealSettings)
    temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of the hidden-state term at the kept boundaries (0: KL only)
    teacher: str = "all"  # the teacher plan: it must be the full model (the same weights, every layer)

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise SettingsError(f"the distillation temperature must be positive, got {self.temperature}")
        _at_least(self.hidden_weight, 0, "the hidden-state weight")

    def check(self, num_layers: int) -> None:
        """The teacher plan is the full model: the student learns what the removed layers did."""
        from .plan import Plan

        if not Plan.parse(self.teacher, num_layers).is_identity:
            raise SettingsError(f"the distillation teacher must be the full model (plan 'all'), got "
                                f"{self.teacher!r}; the teacher runs the same weights with every layer")


@dataclass(frozen=True)
class RecoverSettings:
    """Which recovery (`RECOVERIES`), and the settings of each part."""

    method: str = "auto"
    patch: PatchSettings = field(default_factory=PatchSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    training: HealSettings = field(default_factory=HealSettings)  # lora and kd: the LoRA loop
    data: tuple[str, ...] = CALIBRATION_MIX  # lora and kd training text, mixed evenly

    def __post_init__(self) -> None:
        _choose(self.method, tuple(RECOVERIES), "recovery")
        if not self.data:
            raise SettingsError("no training text given; name at least one (e.g. frankenstein)")

    @property
    def patches(self) -> bool:
        return self.method in ("patch", "patch+kd", "auto")

    @property
    def trains(self) -> bool:
        return self.method in ("lora", "kd", "patch+kd")

    def check(self, num_layers: int | None = None, evaluation_text: str | None = None) -> None:
        """Texts exist (and are not the evaluation text); the teacher is the full model."""
        if self.patches:
            self.patch.check()
        if self.trains:
            for source in self.data:
                check_text_source(source, "training text")
                if evaluation_text is not None:
                    check_distinct_texts(source, evaluation_text, "the training text", "the evaluation text")
        if "kd" in self.method and num_layers is not None:
            self.distill.check(num_layers)

    def check_plan(self, plan) -> None:
        """A plan the method cannot express (`plan.Plan`): one line, before the model loads."""
        if self.method in ("patch", "patch+kd"):
            check_patch_plan(plan)
        if "kd" in self.method and plan.is_identity:
            raise SettingsError("the plan removes nothing, so the student is the teacher; distill a pruned plan")

    def calibration_needs(self) -> list[tuple]:
        """(option, source, tokens, window) each text must hold, for `check_windows` (tokenizer only)."""
        needs = []
        if self.patches:
            share = self.patch.windows_per_text * self.patch.ctx
            needs += [(f"calibration text ({self.patch.windows_per_text} windows of {self.patch.ctx})", source,
                       share, self.patch.ctx) for source in self.patch.calibration]
        if self.trains:
            needs += [("training text", source, self.training.ctx) for source in self.data]
        return needs


def check_patch_plan(plan) -> None:
    """A linear patch replaces runs of whole removed layers after a kept layer, in a model run in order."""
    if not plan.whole_layers:
        halves = ", ".join(str(s.layer) for s in plan.steps if not (s.attention and s.mlp))
        raise SettingsError(f"a linear patch replaces whole removed layers, but the plan drops only a half of "
                            f"layer(s) {halves}; patch a whole-layer plan, or heal this one with lora or kd")
    if list(plan.layers) != sorted(set(plan.layers)):
        raise SettingsError(f"a linear patch replaces removed layers of a model run in order, but plan "
                            f"{plan.to_text()} repeats or reorders layers; heal it with lora or kd instead")
    if plan.is_identity:
        raise SettingsError("the plan removes no layer; there is nothing to patch")
    if 0 not in plan.layers:
        raise SettingsError("the plan removes layer 0, and a patch folds into the kept layer before a removed run; "
                            "keep layer 0, or heal with lora or kd instead")


@dataclass(frozen=True)
class HealJob:
    """`layerlab heal`: recover a pruned model (`method`: LoRA by default), evaluated on held-out text, written
    to `out`."""

    model: ModelSpec = field(default_factory=ModelSpec)
    plan: str = "all"
    method: str = "lora"  # a name of RECOVERIES
    data: str = "frankenstein"  # lora and kd training text
    training: HealSettings = field(default_factory=HealSettings)
    patch: PatchSettings = field(default_factory=PatchSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval_text: str = "wikitext2-test"
    eval_windows: int = 4
    out: str = "layerlab-healed"
    force: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _at_least(self.eval_windows, 0, "eval_windows")
        if self.resume and self.force:
            raise SettingsError("--resume continues from checkpoints and --force starts over; give one")
        self.recovery()  # an unknown method is refused here

    def recovery(self) -> RecoverSettings:
        """The recovery this job runs."""
        return RecoverSettings(self.method, self.patch, self.distill, self.training, (self.data,))

    def check(self, info: ModelInfo | None = None) -> None:
        from .heal import checkpoint_folder
        from .plan import Plan

        check_plan_source(self.plan)
        recovery = self.recovery()
        recovery.check(info.num_layers if info is not None else None, self.eval_text if self.eval_windows else None)
        if info is not None:
            recovery.check_plan(Plan.load(self.plan, info.num_layers))
        if self.eval_windows:
            check_text_source(self.eval_text, "--eval-text")
            if recovery.patches:
                for source in self.patch.calibration:
                    check_distinct_texts(source, self.eval_text, "the calibration text",
                                         "the evaluation text (--eval-text)")
        inputs = _inputs(info, [*plan_inputs((self.plan,)), *_file_inputs(self.data, self.eval_text,
                                                                          *self.patch.calibration)])
        check_output(self.out, folder=True, force=self.force, inputs=inputs)
        if not self.resume:
            check_output(checkpoint_folder(self.out), folder=True, force=self.force, inputs=inputs)


@dataclass(frozen=True)
class SpeculativeSettings:
    """How to draft and how to choose tokens. `min_confidence=0, min_ratio=0` drafts `max_draft` always."""

    max_draft: int = 8
    min_confidence: float = 0.5
    min_ratio: float = 1.0
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self.max_draft, 1, "max_draft")
        _at_least(self.min_confidence, 0, "min_confidence")  # above 1: never confident, one draft per cycle
        _at_least(self.min_ratio, 0, "min_ratio")
        _seed(self.seed)
        if not 0 < self.temperature < math.inf:
            raise SettingsError(f"temperature must be positive, got {self.temperature}; greedy is sample=False")


@dataclass(frozen=True)
class SpeculateSettings:
    """`layerlab speculate`: self-speculative decoding of one prompt with a draft plan (or 'auto')."""

    model: ModelSpec = field(default_factory=ModelSpec)
    draft_plan: str = "auto"
    prompt: str = "Once upon a time"
    max_new_tokens: int = 64
    decoding: SpeculativeSettings = field(default_factory=SpeculativeSettings)
    search_text: str = "wikitext2-valid"
    parallel: ParallelSettings = field(default_factory=ParallelSettings)  # where 'auto' measures its candidates

    def __post_init__(self) -> None:
        _check_prompts((self.prompt,))
        _at_least(self.max_new_tokens, 1, "max_new_tokens")
        if self.parallel.parallel and self.draft_plan != "auto":
            raise SettingsError("--workers fans out the candidates of --draft-plan auto; with a given draft plan "
                                "drop --workers / --ray-address")

    def check(self) -> None:
        self.parallel.check()
        if self.draft_plan == "auto":
            check_text_source(self.search_text, "--search-text")
        else:
            check_plan_source(self.draft_plan)


def check_shipping(fmt: str | None, quant: str) -> Quant:
    """A format and `--quant` that can go together (checked before anything is read); the parsed quant."""
    if fmt is not None:
        _choose(fmt, EXPORT_FORMATS, "export format")
    parsed = Quant.parse(quant)
    if fmt == "hf" and not parsed.floats_only:
        raise SettingsError(f"a Hugging Face folder holds float weights: --quant {parsed.to_text()} needs "
                            "--format gguf (with --format hf use source, F32, F16 or BF16)")
    return parsed


def output_format(fmt: str | None, info: ModelInfo) -> str:
    """The format written: the one asked for, else the source's (a .gguf source gives a GGUF)."""
    is_gguf = isinstance(info.path, Path) and info.path.suffix.lower() == ".gguf"
    chosen = fmt or ("gguf" if is_gguf else "hf")
    if chosen == "gguf" and not is_gguf:
        raise SettingsError(f"GGUF output reuses a GGUF source's tokenizer and metadata, and {info.source!r} is "
                            "not a .gguf file; use --format hf, or convert it with llama.cpp's "
                            "convert_hf_to_gguf.py first")
    return chosen


@dataclass(frozen=True)
class ExportSettings:
    """`layerlab export`: a physically smaller model at `out`, by default in the source's format and
    quantization (`format=None`, `quant="source"`; `layerlab.quant` lists the types)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    plan: str = "all"
    out: str = "layerlab-export"
    format: str | None = None
    remote_code: bool = False
    eval_windows: int = 8
    force: bool = False
    quant: str = "source"

    def __post_init__(self) -> None:
        check_shipping(self.format, self.quant)
        _at_least(self.eval_windows, 0, "eval_windows")

    @property
    def quantization(self) -> Quant:
        return Quant.parse(self.quant)

    def check(self, info: ModelInfo | None = None) -> None:
        check_plan_source(self.plan)
        inputs = _inputs(info, plan_inputs((self.plan,)))
        fmt = output_format(self.format, info) if info is not None else self.format
        check_output(self.out, folder=fmt == "hf", force=self.force, inputs=inputs)
        if fmt == "gguf":
            check_output(Path(self.out).with_suffix(".md"), force=self.force, inputs=inputs)


DEFAULT_DROP = 0.2
QUICK_EVAL = EvalSettings(tasks=("ppl", "suite", "samples", "speed"), rows=25, ppl_windows=8, max_new_tokens=24,
                          speed_rounds=2, speed_max_rounds=5)  # the main job: the zero-shot suite, 25 rows a task


@dataclass(frozen=True)
class PruneSettings:
    """The main job's knobs; the defaults run in minutes on a laptop CPU for a small model."""

    drop: float | None = None  # share of the units (layers, or halves) to remove; DEFAULT_DROP if no budget
    layers: int | None = None  # or a number of units
    target_speedup: float | None = None  # or remove until the executed parameter bytes shrink this much
    granularity: str = "layer"
    calibration: str = "wikitext2-valid"
    calib_ctx: int = 256
    calib_windows: int = 4
    keep: float = 0.5  # greedy: share of candidates kept each round (llama.cpp-style pruning)
    evaluation: EvalSettings = QUICK_EVAL
    recovery: RecoverSettings = field(default_factory=RecoverSettings)  # `auto`: patch when it lowers calib. loss
    export: bool = True
    export_format: str | None = None  # None: the source's (EXPORT_FORMATS)
    quant: str = "source"  # layerlab.quant: source, a registry type or HIGH/LOW@BUDGET
    method: str = "auto"  # auto: greedy and one-shot compared (the full job); a ONE_SHOT_METHODS name: that alone
    streamed: bool = False  # one-shot: score one decoder layer at a time and copy the GGUF's tensors

    def __post_init__(self) -> None:
        check_shipping(self.export_format, self.quant)
        _choose(self.method, PRUNE_METHODS, "--method")
        if self.method != "auto":
            self._check_one_shot()
        elif self.streamed:
            raise SettingsError("--streamed prunes by a one-shot method from scores read one layer at a time; the "
                                "greedy search needs the whole model: add --method bi, angular or cosine")
        if sum(x is not None for x in (self.drop, self.layers, self.target_speedup)) > 1:
            raise SettingsError("give at most one of --drop, --layers or --target-speedup")
        _share(self.drop, "--drop")
        _at_least(self.layers, 1, "--layers")
        if self.target_speedup is not None and not 1 < self.target_speedup < math.inf:
            raise SettingsError(f"--target-speedup must be a number larger than 1, got {self.target_speedup}")
        _choose(self.granularity, GRANULARITIES, "granularity")
        _at_least(self.calib_ctx, 2, "calibration ctx")
        _at_least(self.calib_windows, 1, "calibration windows")
        if not 0 < self.keep <= 1:
            raise SettingsError(f"--keep must be in (0, 1], got {self.keep}")
        if self.recovery.method in ("patch", "patch+kd") and self.granularity != "layer":
            raise SettingsError(f"--heal {self.recovery.method} patches whole removed layers, but --granularity "
                                f"{self.granularity} may remove halves; use --granularity layer, or --heal auto, "
                                "lora or kd")

    def _check_one_shot(self) -> None:
        """A one-shot prune scores, chooses and exports; evaluating and recovering need the whole model."""
        if self.target_speedup is not None:
            raise SettingsError(f"--method {self.method} removes a number of units; give --drop or --layers instead "
                                "of --target-speedup (which needs the greedy search: --method auto)")
        if self.recovery.method not in ("none", "auto"):  # auto (the default) recovers only where it can
            raise SettingsError(f"--method {self.method} exports the plan its scores choose, with no evaluation or "
                                f"recovery (they load the whole model): drop --heal {self.recovery.method}, or use "
                                "--method auto")
        if self.method in ("bi", "angular") and self.granularity != "layer":
            raise SettingsError(f"--method {self.method} ranks whole layers; use --granularity layer, or --method "
                                "cosine for halves")

    @property
    def heal(self) -> str:
        """The recovery method (`--heal`)."""
        return self.recovery.method

    def removals(self, num_layers: int) -> int | None:
        """The number of units to remove (None for a speed-up target), checked against the model."""
        if self.target_speedup is not None:
            return None
        units = num_layers * (2 if self.granularity == "sublayer" else 1)
        share = self.drop if self.drop is not None else DEFAULT_DROP
        remove = self.layers if self.layers is not None else round(share * units)
        if not 1 <= remove < units:
            raise SettingsError(f"the budget removes {remove} of the model's {units} units; ask for 1 to {units - 1}")
        return remove

    def check(self, num_layers: int | None = None) -> None:
        if num_layers is not None:
            self.removals(num_layers)
        check_text_source(self.calibration, "--calibration")
        self.evaluation.check()
        self.recovery.check(num_layers, self.evaluation.ppl_text)
        if self.recovery.patches:
            for source in self.recovery.patch.calibration:
                check_distinct_texts(source, self.evaluation.ppl_text, "the calibration text", "the evaluation text")


@dataclass(frozen=True)
class PruneJob:
    """`layerlab prune`: the main job on a model, into the run folder `out`."""

    model: ModelSpec = field(default_factory=ModelSpec)
    settings: PruneSettings = field(default_factory=PruneSettings)
    out: str = "layerlab-prune"
    resume: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        if self.resume and self.force:
            raise SettingsError("--resume continues a run and --force starts over; give one")

    def inputs(self, info: ModelInfo | None) -> list[str | Path]:
        evaluation = self.settings.evaluation
        recovery = self.settings.recovery
        return _inputs(info, [*_file_inputs(self.settings.calibration, evaluation.ppl_text, *recovery.data,
                                            *recovery.patch.calibration),
                              *([evaluation.task_data] if evaluation.task_data else [])])
