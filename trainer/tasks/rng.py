"""Random numbers: sample integers from any target distribution (Hu et al., ICLR 2024).

The reward of a prefix is the target's probability of the integer it spells when it is
a complete, canonical number in the support, else a floor (which also bounds the support's
far tail from below). With the digits-only vocabulary (the default) and max_len fitted to
the support, the only invalid strings are those with a leading zero (10 for two digits),
so a floor of e^-10 keeps their mass under 1e-3. A lower floor is worse, not safer: the
policy must then fit stop probabilities far below anything it samples (a binomial's
one-digit states, ~e^-14), and those residuals swamp the ones that shape the samples; the
loss plateaued at 2.3 with e^-15 and three digits, against 0.9 with e^-10 and two.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, PositiveFloat, PositiveInt, Strict, model_validator

from adapters.manifest import VocabMask
from jobs.rules import Ruled, rules
from trainer.plots import bar_chart
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import MaxLen, MinLen, Prompt, Sampler, Task, TaskConfig
from world.corpus import RNG_PROMPT

NUMBER = re.compile(r"0|[1-9][0-9]*")
# The support is numbers of at most MAX_DIGITS digits: a typo (high: 1000000000) must not build a
# 10^9-entry pmf, and the evaluation plots one bar per number (10^4 bars: 8 s; 10^5: 97 s, 1.2 GB).
MAX_DIGITS = 4
MAX_NUMBER = 10**MAX_DIGITS - 1
# The task writes digits only (the mask, and NUMBER has no sign), so a negative number is never sampled
Number = Annotated[int, Field(ge=0, le=MAX_NUMBER, description=f"a number the task can write: 0..{MAX_NUMBER}")]


class _Target(Ruled):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Uniform(_Target):
    model_config = ConfigDict(json_schema_extra=rules(ordered=[("low", "high")]))

    kind: Literal["uniform"] = "uniform"
    low: Number = 0
    high: Number = 99

    def pmf(self) -> dict[int, float]:
        return {k: 1.0 / (self.high - self.low + 1) for k in range(self.low, self.high + 1)}


class Binomial(_Target):
    kind: Literal["binomial"] = "binomial"
    n: Number = 99
    p: float = Field(0.5, gt=0, lt=1)

    def pmf(self) -> dict[int, float]:
        """In log space: comb(n, k) p^k overflows a float for large n."""
        log_p, log_q = math.log(self.p), math.log1p(-self.p)
        return {k: math.exp(math.lgamma(self.n + 1) - math.lgamma(k + 1) - math.lgamma(self.n - k + 1)
                            + k * log_p + (self.n - k) * log_q) for k in range(self.n + 1)}


class Poisson(_Target):
    kind: Literal["poisson"] = "poisson"
    rate: PositiveFloat = 20.0
    max: Number = 99

    def pmf(self) -> dict[int, float]:
        """Normalised in log space: with a rate far above max every weight underflows to 0."""
        logs = {k: k * math.log(self.rate) - math.lgamma(k + 1) for k in range(self.max + 1)}
        top = max(logs.values())
        weights = {k: math.exp(v - top) for k, v in logs.items()}
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items()}


class Weights(_Target):
    kind: Literal["weights"] = "weights"
    # lax, for a queued config is JSON, whose keys are text ("3"); the schema names the keys' bound
    # too, which minimum/maximum do not check on text
    weights: dict[Annotated[Number, Strict(False)], PositiveFloat] = Field(min_length=1, json_schema_extra={
        "propertyNames": {"pattern": f"^[0-9]{{1,{MAX_DIGITS}}}$"}})

    def pmf(self) -> dict[int, float]:
        top = max(self.weights.values())  # divided first: two weights near the float maximum sum to inf
        total = sum(w / top for w in self.weights.values())
        return {k: w / top / total for k, w in sorted(self.weights.items())}


Target = Annotated[Uniform | Binomial | Poisson | Weights, Field(discriminator="kind")]


class RngConfig(TaskConfig):
    name: Literal["rng"] = "rng"
    prompt: str = Field(RNG_PROMPT, min_length=1, description="the paper's prompt, which the demo world's corpus uses")
    target: Target = Uniform()
    min_len: MinLen = 1
    max_len: MaxLen | None = Field(None, description="default: the digits of the support's largest number "
                                                  "(a longer string can only be invalid)")
    floor_log_reward: float = -10.0
    digits_only: bool = True
    eval_samples: PositiveInt = 10000

    @model_validator(mode="after")
    def _support_fits(self) -> "RngConfig":
        widest = len(str(max(self.target.pmf())))
        if self.max_len is None:
            self.max_len = widest
        elif widest > self.max_len:
            raise ValueError(f"max_len {self.max_len} cannot spell {max(self.target.pmf())}; raise it")
        return self.check_rules()


class RngTask(Task):
    name = "rng"
    config_type = RngConfig

    def __init__(self, config: RngConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.prompt_template = config.prompt.replace("{", "{{").replace("}", "}}")
        self.pmf = config.target.pmf()
        self._prompt = Prompt(key="rng", ids=self.encode_prompt())

    def mask(self) -> VocabMask:
        if not self.config.digits_only:
            return VocabMask()
        digits = [i for i in range(len(self.tokenizer)) if self.tokenizer.decode([i]).isdigit()]
        return VocabMask(mode="allow", token_ids=digits)

    def prompt(self, record: None = None) -> Prompt:
        return self._prompt

    def train_prompts(self) -> list[Prompt]:
        return [self._prompt]

    def number(self, tokens: list[int]) -> int | None:
        """The integer a latent spells, or None when it is not one canonical number."""
        text = self.tokenizer.decode(tokens)
        return int(text) if NUMBER.fullmatch(text) else None

    def log_reward(self, tokens: list[int]) -> float:
        """log target(k) for a number k in the support, never below the floor: a target's
        far tail (a binomial's reaches e^-119) must not rank under invalid strings, and
        rewards that small would only blow up the residuals for mass that is ~0 anyway."""
        mass, floor = self.pmf.get(self.number(tokens), 0.0), self.config.floor_log_reward
        return max(math.log(mass), floor) if mass > 0 else floor  # a far tail may underflow to 0

    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        out = torch.full((len(prompts), rollout.tokens.shape[1] + 1), self.config.floor_log_reward)
        for b, latent in enumerate(rollout.latents()):
            for i in range(1, len(latent) + 1):
                out[b, i] = self.log_reward(latent[:i])
        return out

    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path, samples: int | None = None) -> dict[str, Any]:
        values = draw_numbers(self, sample, samples or self.config.eval_samples)
        metrics = distribution_metrics(values, self.pmf)
        histogram = metrics.pop("histogram")
        support = sorted(self.pmf)
        bar_chart(out_dir / "eval.png", support, [histogram.get(k, 0.0) for k in support],
                  [self.pmf[k] for k in support], title=f"rng: sampled vs target (tv {metrics['tv']:.3f})")
        return metrics


def draw_numbers(task: RngTask, sample: Sampler, n: int, batch: int = 1000) -> list[int | None]:
    values: list[int | None] = []
    while len(values) < n:
        rollout = sample([task._prompt.ids] * min(batch, n - len(values)))
        values += [task.number(latent) for latent in rollout.latents()]
    return values


def distribution_metrics(values: list[int | None], pmf: dict[int, float]) -> dict[str, Any]:
    """Valid fraction, total variation (invalid samples as their own bucket) and
    KL(empirical of valid samples || target), plus the empirical histogram."""
    n = len(values)
    counts: dict[int, int] = {}
    for v in values:
        if v is not None and v in pmf:
            counts[v] = counts.get(v, 0) + 1
    valid = sum(counts.values())
    histogram = {k: c / n for k, c in counts.items()}
    tv = 0.5 * (sum(abs(histogram.get(k, 0.0) - p) for k, p in pmf.items()) + (n - valid) / n)
    kl = sum((c / valid) * math.log((c / valid) / pmf[k]) for k, c in counts.items()) if valid else float("inf")
    return {"samples": n, "valid_fraction": valid / n, "tv": tv, "kl": kl, "histogram": histogram}
