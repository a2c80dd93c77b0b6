"""Constrained generation: one sentence Z that uses given keywords and avoids given words,
sampled in proportion to its fluency, p(Z ⊤ | X) · exp(-penalty · violations(Z)).

X, the base model's context, is the keywords prompt it was trained on
(world.corpus.keywords_prompt: "Keywords: dog, park. Sentence:"); the policy's prompt also
names the words to avoid. A violation is a keyword missing from Z or an avoided word
present in it, as whole words, case-insensitively.

The policy adds a word bias to its logits (adapters.manifest.WordBias): `keyword_bias` on
the keywords' tokens and `avoid_bias` on the avoided words'. A small model cannot learn to
copy words from its prompt (the demo model uses a given keyword a fifth of the time, and
neither a GFlowNet nor an SFT LoRA taught it more), so the policy starts near sentences
that satisfy the constraints and the adapter learns the rest. The target is unchanged:
the bias is part of q, in training, the loss and serving alike.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationInfo, field_validator, model_validator

from adapters.manifest import WordBias
from trainer.jsonl import data_file, stable_tenth, task_records
from trainer.metrics import distinct_n
from trainer.plots import bar_chart
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import EvalPrompts, MaxLen, MinLen, Prompt, Sampler, Task, TaskConfig, check_template, template_pattern
from world import corpus

PROMPT_TEMPLATE = "Keywords: {keywords}. Avoid: {avoid}. Sentence:"
REWARD_TEMPLATE = "Keywords: {keywords}. Sentence:"  # world.corpus.keywords_prompt
FILLS = {"prompt_template": ["keywords", "avoid"], "reward_template": ["keywords"]}  # what prompt() and context() fill
WORD = re.compile(r"[a-z0-9']+")


class ConstrainedRecord(BaseModel):
    """One line of a user's JSONL data: the words to use and to avoid, and optionally a
    sentence that satisfies them (for SFT)."""

    model_config = ConfigDict(extra="forbid")

    keywords: list[str] = Field(min_length=1)
    avoid: list[str] = []
    sentence: str | None = None

    @field_validator("keywords", "avoid")
    @classmethod
    def _words(cls, words: list[str]) -> list[str]:
        for word in words:
            if not words_of(word):
                raise ValueError(f"{word!r} has no letters or digits")
        return words

    @model_validator(mode="after")
    def _consistent(self) -> "ConstrainedRecord":
        both = {w.lower() for w in self.keywords} & {w.lower() for w in self.avoid}
        if both:
            raise ValueError(f"{sorted(both)} both required and avoided")
        return self


RecordsFile = data_file(ConstrainedRecord)


class ConstrainedConfig(TaskConfig):
    """min_len 0, as for infilling: the empty sentence misses every keyword anyway."""

    name: Literal["constrained"] = "constrained"
    min_len: MinLen = 0
    max_len: MaxLen = 16
    prompt_template: str = Field(PROMPT_TEMPLATE, json_schema_extra=template_pattern(FILLS["prompt_template"]))
    reward_template: str = Field(REWARD_TEMPLATE, json_schema_extra=template_pattern(FILLS["reward_template"]))
    penalty: PositiveFloat = Field(8.0, description="log-reward lost per missing keyword or avoided word present")
    keyword_bias: float = Field(8.0, ge=-1000, le=1000, description="the policy's logit bias on the keywords' tokens (0: none)")
    avoid_bias: float = Field(-99.0, ge=-1000, le=1000, description="the policy's logit bias on the avoided words' tokens (0: none)")
    data: RecordsFile = Field(None, description="JSONL of ConstrainedRecord; default: keyword sets of the demo world")
    eval_data: RecordsFile = Field(None, description="JSONL for evaluation; default: a held-out tenth of `data`, "
                                                     "or held-out keyword sets of the demo world")
    demo_sets: PositiveInt = 300
    eval_prompts: EvalPrompts = 24
    eval_samples: PositiveInt = 32
    seed: int = 0

    @field_validator("prompt_template", "reward_template")
    @classmethod
    def _fills(cls, template: str, info: ValidationInfo) -> str:
        return check_template(template, FILLS[info.field_name], required=["keywords"])


class ConstrainedTask(Task):
    name = "constrained"
    config_type = ConstrainedConfig

    def __init__(self, config: ConstrainedConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.prompt_template = config.prompt_template
        self.records, self.eval_records = task_records(
            config, ConstrainedRecord, lambda r: is_heldout(r.keywords),
            lambda: demo_records(heldout=False, n=config.demo_sets, seed=config.seed),
            lambda _: demo_records(heldout=True, n=config.eval_prompts, seed=config.seed))
        if "{avoid}" not in config.prompt_template and any(r.avoid for r in self.records + self.eval_records):
            raise ValueError("task.prompt_template must contain {avoid}: the data has words to avoid")

    # ------------------------------------------------------------ training
    def prompt(self, record: ConstrainedRecord) -> Prompt:
        fields = {"keywords": ", ".join(record.keywords), "avoid": ", ".join(record.avoid)}
        words = {"keywords": record.keywords, "avoid": record.avoid}
        return Prompt(key=self.prompt_template.format(**fields), ids=self.encode_prompt(**fields), fields=words,
                      bias=self.prompt_bias(words))

    def word_biases(self) -> list[WordBias]:
        rules = [WordBias(field="keywords", bias=self.config.keyword_bias),
                 WordBias(field="avoid", bias=self.config.avoid_bias)]
        return [rule for rule in rules if rule.bias]

    def sft_pairs(self) -> list[tuple[Prompt, list[int]]]:
        """(prompt, sentence ids) of the training records that have a sentence."""
        return [(self.prompt(r), self.ids(" " + r.sentence)) for r in self.records if r.sentence]

    def context(self, keywords: Sequence[str]) -> list[int]:
        """The base model's X for these keywords."""
        return self.context_ids(self.config.reward_template.format(keywords=", ".join(keywords)))

    def read_length(self, prompt: Prompt) -> int:
        """The reward reads Z after the reward template's context."""
        return max(super().read_length(prompt), len(self.context(prompt.fields["keywords"])) + self.config.max_len + 1)

    def fluency(self, scorer: Scorer, keywords: Sequence[Sequence[str]], rollout: Rollout) -> torch.Tensor:
        """log p(z1..zi ⊤ | X) under the base model for every prefix: [B, L+1]."""
        contexts = [self.context(k) for k in keywords]
        return scorer.stop_log_likelihood(Rollout(contexts, rollout.tokens, rollout.lengths, rollout.forced),
                                          self.terminator_id)

    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """log p(z1..zi ⊤ | X) - penalty · violations(z1..zi) for every prefix."""
        log_r = self.fluency(scorer, [p.fields["keywords"] for p in prompts], rollout)
        for b, (prompt, latent) in enumerate(zip(prompts, rollout.latents())):
            for i in range(len(latent) + 1):  # plain decode: violations match words, spacing is moot
                bad = violations(self.tokenizer.decode(latent[:i]), prompt.fields["keywords"], prompt.fields["avoid"])
                log_r[b, i] -= self.config.penalty * bad
        return log_r

    # ------------------------------------------------------------ evaluation
    def base_log_likelihood(self, scorer: Scorer, keywords: Sequence[Sequence[str]], rollout: Rollout) -> torch.Tensor:
        """log p(Z ⊤ | X) of each whole sample under the base model: [B]."""
        return self.fluency(scorer, keywords, rollout)[torch.arange(len(keywords)), rollout.lengths]

    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path, samples: int | None = None) -> dict[str, Any]:
        n = samples or self.config.eval_samples
        texts, rates, loglik, seconds = [], [], [], 0.0
        for record in self.eval_records:
            tick = time.perf_counter()
            prompt = self.prompt(record)
            rollout = sample([prompt.ids] * n, [prompt.bias] * n)
            seconds += time.perf_counter() - tick
            texts.append([self.text(z) for z in rollout.latents()])
            rates.append(sum(violations(t, record.keywords, record.avoid) == 0 for t in texts[-1]) / n)
            loglik += self.base_log_likelihood(scorer, [record.keywords] * n, rollout).tolist()
        metrics = {"prompts": len(rates), "samples_per_prompt": n, "satisfaction": sum(rates) / len(rates),
                   "loglik": sum(loglik) / len(loglik), "distinct2": sum(distinct_n(t, 2) for t in texts) / len(texts),
                   "samples_per_second": len(loglik) / seconds}
        bar_chart(out_dir / "eval.png", [", ".join(r.keywords) for r in self.eval_records], rates, [1.0] * len(rates),
                  title=f"constrained: satisfaction per keyword set ({metrics['satisfaction']:.2f})")
        return metrics


