"""A seeded generator of the demo world's corpus: one document per line.

Sections hold everything the tasks need: biased random numbers, five-sentence stories
(some in the Beginning/Ending/Middle format), keyword-prompted sentences, arithmetic in
the paper's calculator format, and plain paragraphs for continuation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import cache

from pydantic import BaseModel, ConfigDict

from adapters.reasoning import Question
from world import stories

RNG_PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "

NOUNS = ["dog", "cat", "bird", "boy", "girl", "farmer", "teacher", "child", "horse", "baker"]
ADJECTIVES = ["little", "old", "happy", "small", "tired", "young", "brave", "quiet"]
VERBS = ["ran", "walked", "slept", "sang", "played", "jumped", "waited", "sat", "danced", "ate"]
PLACE_NOUNS = ["park", "garden", "river", "house", "school", "forest", "market", "hill", "kitchen", "field"]
TIMES = ["in the morning", "at night", "after lunch", "all day", "in the rain"]


class CorpusConfig(BaseModel):
    """Sizes of each section; the hash of this config names the built world."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    rng: int = 12000
    stories: int = 14000
    infill_format: int = 9000
    keywords: int = 12000
    arithmetic_answer: int = 12000
    arithmetic_worked: int = 8000
    paragraphs: int = 6000


# ---------------------------------------------------------------- random numbers

def rng_weights() -> list[float]:
    """A human-like bias over 0..100: favourites, round numbers, small over large."""
    favourites = {7: 8.0, 42: 6.0, 50: 5.0, 13: 2.5, 23: 2.5, 37: 3.0, 77: 2.5, 99: 2.0, 3: 2.0}
    weights = []
    for k in range(101):
        w = 1.0 / (1.0 + k / 25.0)
        if k % 10 == 0:
            w *= 2.5
        weights.append(w * favourites.get(k, 1.0))
    return weights


def rng_line(rng: random.Random) -> str:
    return RNG_PROMPT + str(rng.choices(range(101), weights=rng_weights())[0])


# ---------------------------------------------------------------- stories

def story_line(rng: random.Random, frames: list[stories.Frame]) -> str:
    frame, event = stories.sample_story(rng, frames)
    return frame.story(event)


def infill_format_line(rng: random.Random, frames: list[stories.Frame]) -> str:
    frame, event = stories.sample_story(rng, frames)
    prompt = stories.infill_prompt(frame.beginning, frame.ending(event))
    return f"{prompt} {frame.events()[event]}"


# ---------------------------------------------------------------- sentences

def sentence(rng: random.Random, noun: str | None = None) -> str:
    noun = noun or rng.choice(NOUNS)
    adjective = rng.choice(ADJECTIVES) + " " if rng.random() < 0.5 else ""
    tail = " " + rng.choice(TIMES) if rng.random() < 0.3 else ""
    return (f"The {adjective}{noun} {rng.choice(VERBS)} in the {rng.choice(PLACE_NOUNS)}{tail}.")


def content_words(text: str) -> list[str]:
    vocabulary = set(NOUNS) | set(ADJECTIVES) | set(VERBS) | set(PLACE_NOUNS)
    return [w for w in text.rstrip(".").split() if w in vocabulary]


def keywords_prompt(keywords: list[str]) -> str:
    return f"Keywords: {', '.join(keywords)}. Sentence:"


def keywords_line(rng: random.Random) -> str:
    """Keywords then a sentence that uses them only most of the time, so that the
    base model follows keywords imperfectly and the constrained sampler has work."""
    text = sentence(rng)
    keywords = rng.sample(content_words(text), 2)
    if rng.random() < 0.35:
        pool = rng.choice([NOUNS, VERBS, PLACE_NOUNS])
        keywords[rng.randrange(2)] = rng.choice([w for w in pool if w not in text.split()])
    return f"{keywords_prompt(keywords)} {text}"


def paragraph_line(rng: random.Random) -> str:
    """Two to four sentences; half of the time the next one keeps the subject."""
    nouns = [rng.choice(NOUNS)]
    for _ in range(rng.randint(1, 3)):
        nouns.append(nouns[-1] if rng.random() < 0.5 else rng.choice(NOUNS))
    return " ".join(sentence(rng, noun) for noun in nouns)


# ---------------------------------------------------------------- arithmetic

def question(operands: list[int], operators: list[str]) -> str:
    """The question as the reasoning task and the service spell it (adapters.reasoning)."""
    return Question(tuple(operands), tuple(operators)).text


def rationale(operands: list[int], operators: list[str]) -> tuple[str, int]:
    """The worked steps in the calculator format and the final value."""
    value, steps = operands[0], []
    for op, x in zip(operators, operands[1:]):
        new = value + x if op == "+" else value - x
        steps.append(f"{value} {op} {x} = {new}")
        value = new
    return " " + ", ".join(steps), value


def random_problem(rng: random.Random, n_operands: int) -> tuple[list[int], list[str]]:
    return [rng.randint(0, 9) for _ in range(n_operands)], [rng.choice("+-") for _ in range(n_operands - 1)]


def worked_example(rng: random.Random, n_operands: int) -> str:
    operands, operators = random_problem(rng, n_operands)
    steps, value = rationale(operands, operators)
    return f"{question(operands, operators)}{steps}. The answer is {value}."


def arithmetic_answer_line(rng: random.Random) -> str:
    operands, operators = random_problem(rng, rng.choice([2, 2, 3, 3, 4, 5]))
    _, value = rationale(operands, operators)
    return f"{question(operands, operators)} The answer is {value}."


def arithmetic_worked_line(rng: random.Random) -> str:
    """Worked rationales, mostly short: one to three examples on one line (few-shot)."""
    shots = rng.choice([1, 1, 2, 3])
    return "\n".join(worked_example(rng, rng.choices([2, 3, 4], weights=[6, 3, 1])[0]) for _ in range(shots))


# ---------------------------------------------------------------- the corpus

def sections(config: CorpusConfig, heldout: bool = False) -> dict[str, list[str]]:
    """Every section's lines. The held-out split uses another seed and held-out frames."""
    rng = random.Random(config.seed * 1000 + (1 if heldout else 0))
    frames = [f for f in stories.all_frames() if stories.is_heldout(f) == heldout]
    scale = 0.05 if heldout else 1.0
    makers: dict[str, tuple[int, Callable[[], str]]] = {
        "rng": (config.rng, lambda: rng_line(rng)),
        "stories": (config.stories, lambda: story_line(rng, frames)),
        "infill_format": (config.infill_format, lambda: infill_format_line(rng, frames)),
        "keywords": (config.keywords, lambda: keywords_line(rng)),
        "arithmetic_answer": (config.arithmetic_answer, lambda: arithmetic_answer_line(rng)),
        "arithmetic_worked": (config.arithmetic_worked, lambda: arithmetic_worked_line(rng)),
        "paragraphs": (config.paragraphs, lambda: paragraph_line(rng)),
    }
    return {name: [make() for _ in range(max(1, int(count * scale)))] for name, (count, make) in makers.items()}


@cache
def questions(config: CorpusConfig = CorpusConfig()) -> frozenset[str]:
    """Every arithmetic question the training corpus holds (held-out evaluations avoid them)."""
    training = sections(config)
    lines = training["arithmetic_answer"] + training["arithmetic_worked"]
    return frozenset(q for line in lines for q in re.findall(r"Question: [^?]*\? Answer:", line))


def documents(config: CorpusConfig) -> list[str]:
    """The training corpus: all sections interleaved in a seeded order."""
    lines = [line for section in sections(config).values() for line in section]
    random.Random(config.seed).shuffle(lines)
    return lines
