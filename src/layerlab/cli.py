"""Command line: parse arguments, call the library, print. Errors print one line and exit 2."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from .errors import LayerlabError
from .plan import Plan

console = Console()

PLAN_FORMATS = ("table", "text", "json", "llm-drop", "llama-cpp", "mergekit")


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
@click.option("--model", "-m", "source", default="smollm2-135m", show_default=True,
              help="Embedded name, Hugging Face folder, .gguf file or hub id.")
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
    parsed = _unique([Plan.identity(n)] + [Plan.load(p, n) for p in plans])
    model, tokenizer = load(source, dtype=dtype, device=device)
    rows = generate_table(model, tokenizer, list(prompts), parsed, max_new_tokens=max_new_tokens,
                          do_sample=sample, seed=seed)
    table = Table("plan", "steps", "tok/s", "generation", show_lines=True)
    for plan, row in zip([p for p in parsed for _ in prompts], rows, strict=True):
        table.add_row(row.plan, str(len(plan.steps)), f"{row.tokens_per_second:.1f}",
                      f"[dim]{row.prompt}[/dim]{row.text}")
    console.print(table)


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


def _print_plan_table(parsed: Plan) -> None:
    table = Table("step", "layer", "attention", "MLP", title=f"plan {parsed.to_text()}")
    for i, step in enumerate(parsed.steps):
        table.add_row(str(i), str(step.layer), "yes" if step.attention else "-", "yes" if step.mlp else "-")
    console.print(table)
    dropped = sorted(set(range(parsed.num_layers)) - set(parsed.layers))
    console.print(f"{len(parsed.steps)} steps over {parsed.num_layers} layers; "
                  f"dropped: {','.join(map(str, dropped)) or 'none'}")


def _unique(plans: list[Plan]) -> list[Plan]:
    seen: list[Plan] = []
    for p in plans:
        if p not in seen:
            seen.append(p)
    return seen


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
