"""Supervised fine-tuning of a LoRA on (prompt, target) pairs: the baseline the tasks'
benchmarks set against the GFlowNet. It maximises log q(target ⊤ | prompt) under the
task's policy (same masks, terminator and length limits), and stores the adapter with
the task's manifest fields, so it is served and evaluated exactly as a GFlowNet adapter
of that task would be."""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from adapters.device import Device, resolve_device
from adapters.fingerprint import fingerprint
from adapters.manifest import BaseModelRef, Dtype, LoraSpec, Manifest
from adapters.models import attach_lora, load_causal_lm, load_tokenizer, save_lora
from adapters.store import AdapterName, AdapterStore
from trainer.config import DTYPE_HELP
from trainer.setup import check_prompts, resolve_base_model
from trainer.policy import policy_log_probs
from trainer.publish import publish
from trainer.rollout import Rollout, sampler, sequence_log_prob
from trainer.scoring import Scorer
from trainer.tasks import AnyTaskConfig, Prompt, Task, make_task

Pair = tuple[Prompt, list[int]]  # the prompt, target ids (without the terminator)


class SFTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: AdapterName
    base_model: str = Field("demo", description="a model directory, a hub id, or 'demo' (the demo world)")
    task: AnyTaskConfig
    steps: PositiveInt = 200
    batch_size: PositiveInt = 32
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0
    device: Device = "auto"
    dtype: Dtype = Field("float32", description=DTYPE_HELP)
    lora: LoraSpec = LoraSpec()
    evaluate: bool = True


def sft_loss(model: torch.nn.Module, task: Task, batch: list[Pair]) -> torch.Tensor:
    """Mean negative log-likelihood per token the policy writes (terminator included) of the
    targets under the masked policy; a tool's tokens have probability one there, so they
    are left out, as the objective leaves them out."""
    rollout = Rollout.teacher_forced([prompt.ids for prompt, _ in batch], [target for _, target in batch],
                                     task.pad_id, task.tool())
    log_probs = policy_log_probs(model, task.spec(), rollout.prompts, rollout.tokens, task.pad_id,
                                 [prompt.bias for prompt, _ in batch])
    return -sequence_log_prob(*log_probs, rollout).sum() / (rollout.written().sum() + len(batch))


def train_sft(config: SFTConfig, store: AdapterStore, pairs: list[Pair] | None = None) -> Manifest:
    """Fine-tune on `pairs` (default: the task's `sft_pairs()`) and store the adapter."""
    torch.manual_seed(config.seed)
    model_dir = resolve_base_model(config.base_model)
    tokenizer = load_tokenizer(model_dir)
    task = make_task(config.task, tokenizer)
    pairs = task.sft_pairs() if pairs is None else pairs
    _check_pairs(pairs, task)
    model = attach_lora(load_causal_lm(model_dir, config.dtype), config.lora).to(resolve_device(config.device))
    check_prompts(task, [prompt for prompt, _ in pairs], model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    rng = random.Random(config.seed)
    start, history = time.time(), []
    model.train()
    for step in range(config.steps):
        loss = sft_loss(model, task, rng.sample(pairs, min(config.batch_size, len(pairs))))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": loss.item()})
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapter"
        save_lora(model, out)
        (out / "training_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        generator = torch.Generator().manual_seed(config.seed)

        draw = sampler(model, task.spec(), task.pad_id, generator, task.tool())
        base = BaseModelRef(path=model_dir, fingerprint=fingerprint(model_dir), dtype=config.dtype)
        return publish(store, config.name, out, task, base=base, lora=config.lora, training={"method": "sft", "config": config.model_dump(), "steps": config.steps,
                                                   "pairs": len(pairs)},
                       metrics={"train_seconds": round(time.time() - start, 1), "final_loss": history[-1]["loss"]},
                       evaluation=(draw, Scorer(model, task.pad_id)) if config.evaluate else None)


def _check_pairs(pairs: list[Pair], task: Task) -> None:
    if not pairs:
        raise ValueError(f"no (prompt, target) pairs to fine-tune on: the {task.name} data has no targets")
    for index, (prompt, target) in enumerate(pairs):
        if not prompt.ids:
            raise ValueError(f"pair {index}: the prompt is empty")
        if not task.config.min_len <= len(target) <= task.config.max_len:
            raise ValueError(f"pair {index}: the target has {len(target)} tokens, outside task.min_len.."
                             f"task.max_len = {task.config.min_len}..{task.config.max_len}")
