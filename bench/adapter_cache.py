"""Benchmarks reuse an adapter they trained before while its training config and base
model are unchanged; anything else (or --fresh) trains anew."""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import BaseModel

from adapters.fingerprint import fingerprint
from adapters.home import gfn_home
from adapters.manifest import Manifest
from adapters.store import AdapterStore
from trainer.loop import resolve_base_model


def bench_store() -> AdapterStore:
    """The benchmarks' own store, apart from the user's adapters."""
    return AdapterStore(gfn_home() / "bench" / "adapters")


def cached_adapter(store: AdapterStore, config: BaseModel, train: Callable[[], Manifest],
                   fresh: bool = False) -> tuple[Manifest, bool]:
    """(manifest, whether it was reused): the newest stored version of `config.name`
    trained with exactly this config on this base model, else what `train()` stores."""
    wanted = json.loads(config.model_dump_json())
    base = fingerprint(resolve_base_model(config.base_model))
    if not fresh:
        for manifest in sorted(store.list(), key=lambda m: m.version, reverse=True):
            if (manifest.name == config.name and manifest.base_model.fingerprint == base
                    and manifest.training.get("config") == wanted):
                return manifest, True
    return train(), False
