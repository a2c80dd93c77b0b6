"""Request and response bodies of the API (they make its OpenAPI page)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from adapters.manifest import Text
from adapters.store import MAX_VERSION, AdapterName, AdapterRef
from service.engines.base import Sample


class _Body(BaseModel):
    """Strict: "n": "2" or "n": true is a client's mistake to name, not a number to guess."""

    model_config = ConfigDict(extra="forbid", strict=True)


MIN_TEMPERATURE = 0.01
"""Below it float32 logits overflow to NaN (vLLM clamps there too)."""
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=2, allow_inf_nan=False, description="1 samples the trained posterior "
                                    "(vLLM takes at most 2)")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="sample i uses seed + i, modulo 2^32 (the CPU's "
                                                               "generator keeps 32 bits): reproducible samples")]
Word = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^,\n]+$")]
"""One keyword: words are joined with ", " into the prompt, so none may be empty or hold a comma."""

Version = Annotated[int, Field(ge=1, le=MAX_VERSION)]


class _Drawing(_Body):
    """How every endpoint draws from an adapter."""

    adapter: AdapterRef | None = Field(None, description="'name' (its newest loaded version) or 'name@vN'; "
                                                         "default: the endpoint's task adapter")
    max_tokens: int | None = Field(None, ge=1, description="forced stop; default and maximum: the adapter's max_len")
    temperature: Temperature = 1.0
    seed: Seed | None = None


class Sampling(_Drawing):
    n: int = Field(1, ge=1, description="samples; at most the service's max_n")


class InfillRequest(Sampling):
    prefix: Text = Field(description="the beginning X", examples=["Tom went to the market. He was hungry."])
    suffix: Text = Field(description="the ending Y", examples=["He ate it on the way home."])
    score: bool = Field(False, description="also return the base model's log p(Z Y | X) of the story 'X Z Y'")


class GenerateRequest(Sampling):
    keywords: list[Word] | None = Field(None, min_length=1, max_length=16, description="words the text should "
                                        "include (constrained adapters)", examples=[["cat", "garden"]])
    avoid: list[Word] | None = Field(None, max_length=16, description="words the text should avoid (constrained "
                                     "adapters; [] for none, as training data without words to avoid reads)")
    text: Text | None = Field(None, description="text to continue (continuation adapters)")

    @field_validator("keywords")
    @classmethod
    def _once_each(cls, keywords: list[str] | None) -> list[str] | None:
        """A repeated keyword would stack its bias."""
        lowered = [w.lower() for w in keywords or []]
        if len(set(lowered)) < len(lowered):
            raise ValueError("a word is given twice")
        return keywords

    @field_validator("avoid")
    @classmethod
    def _not_a_keyword(cls, avoid: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """A keyword also avoided would be barred (keywords, declared first, are validated by now)."""
        keywords = {w.lower() for w in info.data.get("keywords") or []}
        if both := sorted({w.lower() for w in avoid or []} & keywords):
            raise ValueError(f"{both} also in keywords")
        return avoid


class ReasonRequest(_Drawing):
    question: str = Field(max_length=200, description="'Question: 6 - 0 - 4 = ? Answer:' or just '6 - 0 - 4'",
                          examples=["6 - 0 - 4 - 8"])
    n_rationales: int = Field(10, ge=1, description="rationales sampled (or taken from the cache)")
    aggregate: Literal["vote", "weighted"] = Field("vote", description="majority, or weighted by log p(Y | X Z)")


class SampleOut(BaseModel):
    text: str
    token_ids: list[int] = Field(description="the latent Z, as sampled (tool tokens included, terminator not)")
    log_q: float = Field(description="log-probability of Z and its stop under the distribution sampled from")
    stopped: bool = Field(description="ended with the terminator; false: cut at max_tokens (at the adapter's "
                                      "max_len the policy must stop, so such a sample is whole; log_q counts that)")
    log_p: float | None = Field(None, description="with score: the base model's log p(Z Y | X)")

    @classmethod
    def of(cls, sample: Sample, text: str, log_p: float | None = None) -> SampleOut:
        return cls(text=text, token_ids=sample.token_ids, log_q=sample.log_q, stopped=sample.stopped, log_p=log_p)


class SamplesResponse(BaseModel):
    adapter: str = Field(description="the version that served the request")
    samples: list[SampleOut]


class Step(BaseModel):
    expression: str
    value: int | None = Field(description="what the calculator wrote; null for a malformed step")


class Rationale(BaseModel):
    text: str
    steps: list[Step]
    answer: int | None = Field(description="the calculator's last value where the rationale ends with one, else "
                                            "the base model's greedy answer after it; null if it gave none")
    log_q: float
    log_p_answer: float | None = Field(description="base log p(Y | X Z) of the answer read")


class ReasonResponse(BaseModel):
    adapter: str
    question: str
    answer: int | None
    distribution: dict[int, float] = Field(description="answer -> share of the vote (or of the weight)")
    counts: dict[int, int]
    rationales: list[Rationale]
    cached: int = Field(description="how many of the rationales came from the cache")


class LoadRequest(_Body):
    name: AdapterName
    version: Version | None = Field(None, description="default: the newest stored version")
    pin: bool | None = Field(None, description="true: keep it loaded when a newer version arrives; false: unpin "
                             "(a version no longer routed to then retires once idle); default: a loaded version's "
                             "pin as it is, a new one unpinned")


class AdapterOut(BaseModel):
    ref: str
    name: str
    version: int
    task: str
    rank: int
    created_at: str
    routed: bool = Field(description="requests naming just the name go to this version")
    pinned: bool
    retiring: bool = Field(description="finishing its in-flight requests before it is unloaded")
    in_flight: int


class AdaptersResponse(BaseModel):
    loaded: list[AdapterOut]
    refused: dict[str, str] = Field(description="adapter versions that failed to load, at start or when "
                                                "they arrived, with the reason; not retried until loaded by hand")
