"""Benchmarks reuse an adapter they trained before while its training config, its base model
and the code that trains it are unchanged; anything else (or --fresh) trains anew."""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from adapters.fingerprint import fingerprint
from adapters.home import gfn_home
from adapters.manifest import Manifest
from adapters.store import AdapterStore
from trainer.config import TrainConfig, as_today
from trainer.loop import Trainer
from trainer.setup import resolve_base_model


def log(message: str) -> None:
    """Progress goes to stderr: stdout's last line is the benchmark's JSON."""
    print(message, file=sys.stderr, flush=True)


ROOT = Path(__file__).resolve().parent.parent
TRAINING_CODE = ("trainer", "adapters", "world")  # what decides an adapter besides its config and base model


def bench_parser(doc: str | None, prompts: str | None = None, samples: str | None = None) -> argparse.ArgumentParser:
    """The options of a bench that reuses its adapters: --fresh and --set; with `prompts` and
    `samples` (what a record and a sample are called), the evaluation's size as well."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="train the adapters anew instead of reusing them")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    if prompts:
        parser.add_argument("--prompts", type=int, help=f"held-out {prompts} (default: the config's eval_prompts)")
    if samples:
        parser.add_argument("--samples", type=int, help=f"{samples} (default: the config's eval_samples)")
    return parser


def bench_store() -> AdapterStore:
    """The benchmarks' own store, apart from the user's adapters: one per version of the code
    that trains adapters, so that a change to the objective or a task's data trains anew."""
    digest = hashlib.sha256()
    for path in sorted(p for package in TRAINING_CODE for p in (ROOT / package).rglob("*.py")):
        digest.update(f"{path.relative_to(ROOT)}\0".encode() + path.read_bytes())
    return AdapterStore(gfn_home() / "bench" / digest.hexdigest()[:12] / "adapters")


def cached_adapter(store: AdapterStore, config: BaseModel, train: Callable[[], Manifest],
                   fresh: bool = False) -> tuple[Manifest, bool]:
    """(manifest, whether it was reused): the newest stored version of `config.name`
    trained with exactly this config on this base model, else what `train()` stores."""
    base = fingerprint(resolve_base_model(config.base_model))
    if not fresh:
        for manifest in sorted(store.list(), key=lambda m: m.version, reverse=True):
            if (manifest.name == config.name and manifest.base_model.fingerprint == base
                    and as_today(type(config), manifest.training.get("config")) == config):
                return manifest, True
    return train(), False



def gfn_adapter(store: AdapterStore, config: TrainConfig, fresh: bool = False) -> tuple[Manifest, bool]:
    """`cached_adapter` for a GFlowNet config, trained (when it must be) in a scratch run directory."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{config.name}-") as work:
        manifest, cached = cached_adapter(store, config, lambda: Trainer(config, Path(work), store).run(), fresh)
    log(f"gfn adapter {manifest.ref} ({'cached' if cached else 'trained'}, {manifest.metrics['train_seconds']} s)")
    return manifest, cached
