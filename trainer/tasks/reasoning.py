"""Arithmetic with a calculator (Hu et al., ICLR 2024): sample a rationale Z for a question X
from the posterior p(Z | X, Y) ∝ p(Z Y | X), Y = ". The answer is N." with N the true answer.

    X = "Question: 6 - 0 - 4 - 8 = ? Answer:"          (the policy's prompt, no few-shot)
    Z = " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"            (the calculator writes each value)
    ⊤ = "."                                            (never inside Z: it starts Y)

The policy writes "a op b =" and the calculator (adapters.calculator, through the rollout's
tool hook) writes the value; those tokens are flagged `forced`, so the objective treats them
as deterministic and the replay buffer keeps them. The target is the posterior of the base
model *with* its calculator: tool-written tokens have probability one, so the log-reward of
stopping after z1..zi is

    log R(z1..zi ⊤) = Σ_{k<i, z_k+1 not forced} log p(z_k+1 | P X z≤k) + log p(Y | P X z≤i)

with P the few-shot `reward_prefix`, every prefix (also those cut mid-step) in one batched
pass (Scorer.prefixes_and_suffix). The vocabulary is limited to what rationales are made of
(digits, signs, "=", ",", spaces), found by decoding every token of the tokenizer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationInfo, field_validator

from adapters.calculator import CalculatorError, TokenCalculator, evaluate
from adapters.manifest import VocabMask
from adapters.reasoning import (ANSWER_TOKENS, MAX_OPERANDS, MIN_OPERANDS, AnswerFormat, aggregate, answer_log_probs,
                                parse_question, read_answers, solve)
from jobs.rules import pattern
from trainer.jsonl import DataError, data_file, load_jsonl, split_data, stable_tenth
from trainer.plots import grouped_bars
from trainer.rollout import Rollout, Tool
from trainer.scoring import Scorer
from trainer.tasks.base import MaxLen, MinLen, Prompt, Sampler, Task, TaskConfig, single_token
from world import corpus

RATIONALE_CHARACTERS = frozenset("0123456789+-=, ")
TERMINATOR = "."
ANSWER_PROMPT_RULE = f"must start with the terminator {TERMINATOR!r}: Y begins where Z stops"
OperandCounts = Annotated[list[Annotated[int, Field(ge=MIN_OPERANDS, le=MAX_OPERANDS)]], Field(min_length=1)]


class ReasoningRecord(BaseModel):
    """One line of a user's JSONL data: a question, its answer and optionally a worked
    rationale in the calculator format (the labelled examples: few-shot prefix and SFT)."""

    model_config = ConfigDict(extra="forbid")

    question: str
    answer: int
    rationale: str | None = None

    @field_validator("question")
    @classmethod
    def _canonical(cls, question: str) -> str:
        return parse_question(question).text

    @field_validator("answer")
    @classmethod
    def _is_the_value(cls, answer: int, info: ValidationInfo) -> int:
        question = info.data.get("question")
        if question is not None and answer != solve(question):
            raise ValueError(f"{answer} is not the value of {question!r} ({solve(question)})")
        return answer

    @field_validator("rationale")
    @classmethod
    def _holds(cls, rationale: str | None, info: ValidationInfo) -> str | None:
        if rationale is None:
            return None
        if "answer" in info.data:
            check_rationale(rationale, info.data["answer"])
        return " " + rationale.strip()


def check_rationale(rationale: str, answer: int) -> None:
    """Every step "a op b = v" must hold and the last value must be the answer."""
    value = None
    for step in rationale.split(","):
        expression, equals, stated = step.partition("=")
        try:
            value = evaluate(expression)
        except CalculatorError:
            raise ValueError(f"rationale step {step.strip()!r} is not 'a + b = v' or 'a - b = v'") from None
        if not equals or stated.strip() != str(value):
            raise ValueError(f"rationale step {step.strip()!r} does not state its value {value}")
    if value != answer:
        raise ValueError(f"the rationale ends with {value}, not the answer {answer}")


RecordsFile = data_file(ReasoningRecord)


class ReasoningConfig(TaskConfig):
    name: Literal["reasoning"] = "reasoning"
    min_len: MinLen = 0
    max_len: MaxLen = 48
    tool: Literal["calculator"] = "calculator"
    answer_prompt: str = Field(". The answer is", description="what the base model reads after X Z to state the answer",
                               json_schema_extra=pattern(f"^{re.escape(TERMINATOR)}", ANSWER_PROMPT_RULE))
    reward_prefix: str | None = Field(None, description="few-shot text before X when the base model reads the answer; "
                                                         "default: the first `reward_shots` labelled rationales")
    reward_shots: int = Field(3, ge=0)
    data: RecordsFile = Field(None, description="JSONL of ReasoningRecord; default: questions of the demo world")
    eval_data: RecordsFile = Field(None, description="JSONL for evaluation; default: a held-out tenth of `data`, "
                                                     "or held-out demo questions")
    demo_questions: PositiveInt = 2000
    demo_labelled: PositiveInt = 20
    train_operands: OperandCounts = [3, 4]
    eval_operands: OperandCounts = [3, 4, 5]
    eval_questions: PositiveInt = Field(30, description="held-out questions per operand count")
    eval_rationales: PositiveInt = Field(10, description="rationales sampled per question (N)")
    seed: int = 0

    @field_validator("answer_prompt")
    @classmethod
    def _starts_with_terminator(cls, answer_prompt: str) -> str:
        if not answer_prompt.startswith(TERMINATOR):
            raise ValueError(ANSWER_PROMPT_RULE)
        return answer_prompt


class ReasoningTask(Task):
    name = "reasoning"
    config_type = ReasoningConfig
    prompt_template = "{question}"

    def __init__(self, config: ReasoningConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.records, self.labelled, self.eval_records = load_records(config)
        self.format = AnswerFormat(config.answer_prompt)  # few_shot writes examples with its answer text
        prefix = self.few_shot(config.reward_shots) if config.reward_prefix is None else config.reward_prefix
        self.format = replace(self.format, reward_prefix=prefix)
        self._terminator_id = single_token(tokenizer, TERMINATOR)

    # ------------------------------------------------------------ the policy
    @property
    def terminator_id(self) -> int:
        return self._terminator_id

    def mask(self) -> VocabMask:
        return self._mask

    @cached_property
    def _mask(self) -> VocabMask:
        """Once: a pass over the vocabulary takes seconds on a large one, and SFT asks every step."""
        allowed = [i for i in range(len(self.tokenizer))  # a token's text as written mid-rationale: "▁" is " "
                   if (text := self.text([i])) and set(text) <= RATIONALE_CHARACTERS]
        return VocabMask(mode="allow", token_ids=allowed)

    def tool(self) -> Tool:
        return self._calculator

    @cached_property
    def _calculator(self) -> TokenCalculator:
        """Once: finding its trigger tokens is a pass over the vocabulary."""
        return TokenCalculator(self.tokenizer)

    def manifest_fields(self) -> dict[str, Any]:
        fields = super().manifest_fields()
        fields["task_config"]["reward_prefix"] = self.format.reward_prefix  # the resolved text the service reads
        return fields

    # ------------------------------------------------------------ training
    def prompt(self, record: ReasoningRecord) -> Prompt:
        return Prompt(key=record.question, ids=self.encode_prompt(question=record.question),
                      fields={"question": record.question, "answer": record.answer})

    def few_shot(self, shots: int) -> str:
        """The first `shots` labelled rationales as worked examples, one per line."""
        return "".join(f"{r.question}{r.rationale}{self.format.answer_text(r.answer)}\n" for r in self.labelled[:shots])

    def teacher_rollout(self, prompts: list[Prompt], rationales: list[str]) -> Rollout:
        """Given rationales as a rollout, the calculator's values flagged `forced` exactly
        where sampling with the tool would have written them."""
        return Rollout.teacher_forced([p.ids for p in prompts], [self.ids(z) for z in rationales], self.pad_id,
                                      self.tool())

    def sft_pairs(self) -> list[tuple[Prompt, list[int]]]:
        """(question prompt, rationale ids) of the labelled records."""
        return [(self.prompt(r), self.ids(r.rationale)) for r in self.labelled]

    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """log p(policy-written z≤i, Y | P X) for every prefix i (module docstring)."""
        answers = [self.ids(self.format.answer_text(p.fields["answer"])) for p in prompts]
        prefix, suffix = scorer.prefixes_and_suffix(self.as_read(prompts, rollout), answers)
        own = torch.where(rollout.written(), prefix.diff(dim=1), 0.0).cumsum(dim=1)
        return torch.cat([torch.zeros_like(own[:, :1]), own], dim=1) + suffix

    def read_length(self, prompt: Prompt) -> int:
        """The reward reads the few-shot prefix, the question, Z and Y; the evaluation, after Z, the
        answer prompt and the ANSWER_TOKENS the base model may take to state an answer."""
        answer = max(len(self.ids(self.format.answer_text(prompt.fields["answer"]))),
                     len(self.ids(self.format.answer_prompt)) + ANSWER_TOKENS)
        context = self.context_ids(self.format.context(prompt.fields["question"], ""))
        return max(super().read_length(prompt), len(context) + self.config.max_len + answer)

    def as_read(self, prompts: list[Prompt], rollout: Rollout) -> Rollout:
        """The rollout as the reward reads it: after the few-shot prefix and the question."""
        return replace(rollout, prompts=[self.context_ids(self.format.context(p.fields["question"], "")) for p in prompts])

    # ------------------------------------------------------------ evaluation
    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path, samples: int | None = None) -> dict[str, Any]:
        """Accuracy by operand count of the vote (and of the p(Y|XZ)-weighted vote) over N
        sampled rationales per held-out question, and the fraction of single rationales
        whose answer is right."""
        n = samples or self.config.eval_rationales
        questions = [r.question for r in self.eval_records for _ in range(n)]
        rationales: list[str] = []
        for start in range(0, len(questions), 256):
            prompts = [self.encode_prompt(question=q) for q in questions[start:start + 256]]
            rationales += [self.text(z) for z in sample(prompts).latents()]
        answers = read_answers(questions, rationales, self.format, self.completer(scorer))
        weights = answer_log_probs(questions, rationales, answers, self.format, self.log_prob_scorer(scorer))
        metrics = self.accuracy(answers, weights, n)
        series = {key: list(metrics[key].values()) for key in ("accuracy", "accuracy_weighted", "rationale_accuracy")}
        grouped_bars(out_dir / "eval.png", list(metrics["accuracy"]), series,
                     title=f"reasoning: accuracy by operand count ({n} rationales per question)", ylabel="accuracy")
        return metrics

    def accuracy(self, answers: Sequence[int | None], weights: Sequence[float] | None, n: int) -> dict[str, Any]:
        """Metrics of n answers per eval record (in order), by operand count."""
        by_count: dict[str, dict[str, list[float]]] = {}
        for k, record in enumerate(self.eval_records):
            mine = answers[k * n:(k + 1) * n]
            group = by_count.setdefault(str(operand_count(record.question)), {"vote": [], "weighted": [], "single": []})
            group["vote"].append(aggregate(mine).answer == record.answer)
            group["single"].append(sum(a == record.answer for a in mine) / n)
            if weights is not None:
                mine_w = weights[k * n:(k + 1) * n]
                group["weighted"].append(aggregate(mine, mine_w, method="weighted").answer == record.answer)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "accuracy": {c: mean(g["vote"]) for c, g in sorted(by_count.items())},
            "accuracy_weighted": {c: mean(g["weighted"]) for c, g in sorted(by_count.items())},
            "rationale_accuracy": {c: mean(g["single"]) for c, g in sorted(by_count.items())},
            "questions": {c: len(g["vote"]) for c, g in sorted(by_count.items())},
            "rationales": n,
        }

    def completer(self, scorer: Scorer):
        """adapters.reasoning.Complete backed by the base model's greedy decoding."""
        def complete(contexts: list[str]) -> list[str]:
            out = scorer.greedy([self.context_ids(c) for c in contexts], ANSWER_TOKENS)
            return [self.text(ids) for ids in out]
        return complete

    def log_prob_scorer(self, scorer: Scorer):
        """adapters.reasoning.Score backed by the base model."""
        def score(contexts: list[str], continuations: list[str]) -> list[float]:
            return scorer.continuation([self.context_ids(c) for c in contexts],
                                      [self.ids(c) for c in continuations]).tolist()
        return score


