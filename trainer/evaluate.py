"""Evaluate a stored adapter (or its base model) with its task's evaluation."""

from __future__ import annotations

from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import peft
import torch

from adapters.fingerprint import fingerprint
from adapters.models import load_causal_lm, load_tokenizer, pad_id, tokenizer_digest
from adapters.store import AdapterStore
from trainer.jsonl import data_digest
from trainer.rollout import Rollout, sampler
from trainer.scoring import Scorer
from trainer.tasks import TASKS, Task


class LoadedPolicy:
    """A stored adapter on its base model, with the task it was trained for."""

    def __init__(self, store: AdapterStore, name: str, version: int | None = None):
        manifest = store.manifest(name, version)
        base = manifest.base_model.path
        if not Path(base).is_dir():  # not a hub id: the path the trainer resolved
            raise FileNotFoundError(f"adapter {manifest.ref} was trained on the base model at {base}, which is gone")
        task_type = TASKS[manifest.task]
        task_config = task_type.config_type.model_validate(manifest.task_config)
        if manifest.training.get("data_digest", digest := data_digest(task_config)) != digest:
            raise ValueError(f"adapter {manifest.ref}: its data files (task.data, task.eval_data) changed since it was "
                             "trained: its evaluation would read other records")
        self.tokenizer = load_tokenizer(base)
        loaded = store.load(name, manifest.version, fingerprint(base), tokenizer_digest(self.tokenizer))
        self.manifest = loaded.manifest
        self.pad_id = pad_id(self.tokenizer)
        # torch_device: peft would read the weights onto a GPU first wherever there is one
        model = load_causal_lm(base, manifest.base_model.dtype)
        self.model = peft.PeftModel.from_pretrained(model, loaded.path, torch_device="cpu").eval()
        self.task: Task = task_type(task_config, self.tokenizer)
        self.spec, self.tool = self.task.spec(), self.task.tool()
        self.scorer = Scorer(self.model, self.pad_id)

    def sampler(self, generator: torch.Generator, adapter: bool = True):
        """One latent per prompt from the adapter, or from the base model under the same masks."""
        draw = sampler(self.model, self.spec, self.pad_id, generator, self.tool)

        def base(prompts: list[list[int]], bias: list[dict[int, float]] | None = None) -> Rollout:
            with self.model.disable_adapter():
                return draw(prompts, bias)
        return draw if adapter else base


def evaluate_adapter(store: AdapterStore, name: str, version: int | None = None,
                     samples: int | None = None) -> dict[str, Any]:
    """The task's metrics of a stored adapter; `samples` (default: the task's) is checked before the model loads."""
    if samples is not None and samples < 1:  # 0 would silently mean the default, fewer divide by zero
        raise ValueError(f"samples: must be at least 1, got {samples}")
    policy = LoadedPolicy(store, name, version)
    generator = torch.Generator().manual_seed(0)
    out = Path(mkdtemp(prefix="gfn-eval-"))
    kwargs = {"samples": samples} if samples is not None else {}
    return {"adapter": policy.manifest.ref, "plot_dir": str(out),
            **policy.task.evaluate(policy.sampler(generator), policy.scorer, out, **kwargs)}
