"""Continuation at low temperature (Hu et al., ICLR 2024): the next sentence Z after one to
three sentences X, sampled from p(Z ⊤ | X)^(1/T) with ⊤ = "." and T annealed from 1 to a
value below 1 (the config's reward_temperature).

Tempering the whole sentence is not what token-level temperature does: sampling each token
at T sharpens every step on its own and does not give p(Z ⊤ | X)^(1/T), which the adapter
learns. The log-reward of stopping after z1..zi is log p(z1..zi | X) + log p(⊤ | X z1..zi),
all prefixes from one base-model pass (Scorer.latent). Tokens that end a sentence some other
way ("!", "?", newlines, eos) are masked, so the terminator is the only way out. min_len is
0: the reward itself makes an empty sentence unlikely.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from adapters.manifest import Text, VocabMask
from trainer.jsonl import data_file, stable_tenth, task_records
from trainer.metrics import distinct_n, pairwise_diversity
from trainer.plots import grouped_bars
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import EvalPrompts, MaxLen, MinLen, Prompt, Sampler, Task, TaskConfig, single_token
from world import corpus

TERMINATOR = "."
SENTENCE_ENDS = frozenset(".!?\n")
SENTENCE = re.compile(r"[^.!?]*[.!?]")


class ContinuationRecord(BaseModel):
    """One line of a user's JSONL data: the text to continue (one to three sentences)."""

    model_config = ConfigDict(extra="forbid")

    text: Text


RecordsFile = data_file(ContinuationRecord)


class ContinuationConfig(TaskConfig):
    name: Literal["continuation"] = "continuation"
    min_len: MinLen = 0
    max_len: MaxLen = 20
    data: RecordsFile = Field(None, description="JSONL of ContinuationRecord; default: paragraphs of the demo world")
    eval_data: RecordsFile = Field(None, description="JSONL for evaluation; default: a held-out tenth of `data`, "
                                                     "or held-out demo paragraphs")
    demo_prompts: PositiveInt = 2000
    eval_prompts: EvalPrompts = 32
    eval_samples: PositiveInt = Field(8, description="samples per prompt")
    seed: int = 0


class ContinuationTask(Task):
    name = "continuation"
    config_type = ContinuationConfig
    prompt_template = "{text}"

    def __init__(self, config: ContinuationConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.records, self.eval_records = task_records(
            config, ContinuationRecord, lambda r: stable_tenth(r.text),
            lambda: demo_records(config.demo_prompts, config.seed * 2),
            lambda train: demo_records(config.eval_prompts, config.seed * 2 + 1, exclude={r.text for r in train}))
        self._terminator_id = single_token(tokenizer, TERMINATOR)

    @property
    def terminator_id(self) -> int:
        return self._terminator_id

    def mask(self) -> VocabMask:
        """Deny every other way to end the sentence: special tokens and tokens holding
        sentence-final punctuation or a newline."""
        special = set(self.tokenizer.all_special_ids)
        banned = [i for i in range(len(self.tokenizer))
                  if i in special or SENTENCE_ENDS & set(self.tokenizer.decode([i]))]
        return VocabMask(mode="deny", token_ids=banned)

    def prompt(self, record: ContinuationRecord) -> Prompt:
        return Prompt(key=record.text, ids=self.encode_prompt(text=record.text), fields={"text": record.text})

    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """log p(z1..zi ⊤ | X) for every prefix i."""
        return scorer.stop_log_likelihood(rollout, self.terminator_id)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path, samples: int | None = None) -> dict[str, Any]:
        n = samples or self.config.eval_samples
        prompts = [self.prompt(r).ids for r in self.eval_records]
        latents = sample([p for p in prompts for _ in range(n)]).latents()
        metrics = self.sample_metrics(scorer, prompts, [latents[k * n:(k + 1) * n] for k in range(len(prompts))])
        per_prompt = metrics.pop("per_prompt")
        grouped_bars(out_dir / "eval.png", list(range(len(prompts))), per_prompt,
                     title=f"continuation: base log-likelihood of {n} samples per prompt", ylabel="log p(Z. | X)")
        return metrics

    def sample_metrics(self, scorer: Scorer, prompts: Sequence[list[int]],
                       latents: Sequence[Sequence[list[int]]]) -> dict[str, Any]:
        """Base log-likelihood log p(Z ⊤ | X) (mean over samples, and the mean over prompts
        of the best sample) against diversity within each prompt's samples (distinct-2 of
        words, 1 - mean pairwise cosine similarity of token counts), averaged over prompts."""
        contexts = [p for p, group in zip(prompts, latents) for _ in group]
        loglik = scorer.continuation(contexts, [list(z) + [self.terminator_id] for group in latents for z in group])
        groups, start = [], 0
        for group in latents:
            groups.append(loglik[start:start + len(group)])
            start += len(group)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {
            "prompts": len(prompts),
            "samples_per_prompt": mean([len(g) for g in latents]),
            "mean_loglik": loglik.mean().item(),
            "max_loglik": mean([g.max().item() for g in groups]),
            "distinct2": mean([distinct_n([self.text(z) for z in group], 2) for group in latents]),
            "diversity": mean([pairwise_diversity(group) for group in latents]),
            "per_prompt": {"mean": [g.mean().item() for g in groups], "max": [g.max().item() for g in groups]},
        }


# ---------------------------------------------------------------- data
def demo_records(n: int, seed: int, exclude: set[str] | None = None) -> list[ContinuationRecord]:
    """The first one to three sentences of the demo world's paragraphs (world.corpus),
    always leaving at least one sentence that followed; none of the texts in `exclude`."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        sentences = SENTENCE.findall(corpus.paragraph_line(rng))
        k = rng.randint(1, min(3, len(sentences) - 1))
        text = "".join(sentences[:k]).strip()
        if text not in (exclude or ()):
            records.append(ContinuationRecord(text=text))
    return records
