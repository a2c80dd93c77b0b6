"""Adapters for the service tests: one per task of the serving contract (docs/DESIGN.md), on the
demo base model, with small random LoRA weights (no training: seconds, not minutes) and manifests
like the trainer writes. Tests may import trainer/ and world/; the service may not."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import peft
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from adapters.fingerprint import fingerprint
from adapters.manifest import LoraSpec, Manifest
from adapters.models import load_causal_lm, load_tokenizer, tokenizer_digest
from adapters.store import AdapterStore

T = TypeVar("T")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def task_fields(tokenizer: Any) -> dict[str, dict[str, Any]]:
    """Manifest fields of every task with its default config, as the trainer writes them."""
    from trainer.tasks import TASKS

    return {name: task(task.config_type(), tokenizer).manifest_fields() for name, task in TASKS.items()}


def save_adapter(store: AdapterStore, name: str, model_dir: Path, fields: dict[str, Any], seed: int,
                 rank: int = 8, scale: float = 0.3, base_fingerprint: str | None = None,
                 targets: list[str] = TARGETS, peft_config: dict[str, Any] | None = None,
                 dtype: str = "float32") -> Manifest:
    """A LoRA with A as peft initialises it and B ~ scale * N(0, 1): it moves the distribution.
    `peft_config` is written over its adapter_config.json (an adapter peft cannot load, say);
    `dtype` is what its manifest says training ran the base model in."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(load_causal_lm(model_dir), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                          target_modules=targets))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.copy_(scale * torch.randn_like(param))
    out = store.root.parent / f"src-{name}-{seed}"
    model.save_pretrained(out)
    if peft_config:
        config = out / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **peft_config}))
    lora = LoraSpec(r=rank, alpha=2 * rank, target_modules=targets)
    base = {"path": str(model_dir), "fingerprint": base_fingerprint or fingerprint(model_dir),
            "tokenizer": tokenizer_digest(load_tokenizer(model_dir)), "dtype": dtype}
    manifest = store.save(name, out, {**fields, "base_model": base, "lora": lora.model_dump(),
                                      "training": {"fixture": True}, "metrics": {}})
    shutil.rmtree(out)
    return manifest


def policy_log_q(model: Any, prompt: list[int], tokens: list[int], stopped: bool, eos: int,
                 min_tokens: int = 0, penalty: float = -99.0) -> float:
    """Teacher-forced log q of a sample as an engine draws it: its tokens' log-probs and its stop,
    the stop penalised before ``min_tokens`` (the policy's early-stop rule)."""
    targets = tokens + ([eos] if stopped else [])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + targets])).logits[0, len(prompt) - 1:-1].float()
    logits[:min_tokens, eos] += penalty
    return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[:, None]).sum())


def wait_until(check: Any, timeout: float, what: str) -> Any:
    """Poll ``check`` until it returns something true (returned); fail after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The sum of a /metrics sample over the series whose labels include ``labels``."""
    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def make_store(root: Path, model_dir: Path) -> AdapterStore:
    """An adapter of every task (rng, infill, constrained, reasoning, continuation), version 1 each."""
    store = AdapterStore(root)
    for seed, (name, fields) in enumerate(task_fields(load_tokenizer(model_dir)).items()):
        save_adapter(store, name, model_dir, fields, seed)
    return store


def corrupt(store: AdapterStore, name: str, version: int) -> None:
    """Flip the weights file of a stored version, as a disk fault would."""
    path = store.root / name / f"v{version}" / "adapter_model.safetensors"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)


class Server:
    """The app served by uvicorn on 127.0.0.1 in a thread: real HTTP, lifespan included."""

    def __init__(self, app: Any):
        # held from now: nothing else binds the port while the service starts. IPPROTO_TCP named, or
        # asyncio leaves Nagle on for its connections (44 ms a keep-alive request, not 2)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self.socket])

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's event loop (to reach its engine directly)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(300)

    @property
    def state(self) -> Any:
        return self.app.state.service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 300
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 120, **kwargs})
