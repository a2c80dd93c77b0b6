from __future__ import annotations

from fastapi import APIRouter, Request

from adapters.reasoning import ANSWER_TOKENS, AnswerFormat, aggregate, parse_question
from service.cache import RationaleCache
from service.deps import State, check_caps, check_context, check_endpoint, guarded
from service.errors import invalid
from service.policy import check_max_tokens, gen_request, render
from service.reasoning import sample_rationales
from service.routes.strict import StrictRoute
from service.schemas import ReasonRequest, ReasonResponse

router = APIRouter(tags=["reasoning"], route_class=StrictRoute)


@router.post("/reason", response_model=ReasonResponse)
async def reason(body: ReasonRequest, request: Request, state: State) -> ReasonResponse:
    """Answers an arithmetic question: samples rationales Z ~ q(Z | X) with the calculator, reads
    each one's answer (its last calculator value, else the base model's completion), and votes (or
    weights votes by log p(Y | X Z)).
    Rationales are cached per adapter version, question and sampling settings: a repeated
    question is answered from the pool, topped up when it holds fewer than asked."""
    n = body.n_rationales
    check_caps(state.settings, "n_rationales", n, body.max_tokens, {"question": body.question})
    try:
        question = parse_question(body.question).text
    except ValueError as error:
        raise invalid("question", str(error), body.question) from error
    with state.registry.use(body.adapter, "reasoning") as entry:
        manifest, config = entry.manifest, entry.manifest.task_config
        request.state.adapter = manifest.name
        check_endpoint(manifest, "/reason")
        if "answer_prompt" not in config:
            raise invalid("adapter", f"adapter {manifest.ref} holds no answer prompt: train it again to serve it")
        check_max_tokens(manifest, body.max_tokens, state.settings.max_tokens)  # before the cache counts a lookup
        sampling = body.model_dump(include={"temperature", "max_tokens", "seed"})
        key = RationaleCache.key(manifest, question, sampling, f"{state.engine.name} {state.engine.dtype}")
        pool = await state.cache.take(key, n, manifest.name)
        cached = len(pool)
        if cached < n:
            prompt = state.encode_context(render(manifest, {"question": question}), manifest)
            tool = state.calculator if config.get("tool") == "calculator" else None
            seed = None if body.seed is None else body.seed + cached  # a pool grown in steps = one drawn at once
            generation = gen_request(manifest, prompt, n - cached, body.temperature, seed, body.max_tokens,
                                     state.settings.max_tokens, tool)
            answer_format = AnswerFormat.of(config)  # the base model reads the answer after this
            reading = len(state.encode(answer_format.reward_prefix + answer_format.answer_prompt)) + ANSWER_TOKENS
            check_context(state, {"question": question}, len(prompt) + reading, generation.max_tokens)
            fresh = await guarded(request, sample_rationales(state, request, manifest, question, generation),
                                  state.settings.request_timeout_s)
            await state.cache.add(key, fresh, after=cached)
            pool += fresh
    weights = [r.log_p_answer or 0.0 for r in pool]  # unread answers have none; aggregate skips them
    result = aggregate([r.answer for r in pool], weights, body.aggregate)
    return ReasonResponse(adapter=manifest.ref, question=question, answer=result.answer,
                          distribution=result.distribution, counts=result.counts, rationales=pool, cached=cached)
