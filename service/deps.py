"""What the routes share: the service state, admission, caps, and guarded engine work."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Request
from transformers import PreTrainedTokenizerBase

from adapters.manifest import Manifest, biased_tokens, word_bias
from adapters.models import special_token_in
from service.engines.base import GenRequest, Sample
from service.errors import ClientDisconnected, invalid
from service.policy import gen_request, render
from service.schemas import SampleOut, Sampling, SamplesResponse
from service.settings import Settings
from service.state import ServiceState

T = TypeVar("T")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]

async def admit(state: State) -> AsyncIterator[None]:
    """Count the request in flight, or answer 429 above GFN_MAX_IN_FLIGHT."""
    cap = state.settings.max_in_flight
    if state.in_flight >= cap:
        raise HTTPException(429, f"{cap} requests are in flight (GFN_MAX_IN_FLIGHT); retry shortly",
                            headers={"Retry-After": "1"})
    state.in_flight += 1
    try:
        yield
    finally:
        state.in_flight -= 1


def check_caps(settings: Settings, n_field: str, n: int, max_tokens: int | None, texts: dict[str, str]) -> None:
    """The service's caps on sample count, length and prompt size, each error naming its field."""
    if n > settings.max_n:
        raise invalid(n_field, f"{n_field} is {n}; at most {settings.max_n} (GFN_MAX_N)", n)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise invalid("max_tokens", f"max_tokens is {max_tokens}; at most {settings.max_tokens} (GFN_MAX_TOKENS)",
                      max_tokens)
    total = sum(len(text) for text in texts.values())
    if total > settings.max_prompt_chars:
        longest = _longest(texts)
        raise invalid(longest, f"the prompt text is {total} characters; at most {settings.max_prompt_chars} "
                               "(GFN_MAX_PROMPT_CHARS)", texts[longest])


def check_context(state: ServiceState, texts: dict[str, str], prompt_tokens: int, sampled_tokens: int) -> None:
    """The prompt and the samples must fit the model's context; the error names the longest text field."""
    limit = state.engine.max_model_len
    if prompt_tokens + sampled_tokens > limit:
        longest = _longest(texts)
        raise invalid(longest, f"the prompt is {prompt_tokens} tokens; with {sampled_tokens} more to sample it "
                               f"exceeds the model's context of {limit} tokens", texts.get(longest))


def _longest(texts: dict[str, str]) -> str:
    """The field to blame for a prompt that is too long."""
    return max(texts, key=lambda name: len(texts[name]), default="adapter")


async def guarded(request: Request, work: Awaitable[T], timeout_s: float) -> T:
    """Await a request's engine work; cancel it (which aborts its engine requests) when the
    client disconnects or ``timeout_s`` passes."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if gone in done:
            raise ClientDisconnected("the client went away; its engine requests were aborted")
        raise TimeoutError(f"the request did not finish within {timeout_s:g} s (GFN_REQUEST_TIMEOUT_S)")
    finally:
        gone.cancel()
        task.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: receive yields only that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


Scoring = Callable[[Manifest, Sample], tuple[list[int], list[int]]]
"""(context, continuation) whose base log-probability is a sample's ``log_p`` (the manifest: the
adapter's, for its document prefix)."""


async def serve_samples(request: Request, state: ServiceState, body: Sampling, task: str,
                        fields: dict[str, str | None], scoring: Scoring | None = None,
                        words: dict[str, list[str]] | None = None) -> SamplesResponse:
    """The flow of a sampling endpoint: caps, adapter (held while in use), prompt, samples, scores.
    ``words``: the word lists behind ``fields``, for the adapter's word bias."""
    texts = {k: v for k, v in fields.items() if v}
    check_caps(state.settings, "n", body.n, body.max_tokens, texts)
    check_special_tokens(state.tokenizer, texts)
    with state.registry.use(body.adapter, task) as entry:
        manifest = entry.manifest
        request.state.adapter = manifest.name
        check_endpoint(manifest, request.scope["route"].path)
        rendered = render(manifest, fields)
        if not rendered:
            raise invalid(_longest(texts), f"adapter {manifest.ref}'s prompt is empty with these fields")
        prompt = state.encode_context(rendered, manifest)
        check_words(manifest, words or {}, state.tokenizer)
        bias = word_bias(manifest.word_biases, words or {}, state.tokenizer, manifest.terminator_id)
        generation = gen_request(manifest, prompt, body.n, body.temperature, body.seed, body.max_tokens,
                                 state.settings.max_tokens, bias=bias)
        check_context(state, texts, len(prompt), generation.max_tokens)
        scores = functools.partial(scoring, manifest) if scoring else None
        return await guarded(request, _samples(request, state, generation, scores), state.settings.request_timeout_s)


ENDPOINTS = {"infill": "/infill", "reasoning": "/reason"}
"""The tasks with an endpoint of their own; /generate serves the others (constrained, continuation, rng)."""


def check_endpoint(manifest: Manifest, endpoint: str) -> None:
    """An adapter answers on its task's endpoint: elsewhere the request's fields are not its prompt's,
    and the error blamed a field (an rng adapter on /infill "does not take 'prefix'")."""
    home = ENDPOINTS.get(manifest.task, "/generate")
    if endpoint != home:
        raise invalid("adapter", f"adapter {manifest.ref} is a {manifest.task} adapter: POST {home} serves it",
                      manifest.ref)


def check_special_tokens(tokenizer: PreTrainedTokenizerBase, texts: dict[str, str]) -> None:
    """A client's text is text: a special token spelled in it ("<|endoftext|>", Llama-2's "<s>") would
    be read as the control token itself, a document's end or the adapter's terminator, so it is refused."""
    for field, text in texts.items():
        if found := special_token_in(tokenizer, text):
            raise invalid(field, f"holds {found!r}, the tokenizer's special token: it would be read as that "
                                 "token, not as text", text)


def check_words(manifest: Manifest, words: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a word the adapter's bias would misapply (adapters.manifest.word_tokens): one that starts
    with bare whitespace (" 5" in a tokenizer that splits digits off: banning " " bans every space), and
    one whose token a word of the opposite sign also claims (avoiding "cats" or "Cats" beside "cat")."""
    claimed: dict[int, tuple[str, float]] = {}
    for rule, word, token in biased_tokens(manifest.word_biases, words, tokenizer, manifest.terminator_id):
        if not tokenizer.decode([token]).strip():
            raise invalid(rule.field, f"{word!r} cannot be biased by adapter {manifest.ref}: after a space the "
                                      f"tokenizer spells it with a bare whitespace token first (none joins a space "
                                      f"to {word[:1]!r}), and a bias on that token acts on every word; give a word "
                                      "that starts with a letter the tokenizer joins to a space", word)
        other = claimed.setdefault(token, (word, rule.bias))
        if (other[1] > 0) != (rule.bias > 0):
            raise invalid(rule.field, f"{word!r} and {other[0]!r} start with the same token, which adapter "
                                      f"{manifest.ref} would both favour and ban", word)


async def _samples(request: Request, state: ServiceState, generation: GenRequest,
                   scoring: Callable[[Sample], tuple[list[int], list[int]]] | None) -> SamplesResponse:
    samples = (await state.sample(request, generation)).samples
    log_p: list[float | None] = [None] * len(samples)
    if scoring is not None:
        contexts, continuations = zip(*(scoring(s) for s in samples))
        log_p = list(await state.engine.score(list(contexts), list(continuations)))
    return SamplesResponse(adapter=generation.adapter or "",
                           samples=[SampleOut.of(s, state.decode(s.token_ids), p) for s, p in zip(samples, log_p)])
