"""Inference engines behind one interface (base.Engine): vLLM, or transformers + peft."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from adapters.manifest import LoraSpec
from service.engines.base import Engine
from service.settings import Settings


def make_engine(settings: Settings, model_dir: str | Path, pad_id: int, eos_id: int, loras: list[LoraSpec],
                on_batch: Callable[[int], None] | None = None) -> Engine:
    """The engine the settings name; "auto" is vLLM where it imports. Imported here: vLLM takes seconds."""
    kind = settings.engine
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    if kind == "vllm":
        from service.engines.vllm import VllmEngine

        return VllmEngine(model_dir, pad_id, eos_id, loras, settings.max_loras, settings.max_lora_rank,
                          settings.vllm_kv_cache_gib, settings.vllm_block_size, settings.torch_threads)
    from service.engines.hf import HFEngine

    return HFEngine(model_dir, pad_id, settings.batch_max_size, settings.batch_wait_ms, on_batch,
                    settings.torch_threads)
