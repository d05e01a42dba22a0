"""Command line: parse arguments, call the library, print. Errors print one line and exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import LayerlabError
from .heal import HealSettings
from .plan import Plan, unique_plans

console = Console(width=None if sys.stdout.isatty() else 240)  # pipes get whole tables

PLAN_FORMATS = ("table", "text", "json", "llm-drop", "llama-cpp", "mergekit")


def model_option(**kwargs):
    """The --model option every model command takes."""
    kwargs = {"default": "smollm2-135m", "show_default": True} if not kwargs else kwargs
    return click.option("--model", "-m", "source", help="Embedded name, Hugging Face folder, .gguf file or hub id.",
                        **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """layerlab: depth surgery on transformer language models."""


@cli.command()
def models() -> None:
    """List the embedded models and whether their packages are installed."""
    from .models import model_status

    table = Table("name", "description", "installed")
    for row in model_status():
        table.add_row(row["name"], row["description"], row["installed"])
    console.print(table)


@cli.command()
@model_option()
@click.option("--plan", "-p", "plans", multiple=True, help="Layer plan (repeatable); 'all' is always shown first.")
@click.option("--prompt", "prompts", multiple=True, default=["Once upon a time"], show_default=True,
              help="Prompt (repeatable).")
@click.option("--max-new-tokens", "-n", default=32, show_default=True, type=click.IntRange(1))
@click.option("--sample", is_flag=True, help="Seeded sampling instead of greedy decoding.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
def generate(source, plans, prompts, max_new_tokens, sample, seed, dtype, device) -> None:
    """Generate from prompts with several plans, printed side by side."""
    from .evaluate.samples import generate_table
    from .models import layer_count, load

    n = layer_count(source)
    parsed = unique_plans([Plan.identity(n)] + [Plan.load(p, n) for p in plans])
    model, tokenizer = load(source, dtype=dtype, device=device)
    rows = generate_table(model, tokenizer, list(prompts), parsed, max_new_tokens=max_new_tokens,
                          do_sample=sample, seed=seed)
    table = Table("plan", "steps", "tok/s", "generation", show_lines=True)
    for plan, row in zip([p for p in parsed for _ in prompts], rows, strict=True):
        table.add_row(row.plan, str(len(plan.steps)), f"{row.tokens_per_second:.1f}",
                      f"[dim]{row.prompt}[/dim]{row.text}")
    console.print(table)


@cli.command("eval")
@model_option()
@click.option("--plan", "-p", "plans", multiple=True, help="Layer plan (repeatable); 'all' is the baseline row.")
@click.option("--tasks", "-t", default="ppl,mc,samples,speed", show_default=True,
              help="Comma-separated: ppl, mc, samples, speed.")
@click.option("--ppl-text", default="wikitext2-test", show_default=True,
              help="Bundled corpus name, text file or hf:DATASET[:CONFIG]:SPLIT[:FIELD].")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(2))
@click.option("--stride", type=click.IntRange(1), help="Sliding windows scoring only new tokens (default: none).")
@click.option("--ppl-windows", default=20, show_default=True, type=click.IntRange(0), help="0 means all windows.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--mc-data", default="hellaswag-2k", show_default=True, help="Bundled name or JSONL file.")
@click.option("--mc-items", default=100, show_default=True, type=click.IntRange(0), help="0 means all items.")
@click.option("--prompt", "prompts", multiple=True, default=["Once upon a time"], show_default=True)
@click.option("--max-new-tokens", "-n", default=32, show_default=True, type=click.IntRange(1))
@click.option("--speed-rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="JSON results path (default: a new timestamped file).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def eval_command(source, plans, tasks, ppl_text, ctx, stride, ppl_windows, batch_size, mc_data, mc_items, prompts,
                 max_new_tokens, speed_rounds, out, force, dtype, device) -> None:
    """Evaluate several plans side by side: one table with a baseline row and deltas, plus JSON."""
    import json
    import time

    from .evaluate.compare import EvalSettings, evaluate_plans
    from .io import atomic_write_text, check_output
    from .models import layer_count, load

    n = layer_count(source)
    parsed = unique_plans([Plan.identity(n)] + [Plan.load(p, n) for p in plans])
    settings = EvalSettings(ppl_text=ppl_text, ctx=ctx, stride=stride, ppl_windows=ppl_windows or None,
                            batch_size=batch_size, mc_data=mc_data, mc_items=mc_items or None,
                            prompts=tuple(prompts), max_new_tokens=max_new_tokens, speed_rounds=speed_rounds)
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip())
    out = out or time.strftime("layerlab-eval-%Y%m%d-%H%M%S.json")
    check_output(out, force=force)  # before hours of work, not after
    model, tokenizer = load(source, dtype=dtype, device=device)
    results = evaluate_plans(model, tokenizer, parsed, task_list, settings) | {"model": source}
    console.print(_results_table(results))
    atomic_write_text(out, json.dumps(results, indent=2), force=force)
    console.print(f"results written to {out}")


RESULT_COLUMNS = [  # (task, header, cell) for the eval table
    ("ppl", "ppl", lambda r: f"{r['ppl']['perplexity']:.2f}"),
    ("ppl", "Δppl", lambda r: f"{r['delta']['ppl_pct']:+.1f}%"),
    ("mc", "acc", lambda r: f"{r['mc']['acc']:.3f}"),
    ("mc", "acc_norm", lambda r: f"{r['mc']['acc_norm']:.3f}"),
    ("mc", "Δacc_norm", lambda r: f"{r['delta']['acc_norm']:+.3f}"),
    ("speed", "prefill tok/s", lambda r: f"{r['speed']['prefill_tokens_per_s']:.0f}"),
    ("speed", "decode tok/s", lambda r: f"{r['speed']['decode_tokens_per_s']:.1f}"),
    ("speed", "decode ×", lambda r: f"{r['delta']['decode_speedup']:.2f}"),
    ("speed", "params MB", lambda r: f"{r['speed']['parameter_bytes'] / 2**20:.0f}"),
    ("samples", "sample", lambda r: r["samples"][0]["prompt"] + r["samples"][0]["text"]),
]


def _results_table(results: dict) -> Table:
    """One row per plan; deltas against the baseline (first) row."""
    rows = results["rows"]
    columns = [(header, cell) for task, header, cell in RESULT_COLUMNS if task in rows[0]]
    table = Table("plan", "steps", *(header for header, _ in columns), show_lines=True)
    for row in rows:
        table.add_row(row["plan"], str(row["steps"]), *(cell(row) for _, cell in columns))
    return table


@cli.command()
@model_option()
@click.option("--draft-plan", "-d", required=True,
              help="Layer plan the model drafts with (text or file), or 'auto' to search for one.")
@click.option("--prompt", required=True, help="Prompt to continue.")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(1))
@click.option("--sample", is_flag=True, help="Exact speculative sampling instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", default=0, show_default=True)
@click.option("--max-draft", default=8, show_default=True, type=click.IntRange(1), help="Most drafts per verification.")
@click.option("--min-confidence", default=0.5, show_default=True,
              help="Stop drafting after a token whose draft probability is below this.")
@click.option("--min-ratio", default=1.0, show_default=True,
              help="Stop drafting after a token whose top-1/top-2 probability ratio is below this.")
@click.option("--search-text", default="wikitext2-valid", show_default=True, help="Calibration text for 'auto'.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
def speculate(source, draft_plan, prompt, max_new_tokens, sample, temperature, seed, max_draft, min_confidence,
              min_ratio, search_text, dtype, device) -> None:
    """Self-speculative decoding: draft with a layer plan, verify with every layer; output equals plain decoding."""
    from .models import load
    from .speculative import SpeculativeSettings, break_even_summary, compare_with_plain

    model, tokenizer = load(source, dtype=dtype, device=device)
    settings = SpeculativeSettings(max_draft=max_draft, min_confidence=min_confidence, min_ratio=min_ratio,
                                   sample=sample, temperature=temperature, seed=seed)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    plan = _searched_draft_plan(model, tokenizer, prompt, search_text, settings) if draft_plan == "auto" else (
        Plan.load(draft_plan, n))
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    result = compare_with_plain(model, ids, plan, max_new_tokens, settings)
    console.print(f"[dim]{prompt}[/dim]{tokenizer.decode(result.ids[0, ids.shape[1]:], skip_special_tokens=True)}")
    console.print(_speculation_table(f"draft plan {plan} ({len(plan.steps)} of {n} steps)", [result.stats]))
    console.print(break_even_summary(result.stats))


def _searched_draft_plan(model, tokenizer, prompt: str, text: str, settings) -> Plan:
    """Run the draft-plan search on the prompt, print its ranking, return the best plan."""
    from .corpora import read_text
    from .draft_search import search_draft_plan

    found = search_draft_plan(model, tokenizer, [prompt], read_text(text), max_new_tokens=24, settings=settings)
    console.print(_search_table(found))
    console.print(found.summary())
    return found.best.plan


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


def _speculation_table(title: str, runs: list, first: tuple[str, list[str]] | None = None) -> Table:
    """One row per run; `first` is an optional leading (header, cells) column."""
    headers = ([first[0]] if first else []) + [header for header, _ in SPECULATION_COLUMNS]
    table = Table(*headers, title=title)
    for i, stats in enumerate(runs):
        table.add_row(*([first[1][i]] if first else []), *(cell(stats) for _, cell in SPECULATION_COLUMNS))
    return table


def _search_table(found) -> Table:
    return _speculation_table("draft plans, best predicted speedup first", [c.stats for c in found.ranking],
                              ("plan", [f"{c.plan} ({c.kind})" for c in found.ranking]))


@cli.command()
@model_option(required=True)
@click.option("--plan", "-p", "plan_text", required=True, help="Layer plan (text or .json/.yaml file).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (hf) or .gguf file (gguf).")
@click.option("--format", "-f", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True)
@click.option("--remote-code", is_flag=True, help="With sublayer drops: also write a self-contained modeling file.")
@click.option("--eval-windows", default=8, show_default=True, type=click.IntRange(0),
              help="Perplexity windows for the model card (0 skips measuring).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def export(source, plan_text, out, fmt, remote_code, eval_windows, force) -> None:
    """Write a physically smaller model: a Hugging Face folder or a pruned GGUF file, with a model card."""
    from .export import export as run_export

    path = run_export(source, plan_text, out, fmt, force=force, remote_code=remote_code, eval_windows=eval_windows)
    card = path / "README.md" if fmt == "hf" else path.with_suffix(".md")
    console.print(card.read_text())
    console.print(f"exported to {path}")


@cli.command()
@model_option()
@click.option("--plan", "-p", "plan_text", default="all", show_default=True, help="Score the steps of this plan.")
@click.option("--text", default="wikitext2-valid", show_default=True, help="Calibration text (not the eval text).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(2))
@click.option("--windows", default=8, show_default=True, type=click.IntRange(1))
@click.option("--tokens", type=click.Choice(["all", "last"]), default="all", show_default=True,
              help="Tokens the angular distance averages over (Gromov et al. read the last one).")
@click.option("--ppl-delta", is_flag=True,
              help="Also measure the perplexity change when each step, attention and MLP is skipped (slower).")
@click.option("--out", "-o", default="layerlab-score", show_default=True, type=click.Path(file_okay=False),
              help="Folder for scores.json, importance.png and angular.png.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
def score(source, plan_text, text, ctx, windows, tokens, ppl_delta, out, force) -> None:
    """Score every layer and sublayer: Block Influence, angular distance, LLM-Drop cosine (one pass), and
    optionally the perplexity change when each is skipped."""
    import json

    from .analysis.plots import angular_heatmap, importance_bars
    from .corpora import read_text
    from .export.files import staged_folder
    from .io import check_output
    from .metrics.perplexity_delta import HALVES, perplexity_deltas
    from .metrics.similarity import similarity
    from .models import layer_count, load

    check_output(out, folder=True, force=force)
    plan = Plan.load(plan_text, layer_count(source))
    model, tokenizer = load(source)
    calibration = read_text(text)
    result = similarity(model, tokenizer, calibration, plan=plan, ctx=ctx, windows=windows, tokens=tokens)
    deltas = perplexity_deltas(model, tokenizer, calibration, plan, ctx=ctx, windows=windows) if ppl_delta else None
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
    console.print(table)
    if deltas:
        console.print(f"plan perplexity on {text}: {deltas.perplexity:.3f} ({deltas.tokens} tokens)")
    scores = result.to_dict() | ({"perplexity_delta": deltas.to_dict()} if deltas else {})
    with staged_folder(out, force) as staging:
        (staging / "scores.json").write_text(json.dumps(scores, indent=2))
        importance_bars(result, staging / "importance.png")
        angular_heatmap(result, staging / "angular.png")
    console.print(f"scores.json, importance.png and angular.png written to {out}")


@cli.command()
@model_option()
@click.option("--plan", "-p", "plans", multiple=True, help="Layer plan (repeatable); 'all' is always analysed first.")
@click.option("--prompt", default="The capital of France is", show_default=True, help="Text the model reads.")
@click.option("--out", "-o", default="layerlab-analysis", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the PNGs and analysis.json.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--max-heads", default=8, show_default=True, type=click.IntRange(1), help="Heads drawn per step.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1), help="Logit-lens tokens per step.")
def analyze(source, plans, prompt, out, force, max_heads, top_k) -> None:
    """Look inside plans: attention maps and their spectra, hidden-state cosine, logit lens."""
    from .analysis.analyze import analyze as run_analyze
    from .io import check_output
    from .models import layer_count, load

    check_output(out, folder=True, force=force)
    if not prompt.strip():
        raise click.UsageError("--prompt is empty")
    n = layer_count(source)
    parsed = unique_plans([Plan.identity(n)] + [Plan.load(p, n) for p in plans])
    model, tokenizer = load(source)
    results = run_analyze(model, tokenizer, {p.to_text(): p for p in parsed}, prompt, out, max_heads=max_heads,
                          top_k=top_k, force=force)
    for entry in results["plans"]:
        table = Table("step", f"top {top_k} next tokens after the step (probability)",
                      title=escape(f"logit lens of {entry['name']} on {prompt!r}"))
        for row in entry["logit_lens"]:
            cells = (f"{t!r} {p:.2f}" for t, p in zip(row["tokens"], row["probs"], strict=True))
            table.add_row(row["step"], escape("  ".join(cells)))
        console.print(table)
    numbered = ", ".join(f"{i} = {entry['name']}" for i, entry in enumerate(results["plans"]))
    console.print(f"analysis.json, spectrum_summary.png and attention_/spectrum_/cosine_<i>.png ({numbered}) "
                  f"written to {out}", markup=False)


@cli.command()
@model_option()
@click.option("--remove", "-r", type=click.IntRange(1), help="Units (layers or halves) to remove.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the units to remove, instead of --remove.")
@click.option("--target-speedup", type=click.FloatRange(1, min_open=True),
              help="Remove until the parameters the plan runs shrink by this factor.")
@click.option("--method", type=click.Choice(["greedy", "bi", "angular", "cosine"]), default="greedy", show_default=True)
@click.option("--granularity", type=click.Choice(["layer", "attn", "mlp", "sublayer"]), default="layer",
              show_default=True)
@click.option("--text", default="wikitext2-valid", show_default=True, help="Calibration text (not the eval text).")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(2))
@click.option("--windows", default=4, show_default=True, type=click.IntRange(1))
@click.option("--keep", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Greedy: share of candidates kept for the next round (llama.cpp-style pruning).")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), help="Greedy: save state after each round.")
@click.option("--resume", is_flag=True, help="Greedy: continue from --state.")
def search(source, remove, fraction, target_speedup, method, granularity, text, ctx, windows, keep, state_path,
           resume) -> None:
    """Find a plan that removes layers or sublayers: one-shot by a metric, or greedy by perplexity."""
    from .corpora import read_text
    from .metrics.similarity import similarity
    from .models import layer_count, load
    from .search import Budget, greedy, one_shot

    if sum(x is not None for x in (remove, fraction, target_speedup)) != 1:
        raise click.UsageError("give exactly one of --remove, --fraction or --target-speedup")
    if resume and not state_path:
        raise click.UsageError("--resume needs --state")
    n = layer_count(source)
    units = n * (2 if granularity == "sublayer" else 1)
    remove = remove if remove is not None else (round(fraction * units) if fraction is not None else None)
    if method != "greedy" and remove is None:
        raise click.UsageError("one-shot methods take --remove or --fraction")
    model, tokenizer = load(source)
    calibration = read_text(text)
    if method == "greedy":
        state = greedy(model, tokenizer, calibration, Budget(remove, target_speedup), granularity, ctx=ctx,
                       windows=windows, keep=keep, state_path=state_path, resume=resume)
        table = Table("round", "removed", "perplexity", "candidates", "aborted", "layer forwards",
                      title=f"greedy search on {text}")
        for t in state.trace:
            table.add_row(str(t["round"]), t["removed"], f"{t['perplexity']:.3f}", str(t["candidates"]),
                          str(t["aborted"]), str(t["layer_forwards"]))
        console.print(table)
        found = Plan.from_dict(state.plan, n)
        console.print(f"plan: {found.to_text()}   calibration perplexity {state.trace[-1]['perplexity']:.3f}")
        return
    scores = similarity(model, tokenizer, calibration, ctx=ctx, windows=windows)
    found = one_shot(scores, method, remove, granularity)
    console.print(f"plan: {found.to_text()}")


@cli.command()
@model_option()
@click.option("--plan", "-p", "plan_text", default="all", show_default=True,
              help="Layer plan to remove before healing ('all' heals the model as loaded, e.g. an export).")
@click.option("--data", default="frankenstein", show_default=True,
              help="Healing text: bundled name or text file. Must not be the evaluation text.")
@click.option("--steps", default=HealSettings.steps, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=HealSettings.lr, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--rank", default=HealSettings.rank, show_default=True, type=click.IntRange(1), help="LoRA rank.")
@click.option("--alpha", default=HealSettings.alpha, show_default=True, type=click.IntRange(1), help="LoRA alpha.")
@click.option("--modules", help="Comma-separated LoRA target modules (default: every attention and MLP projection).")
@click.option("--ctx", default=HealSettings.ctx, show_default=True, type=click.IntRange(2),
              help="Tokens per training window.")
@click.option("--batch-size", default=HealSettings.batch_size, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=HealSettings.seed, show_default=True)
@click.option("--checkpoint-every", default=HealSettings.checkpoint_every, show_default=True, type=click.IntRange(1))
@click.option("--eval-text", default="wikitext2-test", show_default=True,
              help="Held-out text for the before/after perplexity.")
@click.option("--eval-windows", default=4, show_default=True, type=click.IntRange(0),
              help="Windows of 512 tokens of --eval-text (0 skips measuring).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for the merged model (adapter/ and healing.json inside).")
@click.option("--force", is_flag=True, help="Replace an existing --out, and start over from old checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in <out>.checkpoints.")
@click.option("--device", default="cpu", show_default=True)
def heal(source, plan_text, data, steps, lr, rank, alpha, modules, ctx, batch_size, seed, checkpoint_every, eval_text,
         eval_windows, out, force, resume, device) -> None:
    """Heal a pruned model: LoRA fine-tune on a text, merge, and write a plain model folder."""
    import shutil

    from .corpora import read_text
    from .heal import checkpoint_folder, save_healed
    from .heal import heal as run_heal
    from .io import check_output
    from .models import layer_count, load

    check_output(out, folder=True, force=force)
    checkpoints = checkpoint_folder(out)
    if not resume:
        check_output(checkpoints, folder=True, force=force)
    plan = Plan.load(plan_text, layer_count(source))
    healing = read_text(data)
    held_out = read_text(eval_text) if eval_windows else None
    if held_out == healing:
        raise LayerlabError(f"--data {data} is the evaluation text; heal on another text (e.g. frankenstein)")
    settings = HealSettings(steps=steps, lr=lr, rank=rank, alpha=alpha, ctx=ctx, batch_size=batch_size, seed=seed,
                            checkpoint_every=checkpoint_every,
                            target_modules=tuple(m.strip() for m in modules.split(",")) if modules else None)
    model, tokenizer = load(source, device=device)
    rows = _held_out_rows(model, tokenizer, plan, held_out, eval_windows) if held_out else []
    result = run_heal(model, tokenizer, healing, plan, settings, checkpoint_dir=checkpoints, resume=resume)
    if held_out:
        rows.append(("healed", _perplexity(result.model, tokenizer, held_out, eval_windows)))
    save_healed(result, tokenizer, out, force)
    shutil.rmtree(checkpoints, ignore_errors=True)
    table = Table("model", "layers", f"perplexity ({eval_text}, {eval_windows}x512 tokens)",
                  title=f"healed {plan.to_text()} on {data}: {steps} steps, loss {result.losses[0]:.3f} -> "
                        f"{result.losses[-1]:.3f}, {result.seconds:.0f} s")
    for name, (layers, ppl) in rows:
        table.add_row(name, str(layers), f"{ppl:.2f}")
    console.print(table)
    console.print(f"merged model written to {out}, adapter to {out}/adapter")


def _held_out_rows(model, tokenizer, plan: Plan, text: str, windows: int) -> list[tuple[str, tuple[int, float]]]:
    """Perplexity of the original (when the plan removes anything) and the pruned model, before healing."""
    from .runtime import apply_plan

    chosen = [("original", Plan.identity(plan.num_layers))] if not plan.is_identity else []
    rows = []
    for name, p in [*chosen, ("pruned" if chosen else "before", plan)]:
        with apply_plan(model, p):
            rows.append((name, _perplexity(model, tokenizer, text, windows)))
    return rows


def _perplexity(model, tokenizer, text: str, windows: int) -> tuple[int, float]:
    """(layers, perplexity) over `windows` windows of 512 tokens."""
    from .arch import num_layers
    from .evaluate.perplexity import perplexity

    return num_layers(model), perplexity(model, tokenizer, text, ctx=512, max_windows=windows).perplexity


def _maybe(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@cli.command()
@model_option()
@click.option("--drop", help="Share of layers (or halves) to remove, e.g. 20% or 0.2 (the default is 20%).")
@click.option("--layers", "-r", type=click.IntRange(1), help="Number of layers (or halves) to remove instead.")
@click.option("--target-speedup", type=click.FloatRange(1, min_open=True),
              help="Remove until the parameters the plan runs shrink by this factor, instead.")
@click.option("--granularity", type=click.Choice(["layer", "attn", "mlp", "sublayer"]), default="layer",
              show_default=True)
@click.option("--calibration", default="wikitext2-valid", show_default=True, help="Text for scoring and search.")
@click.option("--windows", default=4, show_default=True, type=click.IntRange(1), help="Calibration windows.")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(2), help="Calibration window tokens.")
@click.option("--keep", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Greedy: share of candidates kept for the next round.")
@click.option("--ppl-windows", default=8, show_default=True, type=click.IntRange(1),
              help="Evaluation: windows of 512 tokens of wikitext2-test.")
@click.option("--mc-items", default=50, show_default=True, type=click.IntRange(1), help="Evaluation: HellaSwag rows.")
@click.option("--heal", is_flag=True, help="Also heal the chosen plan with LoRA and add a 'healed' row.")
@click.option("--heal-steps", type=click.IntRange(1), help="Healing steps (default: layerlab heal's).")
@click.option("--export/--no-export", default=True, show_default=True, help="Write the smaller model to OUT/model.")
@click.option("--out", "-o", default="layerlab-prune", show_default=True, type=click.Path(file_okay=False))
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Start over in a non-empty --out.")
def prune(source, drop, layers, target_speedup, granularity, calibration, windows, ctx, keep, ppl_windows, mc_items,
          heal, heal_steps, export, out, resume, force) -> None:
    """The main job: score, search, evaluate, export a smaller model and write an HTML report."""
    from dataclasses import replace

    from .evaluate.compare import EvalSettings
    from .heal import HealSettings
    from .models import load
    from .prune import QUICK_EVAL, PruneSettings
    from .prune import prune as run_prune

    if sum(x is not None for x in (drop, layers, target_speedup)) > 1:
        raise click.UsageError("give at most one of --drop, --layers or --target-speedup")
    if resume and force:
        raise click.UsageError("--resume continues a run and --force starts over; give one")
    evaluation: EvalSettings = replace(QUICK_EVAL, ppl_windows=ppl_windows, mc_items=mc_items)
    healing = HealSettings() if heal_steps is None else HealSettings(steps=heal_steps)
    settings = PruneSettings(drop=_share(drop) if layers is None and target_speedup is None else None, layers=layers,
                             target_speedup=target_speedup, granularity=granularity, calibration=calibration,
                             calib_ctx=ctx, calib_windows=windows, keep=keep, evaluation=evaluation, heal=heal,
                             heal_settings=healing, export=export)
    model, tokenizer = load(source)
    data = run_prune(model, tokenizer, source, out, settings, resume=resume, force=force)
    rows = data["evaluation"]["rows"] + ([data["healed"]] if data["healed"] else [])
    console.print(_results_table({"rows": rows}))
    console.print(f"plan: {data['plan']}   (chosen by calibration perplexity: {data['chosen_by']}; greedy "
                  f"{data['greedy_plan']}, best one-shot {data['best_one_shot']['plan']} "
                  f"({data['best_one_shot']['method']}))")
    if data["exported"]:
        console.print(f"smaller model: {data['exported']}")
    console.print(f"report: {Path(out) / 'report.html'}  (numbers: {Path(out) / 'report.json'})")


def _share(text: str | None) -> float:
    """`20%` or `0.2` as a share; the default 20 %."""
    if text is None:
        return 0.2
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a share; write it like 20% or 0.2", param_hint="--drop") from None
    if not 0 < value < 1:
        raise click.BadParameter(f"{text!r} must be between 0 and 100 %", param_hint="--drop")
    return value


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.pass_context
def lm_eval_command(ctx: click.Context) -> None:
    """Run lm-evaluation-harness's own command line with `--model layerlab` registered.

    Example: layerlab lm-eval run --model layerlab --model_args model=smollm2-135m,plan=skip:24-26 --tasks ...
    """
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise click.UsageError("lm-evaluation-harness is not installed: pip install 'layerlab[lm-eval]'")
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
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1), help="Layer count, instead of --model.")
@click.option("--format", "-f", "fmt", type=click.Choice(PLAN_FORMATS), default="table", show_default=True)
@click.option("--mergekit-model", default="MODEL", show_default=True, help="Model name written into mergekit slices.")
def plan_show(plan_source, source, num_layers, fmt, mergekit_model) -> None:
    """Show PLAN (text, or a .json/.yaml file) as a table or in another plan form."""
    from .models import layer_count

    if (source is None) == (num_layers is None):
        raise click.UsageError("give exactly one of --model or --layers")
    n = num_layers if num_layers is not None else layer_count(source)
    parsed = Plan.load(plan_source, n)
    if fmt == "table":
        _print_plan_table(parsed)
    elif fmt == "text":
        click.echo(parsed.to_text())
    elif fmt == "json":
        click.echo(parsed.to_json())
    else:
        import json

        import yaml

        if fmt == "llm-drop":
            click.echo(json.dumps(parsed.to_llm_drop()))
        elif fmt == "llama-cpp":
            click.echo(json.dumps({"llama_cpp_skip_flags": parsed.to_llama_cpp_flags()}))
        else:
            click.echo(yaml.safe_dump(parsed.to_mergekit(mergekit_model), sort_keys=False).rstrip())


@plan.command("to-mergekit")
@click.argument("plan_source", metavar="PLAN")
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1), required=True)
@click.option("--model-name", default="MODEL", show_default=True, help="Model written into the slices.")
def plan_to_mergekit(plan_source, num_layers, model_name) -> None:
    """Print PLAN as a mergekit passthrough config (YAML)."""
    import yaml

    click.echo(yaml.safe_dump(Plan.load(plan_source, num_layers).to_mergekit(model_name), sort_keys=False).rstrip())


@plan.command("from-mergekit")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--layers", "-l", "num_layers", type=click.IntRange(1), required=True)
def plan_from_mergekit(config, num_layers) -> None:
    """Print the plan of a mergekit passthrough CONFIG file in the text form."""
    from pathlib import Path

    click.echo(Plan.from_mergekit(Path(config).read_text(), num_layers).to_text())


def _print_plan_table(parsed: Plan) -> None:
    table = Table("step", "layer", "attention", "MLP", title=f"plan {parsed.to_text()}")
    for i, step in enumerate(parsed.steps):
        table.add_row(str(i), str(step.layer), "yes" if step.attention else "-", "yes" if step.mlp else "-")
    console.print(table)
    dropped = sorted(set(range(parsed.num_layers)) - set(parsed.layers))
    console.print(f"{len(parsed.steps)} steps over {parsed.num_layers} layers; "
                  f"dropped: {','.join(map(str, dropped)) or 'none'}")



def main() -> None:
    """Entry point: library errors become one line on stderr and exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except LayerlabError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
