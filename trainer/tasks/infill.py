"""Story infilling (Hu et al., ICLR 2024): sample the middle Z of a story between a beginning
X and an ending Y from the posterior p(Z | X, Y) ∝ p(X Z Y).

The policy reads both ends in the Beginning/Ending/Middle format; the reward is read by
the base model from the plain story, X + Z + " " + Y, for every prefix of Z in one batched
pass (Scorer.prefixes_and_suffix). p(X) is the same for every Z of a prompt, so
log p(Z Y | X) is the log-reward. In the demo world every possible middle is known, so
the exact posterior is too: the evaluation scores every candidate under the base model
and compares the samples with it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from adapters.manifest import Text
from trainer.jsonl import DataError, data_file, stable_tenth, task_records
from trainer.metrics import bleu4, distinct_n, total_variation
from trainer.plots import bar_chart
from trainer.rollout import Rollout
from trainer.scoring import Scorer
from trainer.tasks.base import EvalPrompts, MaxLen, MinLen, Prompt, Sampler, Task, TaskConfig
from world import stories

PROMPT_TEMPLATE = "Beginning: {prefix}\nEnding: {suffix}\nMiddle:"
OFF_SUPPORT = -1  # the bucket of samples that are none of the candidates


class InfillRecord(BaseModel):
    """One line of a user's JSONL data: both ends, and optionally the true middle (for SFT
    and BLEU) and every possible middle (for the exact posterior). The base model reads
    prefix + " " + middle + " " + suffix."""

    model_config = ConfigDict(extra="forbid")

    prefix: Text
    suffix: Text
    middle: str | None = None
    candidates: list[str] = []

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[str]) -> list[str]:
        """A sample matches a candidate up to surrounding spaces: two that agree so would split one
        middle's mass between them, and the exact posterior's distance would count it twice."""
        stripped = [c.strip() for c in candidates]
        if twice := sorted({c for c in stripped if stripped.count(c) > 1}):
            raise ValueError(f"{twice[0]!r} is listed twice (candidates compare without surrounding spaces)")
        return candidates


RecordsFile = data_file(InfillRecord)


class InfillConfig(TaskConfig):
    """min_len 0: an empty middle may be sampled but its reward, p(X Y), is tiny.

    The bundled config sets stop_after ['.'], so the middle ends only after a full stop. A partial
    sentence followed by the ending ("She told a police The police thanked her") gets a reward
    some e^-20 below the whole one, so a policy allowed to stop there must learn stop
    probabilities of e^-20 to e^-30 at every such state, and a stop logit short of that skews the
    flows through it and with them the choice of event (on the v2 demo world: TV 0.24 to the exact
    posterior; with the rule, 0.16-0.20 over two seeds). Barred states' flows are learned
    instead (TrainConfig.barred_flow_offset)."""

    name: Literal["infill"] = "infill"
    min_len: MinLen = 0
    max_len: MaxLen = 12
    data: RecordsFile = Field(None, description="JSONL of InfillRecord; default: stories of the demo world")
    eval_data: RecordsFile = Field(None, description="JSONL for evaluation; default: a held-out tenth of `data`, "
                                                     "or the demo world's held-out frames")
    demo_stories: PositiveInt = 400
    eval_prompts: EvalPrompts = 24
    eval_samples: PositiveInt = 128
    seed: int = 0


class InfillTask(Task):
    name = "infill"
    config_type = InfillConfig
    prompt_template = PROMPT_TEMPLATE

    def __init__(self, config: InfillConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.records, self.eval_records = task_records(
            config, InfillRecord, _held_out,
            lambda: demo_records(heldout=False, n=config.demo_stories, seed=config.seed),
            lambda _: demo_records(heldout=True, n=config.eval_prompts, seed=config.seed))
        for record in self.eval_records:
            for candidate in record.candidates:
                if why := self.unwritable(candidate):
                    raise DataError(f"task: the evaluation record {record.prefix[:60]!r} has the candidate "
                                    f"{candidate[:60]!r}, which {why}: the policy could never write it, yet the "
                                    "exact posterior would give it mass")

    def unwritable(self, middle: str) -> str | None:
        """Why the policy could not write `middle` under this config, or None if it could."""
        ids, low, high = self.ids(" " + middle), self.config.min_len, self.config.max_len
        if not low <= len(ids) <= high:
            return f"is {len(ids)} tokens, outside task.min_len..task.max_len ({low}..{high})"
        if self.config.stop_after and (not ids or ids[-1] not in self.stop_after()):
            return f"does not end with one of task.stop_after {self.config.stop_after}"
        return None

    # ------------------------------------------------------------ training
    def prompt(self, record: InfillRecord) -> Prompt:
        ids = self.encode_prompt(prefix=record.prefix, suffix=record.suffix)
        return Prompt(key=self.prompt_template.format(prefix=record.prefix, suffix=record.suffix), ids=ids,
                      fields={"prefix": record.prefix, "suffix": record.suffix})

    def sft_pairs(self) -> list[tuple[Prompt, list[int]]]:
        """(prompt, middle ids) of the training records that have a middle."""
        return [(self.prompt(r), self.ids(" " + r.middle)) for r in self.records if r.middle]

    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """log p(z1..zi Y | X) for every prefix, read from the plain story X z1..zi Y."""
        plain = Rollout([self.context_ids(p.fields["prefix"]) for p in prompts], rollout.tokens, rollout.lengths, rollout.forced)
        prefix, suffix = scorer.prefixes_and_suffix(plain, [self.ids(" " + p.fields["suffix"]) for p in prompts])
        return prefix + suffix

    def read_length(self, prompt: Prompt) -> int:
        """The reward reads the plain story X Z Y."""
        prefix, suffix = self.context_ids(prompt.fields["prefix"]), self.ids(" " + prompt.fields["suffix"])
        return max(super().read_length(prompt), len(prefix) + self.config.max_len + len(suffix))

    # ------------------------------------------------------------ evaluation
    def log_joint(self, scorer: Scorer, record: InfillRecord, latents: Sequence[Sequence[int]]) -> torch.Tensor:
        """log p(Z Y | X) of whole middles Z (token ids): [N]."""
        context, ending = self.context_ids(record.prefix), self.ids(" " + record.suffix)
        return scorer.continuation([context] * len(latents), [list(z) + ending for z in latents])

    def exact_posterior(self, scorer: Scorer, record: InfillRecord) -> list[float]:
        """p(candidate | X, Y) over the record's candidates, under the base model."""
        log_joint = self.log_joint(scorer, record, [self.ids(" " + c) for c in record.candidates])
        return torch.softmax(log_joint.double(), 0).tolist()

    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path, samples: int | None = None) -> dict[str, Any]:
        n = samples or self.config.eval_samples
        texts = [[self.text(z) for z in sample([self.prompt(r).ids] * n).latents()]
                 for r in self.eval_records]
        posteriors = [self.exact_posterior(scorer, r) if r.candidates else None for r in self.eval_records]
        metrics = sample_metrics(self.eval_records, texts, posteriors)
        if metrics.get("tv") is not None:
            plot_posterior(out_dir / "eval.png", self.eval_records, texts, posteriors, metrics["tv"])
        return metrics