def operand_count(question: str) -> int:
    return len(parse_question(question).operands)


# ---------------------------------------------------------------- data
def load_records(config: ReasoningConfig) -> tuple[list[ReasoningRecord], list[ReasoningRecord], list[ReasoningRecord]]:
    """(training, labelled, evaluation) records: a user's data (evaluation: `eval_data`,
    else a stable tenth of `data`) or the demo world's questions; at most `eval_questions`
    evaluation records of each of the `eval_operands` counts, every one of which must have some."""
    if config.data is not None:
        train, held = split_data(config.data, config.eval_data, ReasoningRecord, lambda r: stable_tenth(r.question))
    else:
        train, held = demo_records(config)
        if config.eval_data is not None:
            held = load_jsonl(config.eval_data, ReasoningRecord)
    by_count: dict[int, list[ReasoningRecord]] = {n: [] for n in config.eval_operands}
    for record in held:
        if (n := operand_count(record.question)) in by_count:
            by_count[n].append(record)
    if missing := [n for n, group in by_count.items() if not group]:
        raise DataError(f"task.eval_operands: the evaluation records have no question of {missing[0]} operands; "
                        f"add some, or set task.eval_operands to the counts they have")
    held = [r for _, group in sorted(by_count.items()) for r in group[: config.eval_questions]]
    return train, [r for r in train if r.rationale is not None], held


