"""Shared fixtures: the real demo base model, a real redis-server on a free port, and
short training runs cached for the whole session. Nothing here is mocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gfn.local import RedisServer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo world's base model directory (built once, cached under GFN_HOME)."""
    from world.base_model import build

    return build(quiet=True)


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def train_adapter(demo_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Train (once per session and config) a short adapter into a session store:
    `train_adapter("rng", steps=30)` returns (store, manifest)."""
    from adapters.store import AdapterStore
    from trainer.config import load_config
    from trainer.loop import Trainer

    root = tmp_path_factory.mktemp("store")
    store, done = AdapterStore(root / "adapters"), {}

    def train(config: str, steps: int = 30, **overrides: object):
        key = (config, steps, tuple(sorted(overrides.items())))
        if key not in done:
            sets = [f"steps={steps}", "evaluate=false", f"base_model={demo_model}"]
            sets += [f"{k}={v}" for k, v in overrides.items()]
            cfg = load_config(config, sets)
            run = root / "runs" / f"{cfg.name}-{len(done)}"
            done[key] = Trainer(cfg, run, store, quiet=True).run()
        return store, done[key]

    return train
