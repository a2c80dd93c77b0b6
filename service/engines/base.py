"""The one interface every inference engine implements.

A request names the adapter version (``name@vN``, or None for the base model) and carries
the policy of its manifest: terminator, length limits, vocabulary mask and the prompt's word
bias. Engines sample exactly the distribution training used: the latent is the prompt ids
followed by sampled ids (never re-tokenised), no stop before ``min_tokens``, a forced stop at
``max_tokens``, the mask's penalty and the word bias added to the logits, the temperature
applied after them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from adapters.manifest import Dtype, VocabMask
from adapters.store import LoadedAdapter

BASE = None
"""The adapter of a request that runs on the base model alone."""


class Tool(Protocol):
    """Writes tokens into a sample, e.g. the calculator's value after "6 - 4 =".

    Called with the latent's tokens so far right after a sampled token in ``triggers``;
    what it returns is fed to the model as if sampled, at no cost in log q.
    """

    triggers: frozenset[int]

    def __call__(self, tokens: list[int]) -> list[int] | None: ...


@dataclass(frozen=True)
class GenRequest:
    """``n`` samples of one prompt; sample ``i`` of a seeded request uses seed ``seed + i``."""

    prompt_ids: list[int]
    adapter: str | None
    terminator_id: int
    max_tokens: int
    min_tokens: int = 0
    mask: VocabMask = field(default_factory=VocabMask)
    bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> logit bias: the prompt's word bias (adapters.manifest.word_bias)."""
    n: int = 1
    temperature: float = 1.0
    """0 means greedy."""
    seed: int | None = None
    tool: Tool | None = None
    stop_after: frozenset[int] = frozenset()
    """The terminator may come only right after one of these tokens (empty: after any)."""

    def may_stop(self, tokens: list[int]) -> bool:
        """The policy's stop rules after the latent ``tokens``: not before min_tokens, and only
        right after a stop_after token (trainer.policy.PolicySpec.barred)."""
        after = self.stop_after
        return len(tokens) >= self.min_tokens and (not after or bool(tokens) and tokens[-1] in after)


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    """The latent, tool tokens included, terminator excluded."""
    log_q: float
    """log-probability of the latent and its stop under the distribution it was drawn from."""
    stopped: bool
    """Ended with the terminator (else forced to stop at max_tokens)."""


@dataclass(frozen=True)
class GenResult:
    samples: list[Sample]
    queue_s: float
    """Time the request waited before the engine started on it."""


class EngineStopped(RuntimeError):
    """The engine serves no more (it crashed, or was stopped): every call fails with why."""


class Engine(ABC):
    """Samples from many adapters on one base model, and scores with the base model."""

    name: ClassVar[str]
    dtype: Dtype
    """The base model's weights and activations."""
    max_model_len: int
    """Tokens of context the model takes (prompt and samples); set by start()."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        """Make ``adapter.manifest.ref`` servable; raise AdapterRefused if this engine cannot."""

    @abstractmethod
    async def remove_adapter(self, ref: str) -> None:
        """Free an adapter no request uses any more."""

    @abstractmethod
    async def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Samples for each request; cancelling the call aborts its requests."""

    @abstractmethod
    async def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Base-model log p(continuation | context) for each pair (contexts are non-empty)."""

    @property
    @abstractmethod
    def alive(self) -> bool:
        """The engine can still serve (it has not crashed)."""

    @property
    @abstractmethod
    def running(self) -> int:
        """Requests being computed now."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests queued in front of the engine."""
