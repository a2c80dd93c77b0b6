"""The adapter manifest: everything the service needs to serve an adapter the way it was trained."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

if TYPE_CHECKING:
    import torch


def format_ref(name: str, version: int) -> str:
    """The serving name of one version, ``name@vN`` (adapters.store.parse_ref reads it)."""
    return f"{name}@v{version}"


def _has_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must hold text, not only whitespace")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_has_text)]
"""Text a prompt template is filled with, in training data and requests alike: blank text gives
the model nothing to condition on, a mistake to name."""


class _Strict(BaseModel):
    """Rejects unknown fields: a typo in a manifest must fail loudly, not be dropped."""

    model_config = ConfigDict(extra="forbid")


class VocabMask(_Strict):
    """Logit penalty on part of the vocabulary.

    It is part of the policy: training rollouts, the loss's log-probs and serving must add
    the same bias, or the served distribution is not the one that was trained.
    """

    mode: Literal["none", "allow", "deny"] = "none"
    token_ids: list[NonNegativeInt] = []
    penalty: float = -99.0

    def key(self, terminator_id: int) -> tuple[Any, ...]:
        """What an engine's cache of this mask (as a bias, or as its own parameters) is keyed by."""
        return self.mode, tuple(self.token_ids), self.penalty, terminator_id

    def bias(self, vocab_size: int, terminator_id: int) -> torch.Tensor:
        """Float32 vector to add to logits: ``penalty`` on masked ids, 0 elsewhere.

        ``deny`` masks the listed ids, ``allow`` every id not listed. The terminator is never
        masked, because every state must be able to stop.
        """
        import torch  # local: listing adapters should not pay for importing torch

        bias = torch.zeros(vocab_size, dtype=torch.float32)
        if self.mode == "none":
            return bias
        if self.token_ids and max(self.token_ids) >= vocab_size:
            raise ValueError(
                f"mask token id {max(self.token_ids)} is outside the vocabulary of size {vocab_size}"
            )
        listed = torch.zeros(vocab_size, dtype=torch.bool)
        listed[self.token_ids] = True
        masked = listed if self.mode == "deny" else ~listed
        masked[terminator_id] = False
        bias[masked] = self.penalty
        return bias


class WordBias(_Strict):
    """A logit bias on the words a prompt field lists: +8 on a constrained sentence's keywords
    draws the policy to them, -99 on its words to avoid bans them. It conditions the policy on
    the prompt where a small model could not learn to copy, and like the mask it is part of the
    policy: training rollouts, the loss's log-probs and serving add the same bias."""

    field: str
    bias: float


def word_bias(biases: Sequence[WordBias], words: Mapping[str, Sequence[str]], tokenizer: Any,
              terminator_id: int) -> dict[int, float]:
    """Token id -> logit bias for a prompt's word lists (field -> words)."""
    bias: dict[int, float] = {}
    for rule, _, token in biased_tokens(biases, words, tokenizer, terminator_id):
        bias[token] = bias.get(token, 0.0) + rule.bias
    return bias


def biased_tokens(biases: Sequence[WordBias], words: Mapping[str, Sequence[str]], tokenizer: Any,
                  terminator_id: int) -> Iterator[tuple[WordBias, str, int]]:
    """(rule, word, token) for each token a rule's bias acts on, for each of its field's words."""
    for rule in biases:
        for word in words.get(rule.field, ()):
            for token in word_tokens(tokenizer, word, terminator_id):
                yield rule, word, token


def word_tokens(tokenizer: Any, word: str, terminator_id: int) -> list[int]:
    """The tokens a word's bias acts on: the first token of " word" (a sentence's words follow a
    space; a word of several tokens is biased by its first), and " Word" where that is one token.
    Never the terminator: every state can stop."""
    from adapters.models import piece_ids  # imports transformers: only once a bias is asked for

    capital = piece_ids(tokenizer, f" {word[:1].upper()}{word[1:]}")
    return sorted({piece_ids(tokenizer, f" {word}")[0], *(capital if len(capital) == 1 else [])} - {terminator_id})


class LoraSpec(_Strict):
    """LoRA hyper-parameters; the service must know target modules to configure its engine."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = 0.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


Dtype = Literal["float32", "bfloat16", "float16"]
"""The dtype a base model's weights and activations run in; a LoRA's own weights stay float32."""


class BaseModelRef(_Strict):
    """The base model the adapter was trained on: ``fingerprint`` is checked, ``path`` a hint."""

    path: str
    fingerprint: str
    dtype: Dtype = Field("float32", description="the dtype training ran the base model in; served in another, "
                                                "its log-probs differ from training's by that dtype's rounding")
    tokenizer: str | None = Field(None, description="adapters.models.tokenizer_digest of its tokenizer; checked "
                                                    "where recorded (manifests from before it have none)")


class Manifest(_Strict):
    """One stored adapter version (``manifest.json``), the contract between trainer and service."""

    format_version: int = 1
    name: str
    version: PositiveInt
    task: str
    task_config: dict[str, Any]
    prompt_template: str
    document_prefix: list[NonNegativeInt] = Field([], description="token ids before every context the model read "
                                                   "from its start in training (the tokenizer's BOS, if any): the "
                                                   "prompt, and the contexts the reward scored")
    terminator: str
    terminator_id: NonNegativeInt
    min_len: NonNegativeInt
    max_len: PositiveInt
    mask: VocabMask
    word_biases: list[WordBias] = []
    stop_after: list[NonNegativeInt] = Field([], description="token ids after which the terminator is allowed; "
                                                              "empty: after any token")
    base_model: BaseModelRef
    lora: LoraSpec
    training: dict[str, Any]
    metrics: dict[str, Any]
    created_at: str = Field(description="ISO 8601, UTC")
    job_id: str | None = Field(None, description="the training job (or CLI run) that saved it: a retried or "
                                                 "re-run one gets this version back instead of a second one")
    files: dict[str, str] = Field(description="relative POSIX path -> sha256 hex, not manifest.json")

    @property
    def ref(self) -> str:
        """Serving name ``name@vN``: a version's weights never change, so a ref means one adapter."""
        return format_ref(self.name, self.version)
