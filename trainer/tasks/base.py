"""What a task is: a prompt set, a reward over every prefix, the policy's masks and limits,
and an evaluation. The trainer knows nothing else about a task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, ClassVar, Protocol

import torch
from pydantic import ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from adapters.manifest import VocabMask, WordBias, word_bias
from adapters.models import context_ids, document_prefix, pad_id, piece_ids, piece_text
from jobs.rules import Ruled, pattern, rules
from trainer.policy import PolicySpec
from trainer.rollout import Rollout, Tool
from trainer.scoring import Scorer


class Sampler(Protocol):
    """Draws one latent per prompt from a policy (the adapter, or the base model); `bias` is
    each prompt's word bias (Prompt.bias) where the task has one."""

    def __call__(self, prompts: list[list[int]], bias: list[dict[int, float]] | None = None) -> Rollout: ...


@dataclass(frozen=True)
class Prompt:
    """One conditioning input: `key` names it in the replay buffer, `fields` are its record's values
    that the reward and the checks read, `bias` is the policy's logit bias for it (Task.prompt_bias)."""

    key: str
    ids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)
    bias: dict[int, float] = field(default_factory=dict)


def single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of `text`, which the tokenizer must spell with one token (e.g. a terminator)."""
    ids = piece_ids(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer spells {text!r} with {len(ids)} tokens; it must be one")
    return ids[0]


def check_template(template: str, fields: Sequence[str], required: Sequence[str] = ()) -> str:
    """`template` if its only placeholders are `{name}` of `fields` and it has every one of `required`:
    str.format fails on any other (KeyError, IndexError) only once the model has loaded."""
    try:
        parts = list(Formatter().parse(template))
    except ValueError as error:  # a lone { or }
        raise ValueError(f"{error}; write {{{{ or }}}} for a literal brace") from None
    allowed = ", ".join(f"{{{name}}}" for name in fields)
    for _, name, spec, conversion in parts:
        if name is not None and (name not in fields or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"placeholder {shown} is not one this task fills (it fills {allowed}; "
                             f"write {{{{ or }}}} for a literal brace)")
    named = {name for _, name, _, _ in parts}
    if missing := [name for name in required if name not in named]:
        raise ValueError(f"the template must contain {{{missing[0]}}}")
    return template


def template_pattern(fields: Sequence[str]) -> dict[str, str]:
    """check_template's rule as a JSON-schema pattern, so the service refuses a bad template at submit."""
    names = "|".join(fields)
    placeholders = ", ".join(f"{{{name}}}" for name in fields)
    return pattern(rf"^(?:[^{{}}]|\{{\{{|\}}\}}|\{{(?:{names})\}})*$",
                   f"its only placeholders may be {placeholders} (write {{{{ or }}}} for a literal brace)")


MinLen = Annotated[int, Field(ge=0, description="tokens before the sample may stop")]
MaxLen = Annotated[int, Field(ge=1, le=4096, description="tokens at most")]
EvalPrompts = Annotated[int, Field(gt=0, description="the prompts evaluated: the first this many evaluation records")]


class TaskConfig(Ruled):
    """Fields every task config has; each task adds its own."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra=rules(ordered=[("min_len", "max_len")]))

    name: str
    min_len: MinLen = 1
    max_len: MaxLen = 20
    stop_after: list[str] = Field([], description="one-token texts after which the sample may end, e.g. ['.'] for "
                                                  "whole sentences; empty: after any token")


class Task(ABC):
    """Subclasses set `name`, `config_type` and `prompt_template`, and implement the rest."""

    name: ClassVar[str]
    config_type: ClassVar[type[TaskConfig]]
    prompt_template: str

    def __init__(self, config: TaskConfig, tokenizer: PreTrainedTokenizerBase):
        self.config, self.tokenizer = config, tokenizer
        self.document_prefix, self.pad_id = document_prefix(tokenizer), pad_id(tokenizer)

    # ------------------------------------------------------------ the policy
    @property
    def terminator_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def terminator(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.terminator_id)

    def mask(self) -> VocabMask:
        return VocabMask()

    def word_biases(self) -> list[WordBias]:
        return []

    def stop_after(self) -> frozenset[int]:
        """The tokens after which the policy may stop; empty: after any."""
        return frozenset(single_token(self.tokenizer, text) for text in self.config.stop_after)

    def prompt_bias(self, words: Mapping[str, Sequence[str]]) -> dict[int, float]:
        return word_bias(self.word_biases(), words, self.tokenizer, self.terminator_id)

    def spec(self) -> PolicySpec:
        return PolicySpec(self.terminator_id, self.config.min_len, self.config.max_len, self.mask(), self.stop_after())

    def tool(self) -> Tool | None:
        return None

    def encode_prompt(self, **fields: Any) -> list[int]:
        return self.context_ids(self.prompt_template.format(**fields))

    def context_ids(self, text: str) -> list[int]:
        """Token ids of a text the model reads from its start: the tokenizer's document prefix
        (a BOS, for models trained with one), then the text."""
        return context_ids(self.tokenizer, text, self.document_prefix)

    def text(self, ids: Sequence[int]) -> str:
        """The text of a piece's ids (a latent), as it reads after what it continues."""
        return piece_text(self.tokenizer, ids)

    def ids(self, text: str) -> list[int]:
        """Token ids of a piece of text as it continues other text: pieces are joined id-wise."""
        return piece_ids(self.tokenizer, text)

    def read_length(self, prompt: Prompt) -> int:
        """The most tokens the base model reads at once for this prompt: the prompt, max_len
        tokens and the stop. Tasks whose reward reads another context widen it."""
        return len(prompt.ids) + self.config.max_len + 1

    def train_prompts(self) -> list[Prompt]:
        """The prompts training draws from: those of the training records (a task without records
        has its own)."""
        return [self.prompt(r) for r in self.records]

    def eval_prompts(self) -> list[Prompt]:
        """The prompts of the held-out records (none for tasks without records)."""
        return [self.prompt(r) for r in self.eval_records]

    records: Sequence[Any] = ()  # the training records
    eval_records: Sequence[Any] = ()  # the held-out records; a task without records has none

    # ------------------------------------------------------------ what subclasses define
    @abstractmethod
    def prompt(self, record: Any) -> Prompt:
        """The prompt of one record (of a task without records: its one prompt)."""

    @abstractmethod
    def log_rewards(self, scorer: Scorer, prompts: list[Prompt], rollout: Rollout) -> torch.Tensor:
        """Untempered log R(z1..zi ⊤) for every prefix i of every sample: [B, L+1]."""

    @abstractmethod
    def evaluate(self, sample: Sampler, scorer: Scorer, out_dir: Path) -> dict[str, Any]:
        """Metrics of a sampler (and a PNG in out_dir); `sample` draws one latent per prompt."""

    def manifest_fields(self) -> dict[str, Any]:
        """What the service needs to serve this task the way it was trained."""
        return {
            "task": self.name,
            "task_config": self.config.model_dump(),
            "prompt_template": self.prompt_template,
            "document_prefix": self.document_prefix,
            "terminator": self.terminator,
            "terminator_id": self.terminator_id,
            "min_len": self.config.min_len,
            "max_len": self.config.max_len,
            "mask": self.mask().model_dump(),
            "word_biases": [b.model_dump() for b in self.word_biases()],
            "stop_after": sorted(self.stop_after()),
        }
