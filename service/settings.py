"""Service settings: every knob in one typed model, read from ``GFN_*`` environment variables.

``GFN_ENGINE=transformers GFN_MAX_N=32 gfn serve`` overrides the defaults; list fields take
commas or JSON (``GFN_ADAPTERS=infill,rng@v3`` or ``GFN_ADAPTERS='["infill", "rng@v3"]'``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BeforeValidator, Field, PositiveFloat, PositiveInt, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.device import Device, resolve_device
from adapters.errors import StoreNotADirectory
from adapters.home import store_root
from adapters.store import AdapterRef, AdapterStore
from jobs.queue import check_redis_url


def _listed(value: object) -> object:
    """A list setting as its variable spells it: JSON (`["a", "b"]`) or commas (`a,b`)."""
    if not isinstance(value, str):
        return value
    if not value.lstrip().startswith("["):
        return [v.strip() for v in value.split(",") if v.strip()]
    try:
        return json.loads(value)
    except ValueError as error:
        raise ValueError(f"not a JSON list ({error}): give one, or the entries separated by commas") from None


Item = TypeVar("Item")
Listed = Annotated[list[Item], NoDecode, BeforeValidator(_listed)]
CPU_BLOCK_SIZE = 32
"""vLLM's CPU attention takes multiples of 32 and defaults to 128; a prompt's KV is shared only by
whole blocks, so with 128 the n samples of a short prompt (and repeated prompts) each read it anew:
at 32, 256 /infill requests of n = 4 on the demo model ran 1.8x faster."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GFN_", extra="forbid", allow_inf_nan=False)  # inf: a wait never ending

    base_model: str | None = Field(None, description="model directory; default: the one the newest stored adapter was trained on")
    store: Path = Field(default_factory=store_root, description="adapter store root")
    engine: Literal["auto", "vllm", "transformers"] = Field("auto", description="auto: vLLM; without CUDA, transformers "
                                                                      "where vLLM cannot start on the model")
    adapters: Listed[AdapterRef] | None = Field(
        None, description="'name' (latest) or 'name@vN' (pinned) to load at start; default: the latest version "
        "of every stored adapter trained on the base model")
    redis_url: str | None = Field(None, description="rationale cache and training jobs in Redis; in-process cache "
                                  "and no /jobs when unset")
    api_key: SecretStr | None = Field(None, description="when set, every route but /health, /ready, /metrics needs it")

    # limits
    max_body_bytes: PositiveInt = 64 * 1024
    max_n: PositiveInt = 64
    max_tokens: PositiveInt = 512
    max_prompt_chars: PositiveInt = 4000
    max_in_flight: PositiveInt = 256
    request_timeout_s: PositiveFloat = 120.0

    # engines
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the base model's weights and activations; auto: the dtype the adapters it starts with "
        "were trained in (manifest base_model.dtype), float32 where they differ or there are none")
    device: Device = Field("auto", description="transformers engine: where the model serves, auto: the GPU where "
                           "CUDA is available (vLLM places itself)")
    batch_max_size: PositiveInt = Field(256, description="transformers engine: samples generated together")
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="transformers engine, when idle: wait for more "
                                 "requests")
    torch_threads: PositiveInt | None = Field(None, le=1024, description="transformers engine (and vLLM's lm_head "
                                              "scorer): intra-op threads; default: torch's (1 is faster on a busy "
                                              "machine)")
    max_loras: PositiveInt = Field(4, description="vLLM: adapters per batch (raised to the number loaded at start); "
                                   "it keeps twice as many loaded")
    max_lora_rank: PositiveInt | None = Field(None, description="vLLM: the largest rank to serve, for adapters to "
                                              "come; at least the largest present")
    lora_target_modules: Listed[str] = Field(
        default_factory=list, description="vLLM: modules to serve LoRAs on besides those of the adapters present at "
        'start (commas or JSON, e.g. gate_proj,lm_head), for adapters trained after it starts: vLLM fixes them at start')
    vllm_kv_cache_gib: PositiveFloat = Field(1.0, description="vLLM: KV cache, GiB (on a CPU, VLLM_CPU_KVCACHE_SPACE "
                                             "overrides it where set)")
    vllm_block_size: PositiveInt | None = Field(
        None, description="vLLM: tokens per KV block; default: 32 on CPU (its attention takes multiples of 32), "
        "vLLM's own elsewhere. Only full blocks are shared, so n samples of a prompt shorter than a block each "
        "read the prompt again")

    # rationale cache
    cache_size: PositiveInt = Field(16384, description="in-process cache: rationales kept (a few KiB each)")
    cache_ttl_s: PositiveInt = Field(7 * 24 * 3600, le=10 * 365 * 24 * 3600,
                                     description="Redis cache: expiry of a question's pool (Redis refuses years more)")

    # new adapter versions (written by training jobs) go live without a restart
    watch_poll_s: float = Field(10.0, ge=0.1, description="poll of the store, the fallback to Redis announcements")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("store", "redis_url", "adapters", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        """`GFN_STORE=` (an unset shell variable) means the default, as the CLI reads it, not `.`."""
        if value != "":
            return value
        return store_root() if info.field_name == "store" else None

    @field_validator("redis_url")
    @classmethod
    def _a_redis_url(cls, url: str | None) -> str | None:
        return None if url is None else check_redis_url(url)

    @field_validator("api_key")
    @classmethod
    def _a_key(cls, key: SecretStr | None) -> SecretStr | None:
        """An empty key would be met by every request that sends none."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("empty: unset GFN_API_KEY to serve without one, or give a key")
        return key

    @field_validator("store")
    @classmethod
    def _a_directory(cls, store: Path) -> Path:
        """The store's own check, as a settings error naming `store` at start."""
        try:
            AdapterStore(store)
        except StoreNotADirectory as error:
            raise ValueError(str(error)) from None
        return store

    @field_validator("vllm_block_size")
    @classmethod
    def _a_cpu_block(cls, size: int | None) -> int | None:
        """vLLM refuses other sizes on a CPU only once the model has loaded, in a worker's traceback."""
        import torch

        if size is not None and size % CPU_BLOCK_SIZE and not torch.cuda.is_available():
            raise ValueError(f"{size}: vLLM's attention on a CPU takes multiples of {CPU_BLOCK_SIZE}")
        return size

    @field_validator("device")
    @classmethod
    def _here(cls, device: str) -> str:
        """A GPU that is not here is named when the settings are read, before the model loads."""
        resolve_device(device)
        return device


OTHER_VARIABLES = frozenset({
    "GFN_HOME", "GFN_CACHE_DIR",  # where files live (adapters/home.py, adapters/fingerprint.py)
    "GFN_IMAGE", "GFN_MODELS_DIR", "GFN_API_PORT", "GFN_API_GPUS", "GFN_WORKER_GPUS",  # docker compose's
})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``GFN_*`` variables nothing reads, each named with the one it most resembles: pydantic-settings
    skips them, so a typo (``GFN_MAX_TOKEN``) would leave its setting at the default unnoticed."""
    known = {f"GFN_{field.upper()}" for field in Settings.model_fields} | OTHER_VARIABLES
    warnings = []
    for name in sorted(n for n in environ if n.upper().startswith("GFN_") and n.upper() not in known):
        near = difflib.get_close_matches(name.upper()[4:], [k[4:] for k in known], n=1, cutoff=0.7)
        warnings.append(f"{name} is no setting and is ignored" + "".join(f": did you mean GFN_{n}?" for n in near))
    return warnings
