"""The `gfn` command: build the demo world, train and evaluate adapters, list the store.

Heavy imports (torch, transformers, vLLM) happen inside the commands, so `gfn --help`
and `gfn adapters list` stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from adapters.home import runs_root, store_root

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
demo = typer.Typer(no_args_is_help=True, help="The demo world: corpus, tokenizer and base model.")
adapters_app = typer.Typer(no_args_is_help=True, help="The adapter store.")
app.add_typer(demo, name="demo")
app.add_typer(adapters_app, name="adapters")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@demo.command("build")
def demo_build(quiet: bool = False) -> None:
    """Build (or find cached) the demo base model and print its directory."""
    from world.base_model import build

    path = build(quiet=quiet)
    stats = json.loads((path / "world.json").read_text())
    console.print(f"demo base model: {path} ({stats['parameters']:,} parameters, built in {stats['build_seconds']} s)")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="a YAML file or a bundled config name (rng, infill, ...)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override: key.path=value")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="checkpoints and logs; the same dir resumes")] = None,
    fresh: Annotated[bool, typer.Option(help="discard an existing checkpoint in the run dir")] = False,
    store: Annotated[Optional[Path], typer.Option(help="adapter store root")] = None,
) -> None:
    """Train an adapter with SubTB and save it to the store (resumes a killed run)."""
    import shutil

    from pydantic import ValidationError

    from adapters.store import AdapterStore
    from trainer.config import load_config
    from trainer.loop import Trainer

    try:
        cfg = load_config(config, set_ or [])
    except (ValidationError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    run_dir = run_dir or runs_root() / cfg.name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    manifest = Trainer(cfg, run_dir, AdapterStore(store or store_root())).run()
    console.print(f"saved {manifest.ref}: {json.dumps(manifest.metrics)}")


@app.command("eval")
def evaluate(
    adapter: Annotated[str, typer.Argument(help="name or name@vN")],
    samples: Annotated[Optional[int], typer.Option(help="samples to draw")] = None,
    store: Annotated[Optional[Path], typer.Option(help="adapter store root")] = None,
) -> None:
    """Evaluate a stored adapter with its task's evaluation."""
    from adapters.store import AdapterStore
    from trainer.evaluate import evaluate_adapter

    name, _, version = adapter.partition("@v")
    metrics = evaluate_adapter(AdapterStore(store or store_root()), name, int(version) if version else None, samples)
    console.print_json(json.dumps(metrics))


@adapters_app.command("list")
def adapters_list(store: Annotated[Optional[Path], typer.Option(help="adapter store root")] = None) -> None:
    """Every stored adapter version with its task and headline metrics."""
    from adapters.store import AdapterStore

    table = Table("adapter", "task", "created", "base model", "metrics")
    for m in AdapterStore(store or store_root()).list():
        headline = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.metrics.items() if not isinstance(v, dict)}
        table.add_row(m.ref, m.task, m.created_at[:19], m.base_model.fingerprint[:19], json.dumps(headline))
    console.print(table)


if __name__ == "__main__":
    app()