def words_of(text: str) -> list[str]:
    return WORD.findall(text.lower())


def violations(text: str, keywords: Sequence[str], avoid: Sequence[str]) -> int:
    """Keywords (or phrases) missing from text plus avoided ones present, as whole words."""
    padded = f" {' '.join(words_of(text))} "
    present = lambda word: f" {' '.join(words_of(word))} " in padded  # noqa: E731
    return sum(not present(k) for k in keywords) + sum(present(a) for a in avoid)


# ---------------------------------------------------------------- data
def is_heldout(keywords: Sequence[str]) -> bool:
    """One keyword set in ten (a stable hash of the sorted set) is never trained on."""
    return stable_tenth(",".join(sorted(k.lower() for k in keywords)))


def demo_records(heldout: bool, n: int, seed: int = 0) -> list[ConstrainedRecord]:
    """Two keywords from a sentence of the demo world and one word to avoid, taken from a
    word class the keywords leave free (so the base model would often use it)."""
    rng = random.Random(seed * 2 + heldout)
    classes = [corpus.NOUNS, corpus.VERBS, corpus.PLACE_NOUNS, corpus.ADJECTIVES]
    records: list[ConstrainedRecord] = []
    while len(records) < n:
        text = corpus.sentence(rng)
        keywords = rng.sample(corpus.content_words(text), 2)
        if is_heldout(keywords) != heldout:
            continue
        free = [c for c in classes if not set(keywords) & set(c)]
        avoid = rng.choice([w for w in rng.choice(free) if w not in text.rstrip(".").split()])
        records.append(ConstrainedRecord(keywords=keywords, avoid=[avoid], sentence=text))
    return records
