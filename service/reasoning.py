"""Reasoning with a calculator: sample rationales, then read and weigh each one's answer.

A rationale Z is sampled from the reasoning adapter; whenever its text ends with a step
"a op b =", the calculator (adapters.calculator.TokenCalculator, as in training) writes the value. Answers
are read and weighted by adapters.reasoning (``read_answers``, ``answer_log_probs``), the code
the trainer's evaluation runs, with the base model reached through this engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from fastapi import Request

from adapters.manifest import Manifest
from adapters.reasoning import ANSWER_TOKENS, AnswerFormat, answer_log_probs, read_answers, steps
from service.engines.base import BASE, GenRequest
from service.schemas import Rationale, Step

if TYPE_CHECKING:
    from service.state import ServiceState


async def sample_rationales(state: ServiceState, request: Request, manifest: Manifest, question: str,
                            generation: GenRequest) -> list[Rationale]:
    """``generation.n`` rationales with their calculator steps, the answer read and its log p(Y | X Z)."""
    result = await state.sample(request, generation)
    texts = [state.decode(s.token_ids) for s in result.samples]
    answer_format = AnswerFormat.of(manifest.task_config)
    prompts, bridge = [question] * len(texts), _Bridge()
    try:
        answers = await asyncio.to_thread(read_answers, prompts, texts, answer_format, bridge(_completer(state, manifest)))
        weights = await asyncio.to_thread(answer_log_probs, prompts, texts, answers, answer_format,
                                          bridge(_scorer(state, manifest)))
    finally:  # on a timeout or a disconnect, stop the engine work the worker thread waits on
        bridge.close()
    return [Rationale(text=text, steps=[Step(expression=e, value=v) for e, v in steps(text)], answer=answer,
                      log_q=sample.log_q, log_p_answer=weight if answer is not None else None)
            for text, sample, answer, weight in zip(texts, result.samples, answers, weights)]


def _completer(state: ServiceState, manifest: Manifest) -> Callable[[list[str]], Awaitable[list[str]]]:
    async def complete(contexts: list[str]) -> list[str]:
        reads = await state.engine.generate([GenRequest(state.encode_context(c, manifest), BASE, state.tokenizer.eos_token_id,
                                                        ANSWER_TOKENS, temperature=0) for c in contexts])
        return [state.decode(read.samples[0].token_ids) for read in reads]
    return complete


def _scorer(state: ServiceState, manifest: Manifest) -> Callable[[list[str], list[str]], Awaitable[list[float]]]:
    async def score(contexts: list[str], continuations: list[str]) -> list[float]:
        return await state.engine.score([state.encode_context(c, manifest) for c in contexts],
                                        [state.encode(c) for c in continuations])
    return score


class _Bridge:
    """adapters.reasoning calls the base model synchronously: from a worker thread, each call
    runs on the event loop and the thread waits for it. Closing the bridge cancels the calls
    in flight (their engine requests are aborted) and refuses new ones, so a request that
    ended leaves no work behind."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.running: set[Future] = set()
        self.closed = False

    def __call__(self, function: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if self.closed:
                raise asyncio.CancelledError
            future = asyncio.run_coroutine_threadsafe(function(*args), self.loop)
            self.running.add(future)
            if self.closed:  # closed between the check and the add
                future.cancel()
            try:
                return future.result()
            finally:
                self.running.discard(future)
        return call

    def close(self) -> None:
        self.closed = True
        for future in list(self.running):
            future.cancel()
