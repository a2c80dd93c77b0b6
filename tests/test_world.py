"""The demo world: a deterministic corpus that keeps held-out stories out of training, a
lossless tokenizer, and a base model that loads in transformers and vLLM alike and has
learned the world's formats (the tasks' rewards rely on all of it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from adapters.manifest import VocabMask
from adapters.models import load_causal_lm, load_tokenizer
from trainer.policy import PolicySpec
from trainer.rollout import sample
from trainer.tasks.rng import NUMBER
from world import stories
from world.corpus import RNG_PROMPT, CorpusConfig, documents, sections

BEGINNING = re.compile(r"[A-Z][a-z]+ lived in [^.]+\. Every morning [^.]+\. One day [^.]+\.")
CALCULATOR_STEP = re.compile(r" -?\d+ [+-] \d+ =")  # a step may start from a negative value


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path):
    return load_tokenizer(demo_model)


@pytest.fixture(scope="module")
def model(demo_model: Path):
    return load_causal_lm(demo_model)


def corpus_bytes(config: CorpusConfig) -> bytes:
    return "\n".join(documents(config)).encode()


def test_corpus_is_deterministic_per_seed() -> None:
    assert corpus_bytes(CorpusConfig()) == corpus_bytes(CorpusConfig())
    assert corpus_bytes(CorpusConfig()) != corpus_bytes(CorpusConfig(seed=1))


@pytest.mark.parametrize("heldout", [False, True])
def test_every_section_has_lines(heldout: bool) -> None:
    for name, lines in sections(CorpusConfig(), heldout=heldout).items():
        assert lines and all(line.strip() for line in lines), name


def test_heldout_story_frames_never_appear_in_training() -> None:
    heldout = {f.beginning for f in stories.all_frames() if stories.is_heldout(f)}
    trained = {m for line in documents(CorpusConfig()) for m in BEGINNING.findall(line)}
    evaluated = {m for lines in sections(CorpusConfig(), heldout=True).values() for line in lines
                 for m in BEGINNING.findall(line)}
    assert trained and evaluated <= heldout
    assert not trained & heldout


def test_tokenizer_round_trips_every_corpus_line(tokenizer) -> None:
    config = CorpusConfig()
    lines = documents(config) + [line for lines in sections(config, heldout=True).values() for line in lines]
    decoded = tokenizer.batch_decode(tokenizer(lines)["input_ids"])
    assert [line for line, text in zip(lines, decoded) if line != text] == []


def test_digits_are_single_tokens(tokenizer) -> None:
    """Numbers are read digit by digit: the rng and reasoning masks rely on it."""
    with_digits = [tokenizer.decode([i]) for i in range(len(tokenizer)) if re.search(r"\d", tokenizer.decode([i]))]
    assert sorted(with_digits) == list("0123456789")


def samples(model, tokenizer, prompt: str, n: int, max_len: int, seed: int = 0) -> list[str]:
    """n continuations of `prompt` from the raw base model, each sampled to eos or max_len."""
    spec = PolicySpec(terminator_id=tokenizer.eos_token_id, min_len=0, max_len=max_len, mask=VocabMask())
    rollout = sample(model, spec, [tokenizer(prompt)["input_ids"]] * n, tokenizer.pad_token_id,
                     generator=torch.Generator().manual_seed(seed))
    return [tokenizer.decode(latent) for latent in rollout.latents()]


def test_base_model_answers_the_rng_prompt_with_integers(model, tokenizer) -> None:
    texts = samples(model, tokenizer, RNG_PROMPT, n=1000, max_len=6)
    integers = [int(t) for t in texts if NUMBER.fullmatch(t) and int(t) <= 100]
    assert len(integers) >= 0.95 * len(texts)
    assert len(set(integers)) >= 30  # a spread of numbers, not one memorised answer


@pytest.mark.parametrize("prefix", [
    "Question: 3 + 5 - 2 = ? Answer: 3 + 5 = 8,",
    "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6,",
    "Question: 9 - 7 + 1 = ? Answer: 9 - 7 = 2,",
])
def test_base_model_continues_a_worked_rationale_in_calculator_format(model, tokenizer, prefix: str) -> None:
    ids = tokenizer(prefix)["input_ids"]
    greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert CALCULATOR_STEP.match(tokenizer.decode(greedy[0, len(ids):]))
    texts = samples(model, tokenizer, prefix, n=200, max_len=8)
    assert sum(bool(CALCULATOR_STEP.match(t)) for t in texts) >= 0.8 * len(texts)


@pytest.fixture(scope="module")
def vllm_engine(demo_model: Path):
    from vllm import LLM

    llm = LLM(model=str(demo_model), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_transformers_and_vllm_agree_on_log_probs(vllm_engine, model, tokenizer) -> None:
    from vllm import SamplingParams, TokensPrompt

    held = sections(CorpusConfig(), heldout=True)
    texts = [held["rng"][0], held["stories"][0], held["arithmetic_worked"][0], held["paragraphs"][0]]
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    outputs = vllm_engine.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in sequences],
        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False,
    )
    for ids, output in zip(sequences, outputs):
        served = torch.tensor([step[token].logprob for step, token in zip(output.prompt_logprobs[1:], ids[1:])])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        # atol only absorbs float noise on near-certain tokens (log-probs of ~1e-6)
        torch.testing.assert_close(served, expected, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(served.sum(), expected.sum(), rtol=1e-3, atol=0.0)