def demo_records(config: ReasoningConfig) -> tuple[list[ReasoningRecord], list[ReasoningRecord]]:
    """(training, evaluation) questions of the demo world's arithmetic (world.corpus), each list
    distinct: `eval_questions` per evaluation operand count from a stable tenth of the questions,
    none of them in the base model's corpus, then `demo_questions` from the other nine tenths,
    operand counts drawn from `train_operands`, the first `demo_labelled` with a rationale.
    A hash, not the draws, splits them: how many are evaluated does not change the training set."""
    read = corpus.questions()
    held_rng, held_seen = random.Random(f"held {config.seed}"), set()
    held = [_demo_record(held_rng, n, held_seen, False, lambda q: stable_tenth(q) and q not in read, "eval_questions")
            for n in config.eval_operands for _ in range(config.eval_questions)]
    rng, seen = random.Random(f"train {config.seed}"), set()
    train = [_demo_record(rng, rng.choice(config.train_operands), seen, i < config.demo_labelled,
                          lambda q: not stable_tenth(q), "demo_questions") for i in range(config.demo_questions)]
    return train, held


def _demo_record(rng: random.Random, operands: int, seen: set[str], labelled: bool,
                 allowed: Callable[[str], bool], field: str) -> ReasoningRecord:
    """A question not drawn before that `allowed` admits; `field` is the setting to lower when none is left."""
    for _ in range(10000):
        numbers, operators = corpus.random_problem(rng, operands)
        question = corpus.question(numbers, operators)
        if question not in seen and allowed(question):
            break
    else:  # never a repeat, nor a held-out question in training: the split would leak
        raise ValueError(f"task.{field}: no {operands}-operand question is left after {len(seen)} drawn; "
                         f"there are too few distinct ones, lower task.{field}")
    seen.add(question)
    rationale, value = corpus.rationale(numbers, operators)
    return ReasoningRecord(question=question, answer=value, rationale=rationale if labelled else None)
