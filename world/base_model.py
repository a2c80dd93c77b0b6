"""Build the demo world's base model: corpus -> tokenizer -> a tiny Llama, cached.

The result is an ordinary Hugging Face model directory (config.json, safetensors weights,
tokenizer files) that loads with AutoModelForCausalLM and in vLLM. It is cached under
`<home>/models/demo-<hash>` where the hash covers every setting, so a second build is
instant and a changed setting builds anew. Building writes to a temporary directory
and renames it into place, so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapters.home import gfn_home
from world.corpus import CorpusConfig, documents
from world.tokenizer import save_tokenizer, train_tokenizer

BUILD_VERSION = 3  # bump when the build code changes what it produces


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 512
    vocab_size: int = 1024


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 1


class WorldConfig(BaseModel):
    """Everything that decides the demo base model; its hash names the build."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: CorpusConfig = CorpusConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    def digest(self) -> str:
        payload = json.dumps({"build": BUILD_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build(config: WorldConfig = WorldConfig(), home: Path | None = None, quiet: bool = False) -> Path:
    """Return the model directory for `config`, building it first if it is not cached."""
    target = (home or gfn_home()) / "models" / f"demo-{config.digest()}"
    if (target / "world.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:  # one build at a time: a second waits, then reads it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "world.json").exists():
            _build(config, target, quiet)
    return target


def _build(config: WorldConfig, target: Path, quiet: bool) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp*"):  # killed builds' (under the lock: none running)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    start = time.time()
    lines = documents(config.corpus)
    tokenizer = train_tokenizer(lines, config.model.vocab_size)
    model = _train(config, tokenizer, lines, quiet)
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)
    stats = {
        "config": config.model_dump(), "digest": config.digest(),
        "build_seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "documents": len(lines),
    }
    (tmp / "world.json").write_text(json.dumps(stats, indent=2))
    shutil.rmtree(target, ignore_errors=True)  # a partial one, from before the lock
    os.replace(tmp, target)


def _new_model(config: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    vocab = math.ceil(len(tokenizer) / 64) * 64  # kernels like aligned vocabularies
    llama = LlamaConfig(
        vocab_size=vocab, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads,
        num_key_value_heads=config.heads, max_position_embeddings=config.max_positions,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(llama)


def _batches(ids: list[list[int]], batch_size: int, steps: int, rng: random.Random):
    """Length-bucketed batches (little padding), cycling through shuffled documents."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    produced = 0
    while True:
        rng.shuffle(chunks)
        for chunk in chunks:
            if produced == steps:
                return
            produced += 1
            yield [ids[i] for i in chunk]


def _collate(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding). No attention mask is needed: under causal
    attention no token sees the padding after it, and the padding's own predictions carry no
    label, so attention takes its fast causal path."""
    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    for row, x in enumerate(batch):
        input_ids[row, :len(x)] = labels[row, :len(x)] = torch.tensor(x)
    return input_ids, labels


def _train(config: WorldConfig, tokenizer: PreTrainedTokenizerFast, lines: list[str], quiet: bool) -> LlamaForCausalLM:
    torch.manual_seed(config.train.seed)
    model = _new_model(config.model, tokenizer)
    eos = tokenizer.eos_token_id
    ids = [x + [eos] for x in tokenizer(lines)["input_ids"]]
    train = config.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < train.warmup:
            return (step + 1) / train.warmup
        progress = (step - train.warmup) / max(1, train.steps - train.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    columns = [TextColumn("demo base model"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"), TimeRemainingColumn()]
    with Progress(*columns, disable=quiet) as progress:
        bar = progress.add_task("train", total=train.steps, loss=float("nan"))
        for batch in _batches(ids, train.batch_size, train.steps, random.Random(train.seed)):
            input_ids, labels = _collate(batch, tokenizer.pad_token_id)
            # float32: bfloat16 autocast is faster only where the CPU has it natively; torch
            # emulates it ~50x slower on AVX2, and one recipe everywhere gives one demo model.
            loss = model(input_ids=input_ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.update(bar, advance=1, loss=loss.item())
    return model.eval()