# ---------------------------------------------------------------- data
def _held_out(record: InfillRecord) -> bool:
    """A stable tenth of a user's stories, by both ends (the demo world holds out frames instead)."""
    return stable_tenth(f"{record.prefix}\n{record.suffix}")


def demo_records(heldout: bool, n: int, seed: int = 0) -> list[InfillRecord]:
    """Stories drawn as the world draws them (the event from the frame's prior), on
    training or held-out frames; held-out ones use distinct frames while they last."""
    rng = random.Random(seed * 2 + heldout)
    frames = [f for f in stories.all_frames() if stories.is_heldout(f) == heldout]
    if heldout:
        frames = rng.sample(frames, min(n, len(frames))) * (n // len(frames) + 1)
    records = []
    for i in range(n):
        frame = frames[i] if heldout else rng.choice(frames)
        event = rng.choices(range(len(stories.EVENTS)), weights=frame.prior())[0]
        records.append(InfillRecord(prefix=frame.beginning, suffix=frame.ending(event),
                                    middle=frame.events()[event], candidates=frame.events()))
    return records


# ---------------------------------------------------------------- metrics
def candidate_index(text: str, candidates: Sequence[str]) -> int:
    """Which candidate a sample is (exact text after stripping), else OFF_SUPPORT."""
    text = text.strip()
    return next((i for i, c in enumerate(candidates) if c.strip() == text), OFF_SUPPORT)


def sample_metrics(records: Sequence[InfillRecord], texts: Sequence[Sequence[str]],
                   posteriors: Sequence[Sequence[float] | None],
                   weights: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """Mean TV to the exact posterior (weighted samples when `weights` is given) and the
    off-support fraction over records with candidates; BLEU-4 against the true middles;
    distinct-2 within each record's samples, averaged."""
    tvs, off = [], []
    for i, (record, samples, posterior) in enumerate(zip(records, texts, posteriors)):
        if posterior is None:
            continue
        indices = [candidate_index(t, record.candidates) for t in samples]
        tvs.append(total_variation(indices, dict(enumerate(posterior)), None if weights is None else weights[i]))
        off.append(sum(k == OFF_SUPPORT for k in indices) / len(indices))
    pairs = [(t.strip(), r.middle) for r, samples in zip(records, texts) if r.middle for t in samples]
    return {
        "prompts": len(records),
        "samples_per_prompt": len(texts[0]) if texts else 0,
        "tv": sum(tvs) / len(tvs) if tvs else None,
        "off_support": sum(off) / len(off) if off else None,
        "bleu4": bleu4(*zip(*pairs)) if pairs else None,
        "distinct2": sum(distinct_n(samples, 2) for samples in texts) / len(texts),
    }


def plot_posterior(path: Path, records: Sequence[InfillRecord], texts: Sequence[Sequence[str]],
                   posteriors: Sequence[Sequence[float] | None], tv: float) -> None:
    """Sampled frequency and exact posterior of each candidate position (and off-support),
    averaged over records."""
    size = max(len(r.candidates) for r in records)
    sampled, exact, counted = [0.0] * (size + 1), [0.0] * (size + 1), 0
    for record, samples, posterior in zip(records, texts, posteriors):
        if posterior is None:
            continue
        counted += 1
        for t in samples:
            k = candidate_index(t, record.candidates)
            sampled[size if k == OFF_SUPPORT else k] += 1 / len(samples)
        for k, p in enumerate(posterior):
            exact[k] += p
    labels = [str(k) for k in range(size)] + ["off"]
    bar_chart(path, labels, [s / counted for s in sampled], [e / counted for e in exact],
              title=f"infill: sampled vs exact posterior by candidate (mean tv {tv:.3f})")
