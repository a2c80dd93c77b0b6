"""Inference engines behind one interface (base.Engine): vLLM, or transformers + peft."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.manifest import Dtype, LoraSpec
from service.engines.base import Engine
from service.settings import Settings

log = logging.getLogger("gfn.service")


async def start_engine(settings: Settings, model_dir: str | Path, pad_id: int, eos_id: int, loras: list[LoraSpec],
                       dtype: Dtype = "float32", on_batch: Callable[[int], None] | None = None) -> Engine:
    """The engine the settings name, started. "auto" is vLLM where it imports and starts on this
    model (it serves LoRAs on fewer architectures than peft: not GPT-2, say), else transformers.
    Only without CUDA: on a GPU a failed vLLM (out of memory, a bad setting) must fail loudly, not
    fall back to a CPU engine."""
    if settings.engine == "auto" and importlib.util.find_spec("vllm") is not None:
        try:
            return await _started(make_engine(settings, "vllm", model_dir, pad_id, eos_id, loras, dtype, on_batch))
        except Exception as error:  # noqa: BLE001 - whatever vLLM refuses on a CPU, transformers may serve
            if torch.cuda.is_available():
                raise
            log.warning("vLLM cannot serve %s (%s: %s); serving with transformers", model_dir,
                        type(error).__name__, error)
    kind = "transformers" if settings.engine == "auto" else settings.engine
    return await _started(make_engine(settings, kind, model_dir, pad_id, eos_id, loras, dtype, on_batch))


async def _started(engine: Engine) -> Engine:
    """``engine`` started; stopped again, as far as it got, when starting fails (no process left behind)."""
    try:
        await engine.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await engine.stop()
        raise
    return engine


def make_engine(settings: Settings, kind: str, model_dir: str | Path, pad_id: int, eos_id: int,
                loras: list[LoraSpec], dtype: Dtype = "float32", on_batch: Callable[[int], None] | None = None
                ) -> Engine:
    """A `kind` engine ("vllm" or "transformers"), not started. Imported here: vLLM takes seconds."""
    if kind == "vllm":
        from service.engines.vllm import VllmEngine

        return VllmEngine(model_dir, pad_id, eos_id, loras, settings.max_loras, settings.max_lora_rank,
                          settings.vllm_kv_cache_gib, settings.vllm_block_size, settings.torch_threads,
                          settings.lora_target_modules, dtype)
    from service.engines.hf import HFEngine

    return HFEngine(model_dir, pad_id, settings.batch_max_size, settings.batch_wait_ms, on_batch,
                    settings.torch_threads, settings.device, dtype)
