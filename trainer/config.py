"""Typed training configuration, read from YAML with `key.path=value` overrides.

Unknown keys are errors that name the key: a typo must never silently train the wrong
thing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from adapters.device import Device
from adapters.manifest import Dtype, LoraSpec
from adapters.store import AdapterName
from jobs.configs import Overrides, config_data
from jobs.rules import Ruled, rules
from trainer.tasks import AnyTaskConfig


DTYPE_HELP = ("the base model's weights and activations (the LoRA's weights stay float32): bfloat16 halves the "
              "memory, and is fast on GPUs and on CPUs with native bfloat16 (AMX, AVX512-BF16), slow where torch "
              "emulates it. The manifest records it; the service serves in it by default")


class _Strict(Ruled):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0, le=1)  # bounds past which a step turns the weights into NaN
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    accumulate: PositiveInt = 1
    final_lr_ratio: float = Field(1.0, gt=0, le=1, description=(
        "after warmup the rate follows a cosine from lr to lr times this at the last step (1: constant); "
        "a decay lets the flows fitted late settle instead of being chased at the full rate"))

    def factor(self, step: int, total: int) -> float:
        """The multiple of lr at `step` (0-based) of `total`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, total - 1 - self.warmup_steps)
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BehaviourConfig(_Strict):
    """The mix of samples in each batch (fractions of samples_per_prompt)."""

    model_config = ConfigDict(json_schema_extra=rules(ordered=[("temperature_low", "temperature_high")],
                                                      sum_to_one=["on_policy", "tempered", "replay"]))

    on_policy: float = Field(0.5, ge=0)
    tempered: float = Field(0.25, ge=0)
    replay: float = Field(0.25, ge=0)
    temperature_low: float = Field(0.5, ge=0.01, le=100)
    temperature_high: float = Field(2.0, ge=0.01, le=100)

    def counts(self, samples: int) -> tuple[int, int]:
        """(tempered, replayed at most) of `samples` per prompt; the rest are on-policy, at least one
        (the step's log-reward is measured on them), more while the replay buffer has fewer."""
        tempered, replayed = round(samples * self.tempered), round(samples * self.replay)
        if samples - tempered - replayed < 1:
            raise ValueError(f"behaviour: {samples} samples_per_prompt leave no on-policy sample after "
                             f"{tempered} tempered and {replayed} replayed; raise on_policy or samples_per_prompt")
        return tempered, replayed


class RewardTemperature(_Strict):
    """log R is divided by T, annealed linearly from `start` to `end`."""

    start: float = Field(1.0, ge=0.01, le=100)
    end: float = Field(1.0, ge=0.01, le=100)
    anneal_steps: int = Field(0, ge=0)

    def at(self, step: int) -> float:
        if self.anneal_steps == 0:
            return self.end
        return self.start + (self.end - self.start) * min(1.0, step / self.anneal_steps)


class ReplayConfig(_Strict):
    capacity: PositiveInt = Field(32, le=4096)
    dedup_distance: int = Field(1, ge=0)


class TrainLora(LoraSpec):
    model_config = ConfigDict(strict=True)  # as the other sections (jobs.rules.Ruled)

    r: PositiveInt = Field(16, le=1024, description="a cap, so a typo cannot run a worker out of memory")
    dropout: float = Field(0.0, ge=0, le=0, description="0: training runs in eval mode, on the log-probabilities "
                           "the sampler draws from (dropout would make every reward and residual noisy)")


class TrainConfig(_Strict):
    name: AdapterName
    base_model: str = Field("demo", description="a model directory, a hub id, or 'demo' (the demo world)")
    task: AnyTaskConfig
    # Caps a job's size, so a typo cannot hold a worker for days or run it out of memory
    steps: PositiveInt = Field(200, le=1_000_000)
    prompts_per_step: PositiveInt = Field(1, le=1024)
    samples_per_prompt: PositiveInt = Field(64, le=4096)
    subtb_lambda: float = Field(1.0, gt=0, le=1000)
    barred_flow_offset: float = Field(0.0, ge=-1000, le=1000, description=(
        "states that may not stop (before min_len, away from stop_after) have no reward; their log-flow is "
        "this minus the policy's log-probability of stopping there had it been allowed. A start near the "
        "task's log-rewards keeps early training stable: the base model puts that stop at e^-10 to e^-20 "
        "mid-sentence, so -20 starts those flows near e^-10 to e^0"))
    seed: int = Field(0, ge=0, lt=2**63)
    device: Device = "auto"
    dtype: Dtype = Field("float32", description=DTYPE_HELP)
    lora: TrainLora = TrainLora()
    optim: OptimConfig = OptimConfig()
    behaviour: BehaviourConfig = BehaviourConfig()
    reward_temperature: RewardTemperature = RewardTemperature()
    replay: ReplayConfig = ReplayConfig()
    checkpoint_every: PositiveInt = 25
    evaluate: bool = True

    @model_validator(mode="after")
    def _on_policy_left(self) -> "TrainConfig":
        self.behaviour.counts(self.samples_per_prompt)
        return self


def load_config(source: str | Path | dict[str, Any], overrides: Overrides = ()) -> TrainConfig:
    """A config from a YAML path (or a bundled config's name, e.g. 'rng') or a dict, with
    overrides: `["a.b=value"]` (values read as YAML) or `{"a.b": value}`."""
    return TrainConfig.model_validate(config_data(source, overrides))


Config = TypeVar("Config", bound=BaseModel)


def as_today(model: type[Config], stored: Any) -> Config | None:
    """A config stored by an earlier version (a checkpoint's, a manifest's) as today's model reads
    it, fields added since at their defaults; None where it no longer validates."""
    try:
        return model.model_validate(stored)
    except ValidationError:
        return None


def config_errors(error: ValidationError) -> list[str]:
    """Each problem as "task.target.high: message": the field as the config spells it, without the
    union tags pydantic puts in its path (task.rng.target.uniform.high) or its links."""
    return [f"{field_path(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()]


def field_path(loc: tuple[int | str, ...], model: Any = TrainConfig) -> str:
    """A pydantic error location as a config key path: the tag after a tagged union's field is dropped."""
    parts, rest = [], list(loc)
    while rest:
        key = rest.pop(0)
        parts.append(str(key))
        if rest and rest[0] == "[key]":  # the key of a mapping (a weight's number) is what is wrong
            parts[-1] += f" ({rest.pop(0)[1:-1]})"
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field else None
        if field is not None and isinstance(field.discriminator, str) and rest:  # the member the tag picks
            tag, kind = rest.pop(0), field.discriminator
            model = next((m for m in get_args(field.annotation) if get_args(m.model_fields[kind].annotation) == (tag,)),
                         None)
    return ".".join(parts) or "config"


def schema_json() -> str:
    """TrainConfig's JSON schema, checked in as configs/schema.json (`gfn configs schema`)
    so that jobs/ validates configs without importing the trainer."""
    return json.dumps(TrainConfig.model_json_schema(), indent=2) + "\n"
