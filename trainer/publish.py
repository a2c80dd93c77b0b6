"""What a finished run hands to the store: its saved LoRA, evaluated by its task, with the
manifest fields the service serves it by. SubTB (loop.py), RL and SFT runs all publish alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.manifest import BaseModelRef, LoraSpec, Manifest
from adapters.models import tokenizer_digest
from adapters.store import AdapterStore
from trainer.scoring import Scorer
from trainer.tasks import Task
from trainer.tasks.base import Sampler


def publish(store: AdapterStore, name: str, out: Path, task: Task, *, base: BaseModelRef, lora: LoraSpec, training: dict[str, Any], metrics: dict[str, Any],
            evaluation: tuple[Sampler, Scorer] | None, job_id: str | None = None) -> Manifest:
    """Store ``out`` (the saved LoRA and the run's logs) as the next version of ``name``, after the
    task's evaluation with ``evaluation`` (sampler, scorer; None: not evaluated) into ``eval.json``.
    ``base`` gains the digest of the task's tokenizer."""
    if evaluation is not None:
        metrics = {**metrics, **task.evaluate(*evaluation, out)}
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    fields = {
        **task.manifest_fields(),
        "base_model": base.model_copy(update={"tokenizer": tokenizer_digest(task.tokenizer)}).model_dump(),
        "lora": lora.model_dump(),
        "training": training,
        "metrics": metrics,
    }
    return store.save(name, out, fields, job_id=job_id)
