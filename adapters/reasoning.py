"""Questions, answers and answer aggregation of the arithmetic-with-a-calculator task.

Shared by the trainer (building prompts, checking sampled answers) and the service (reading
answers from N sampled rationales and combining them), so both sides agree on one format:

    X = "Question: 6 - 0 - 4 - 8 = ? Answer:"
    Z = " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"      (values written by the calculator)
    Y = ". The answer is -6."

Inference (the trainer's evaluation and the service do the same): sample N rationales Z for
the prompt X, read one answer from each (`read_answers`), and combine them with `aggregate`,
by majority vote or weighted by p(Y | X Z) (`answer_log_probs`). The base model is reached
only through two callables, so this module needs neither torch nor a particular engine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from adapters.calculator import ANSWER_TAG, CalculatorError, evaluate

MIN_OPERANDS = 2
MAX_OPERANDS = 5
OPERATORS = ("+", "-")

# The canonical question, or just its expression: the API may receive either. Matched on
# stripped text, and each run of spaces sits before a required token, so a failing match
# backtracks in linear time (adjacent optional `\s*` runs made long inputs cubic).
_QUESTION_RE = re.compile(
    r"(?:Question:\s*)?(?P<expr>[0-9](?:\s*[+-]\s*[0-9])+)(?:\s*=\s*\?)?(?:\s*" + re.escape(ANSWER_TAG) + r")?"
)
# The integer must end the sentence ("." not starting a decimal) or the text, so
# "The answer is 12.5." or "The answer is 5 apples" are not read as answers.
_ANSWER_RE = re.compile(
    r"the\s+answer\s+is\s*(-?)\s*([0-9]{1,6})(?=\s*(?:\.(?![0-9])|$))", re.IGNORECASE
)
_ANSWER_START_RE = re.compile(r"the\s+answer\s+is", re.IGNORECASE)
# What follows the "=" of a rationale's last step when it ends with the value: " -6".
_FINAL_VALUE_RE = re.compile(r"\s*(-?[0-9]{1,7})\s*")

ANSWER_TOKENS = 12
"""Greedy tokens the base model may take to state an answer after a rationale (' -1234.' and
slack); the trainer's evaluation and the service read the same number."""

Complete = Callable[[list[str]], list[str]]
"""Base-model greedy continuations of texts (a few tokens each): contexts -> completions."""
Score = Callable[[list[str], list[str]], list[float]]
"""Base-model log p(continuation | context) for each (context, continuation) pair."""


@dataclass(frozen=True)
class Question:
    """A question: one-digit operands joined by + or -, 2 to 5 operands."""

    operands: tuple[int, ...]
    operators: tuple[str, ...]

    def __post_init__(self) -> None:
        if not MIN_OPERANDS <= len(self.operands) <= MAX_OPERANDS:
            raise ValueError(
                f"a question has {MIN_OPERANDS} to {MAX_OPERANDS} operands, got {len(self.operands)}"
            )
        if len(self.operators) != len(self.operands) - 1:
            raise ValueError(
                f"{len(self.operands)} operands need {len(self.operands) - 1} operators,"
                f" got {len(self.operators)}"
            )
        if any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= 9 for x in self.operands):
            raise ValueError(f"operands must be integers 0..9, got {list(self.operands)}")
        if any(op not in OPERATORS for op in self.operators):
            raise ValueError(f"operators must be '+' or '-', got {list(self.operators)}")

    @property
    def text(self) -> str:
        """The prompt X, e.g. "Question: 6 - 0 - 4 - 8 = ? Answer:"."""
        expression = str(self.operands[0])
        for operator, operand in zip(self.operators, self.operands[1:]):
            expression += f" {operator} {operand}"
        return f"Question: {expression} = ? {ANSWER_TAG}"


@dataclass(frozen=True)
class Aggregate:
    """The combined answer of N sampled rationales.

    ``distribution`` is normalised over the answers that were read (None excluded);
    ``counts`` is how many samples gave each answer. Both are in order of first occurrence.
    """

    answer: int | None
    distribution: dict[int, float]
    counts: dict[int, int]


def parse_question(text: str) -> Question:
    """Parse "Question: 6 - 0 - 4 - 8 = ? Answer:" (or the bare "6 - 0 - 4 - 8").

    Raises ValueError when the text is not such a question.
    """
    match = _QUESTION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an arithmetic question like 'Question: 6 - 0 - 4 = ? Answer:' (one-digit operands "
                         f"0 to 9 joined by + or -, the first without a sign): {text[:80]!r}")
    expression = match["expr"]
    return Question(
        operands=tuple(int(digit) for digit in re.findall(r"[0-9]", expression)),
        operators=tuple(re.findall(r"[+-]", expression)),
    )



def solve(question: Question | str) -> int:
    """The exact answer, computed left to right with the same calculator as the rationales."""
    if isinstance(question, str):
        question = parse_question(question)
    value = question.operands[0]
    for operator, operand in zip(question.operators, question.operands[1:]):
        value = evaluate(f"{value} {operator} {operand}")
    return value


def parse_answer(text: str) -> int | None:
    """The integer of the first "The answer is <n>." in text, None if absent or malformed.

    Only the first occurrence counts: a model may go on to write further questions and answers.
    """
    start = _ANSWER_START_RE.search(text)
    if start is None:
        return None
    match = _ANSWER_RE.match(text, start.start())
    if match is None:
        return None
    return int(match[1] + match[2])


def steps(rationale: str) -> list[tuple[str, int | None]]:
    """The calculator steps of a rationale with their values, e.g. [("6 - 0", 6), ...].

    A step is the text before an "=" within a comma-separated part; its value is what the
    calculator computes (None for a malformed step, which got no tool call). A trailing
    part without "=" was never a step and is left out.
    """
    found: list[tuple[str, int | None]] = []
    for part in rationale.split(","):
        expression, equals, _ = part.partition("=")
        if not equals:
            continue
        expression = " ".join(expression.split())
        try:
            value: int | None = evaluate(expression)
        except CalculatorError:
            value = None
        found.append((expression, value))
    return found


@dataclass(frozen=True)
class AnswerFormat:
    """How the base model states an answer after a rationale: the manifest's task_config
    keys `answer_prompt` and `reward_prefix`, the same text the training reward read."""

    answer_prompt: str = ". The answer is"
    reward_prefix: str = ""

    @classmethod
    def of(cls, task_config: Mapping[str, Any]) -> AnswerFormat:
        """The format of a reasoning adapter, from its manifest's task_config."""
        return cls(task_config["answer_prompt"], task_config.get("reward_prefix") or "")

    def context(self, prompt: str, rationale: str) -> str:
        """What the base model reads before the answer: few-shot prefix, question, rationale."""
        return self.reward_prefix + prompt + rationale

    def answer_text(self, answer: int) -> str:
        """Y for an answer, e.g. ". The answer is -6." (its first token is the terminator)."""
        return f"{self.answer_prompt} {answer}."


def final_value(rationale: str) -> int | None:
    """The value the calculator wrote for the last step when the rationale ends with it,
    e.g. -6 for " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"; None when it ends otherwise (mid-step,
    a malformed step, or digits the policy appended to the calculator's value)."""
    expression, equals, value = rationale.rsplit(",", 1)[-1].partition("=")
    stated = _FINAL_VALUE_RE.fullmatch(value)
    if not equals or stated is None:
        return None
    try:
        computed = evaluate(expression)
    except CalculatorError:
        return None
    return computed if int(stated[1]) == computed else None


def read_answers(
    prompts: Sequence[str], rationales: Sequence[str], answer_format: AnswerFormat, complete: Complete
) -> list[int | None]:
    """The answer of each (prompt, rationale) pair.

    A rationale that ends with a calculator value has reached its answer: that value is read
    directly, since the base model restating it can only add copying errors. Any other
    rationale is given to the base model, followed by the answer prompt, and its greedy
    completion is parsed (None when it states no integer).
    """
    if len(prompts) != len(rationales):
        raise ValueError(f"{len(prompts)} prompts but {len(rationales)} rationales")
    answers = [final_value(rationale) for rationale in rationales]
    missing = [i for i, answer in enumerate(answers) if answer is None]
    if missing:
        contexts = [answer_format.context(prompts[i], rationales[i]) + answer_format.answer_prompt for i in missing]
        for i, completion in zip(missing, complete(contexts), strict=True):
            answers[i] = parse_answer(answer_format.answer_prompt + completion)
    return answers


def answer_log_probs(
    prompts: Sequence[str],
    rationales: Sequence[str],
    answers: Sequence[int | None],
    answer_format: AnswerFormat,
    score: Score,
) -> list[float]:
    """log p(Y | X Z) of each pair's answer, the weights of `aggregate(method="weighted")`
    (NaN where no answer was read: aggregate ignores those)."""
    read = [i for i, answer in enumerate(answers) if answer is not None]
    weights = [math.nan] * len(answers)
    if read:
        scores = score([answer_format.context(prompts[i], rationales[i]) for i in read],
                       [answer_format.answer_text(answers[i]) for i in read])  # type: ignore[arg-type]
        for i, value in zip(read, scores, strict=True):
            weights[i] = float(value)
    return weights


def aggregate(
    answers: Sequence[int | None],
    weights: Sequence[float] | None = None,
    method: Literal["vote", "weighted"] = "vote",
) -> Aggregate:
    """Combine the answers read from N sampled rationales into one.

    "vote": majority; a tie goes to the answer that occurred first.
    "weighted": ``weights[i]`` is log p(Y_i | X Z_i); each answer's log-weights are combined
    with log-sum-exp and normalised with a softmax, both shifted by the maximum so very
    negative log-probabilities do not underflow. Weights of None answers are ignored; the
    others must be finite. For "vote", weights (if given) are only checked for length.
    """
    if method not in ("vote", "weighted"):
        raise ValueError(f"unknown aggregation method {method!r}; use 'vote' or 'weighted'")
    if method == "weighted" and weights is None:
        raise ValueError("method 'weighted' needs weights (log p(Y | X Z) per sample)")
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    counts: dict[int, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    if not counts:
        return Aggregate(answer=None, distribution={}, counts={})

    if method == "vote":
        total = sum(counts.values())
        distribution = {answer: count / total for answer, count in counts.items()}
        # max() keeps the first of equal maxima, and counts is in first-occurrence order.
        return Aggregate(max(counts, key=counts.__getitem__), distribution, counts)
    assert weights is not None  # checked above; narrows the type

    grouped: dict[int, list[float]] = {answer: [] for answer in counts}
    for answer, weight in zip(answers, weights):
        if answer is None:
            continue
        if not math.isfinite(weight):
            raise ValueError(f"weights must be finite log-probabilities, got {weight}")
        grouped[answer].append(weight)
    log_mass = {answer: _logsumexp(ws) for answer, ws in grouped.items()}
    top = max(log_mass.values())
    unnormalised = {answer: math.exp(value - top) for answer, value in log_mass.items()}
    total = math.fsum(unnormalised.values())
    distribution = {answer: mass / total for answer, mass in unnormalised.items()}
    return Aggregate(max(distribution, key=distribution.__getitem__), distribution, counts)


def _logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(values))) without overflow or underflow; values are finite and non-empty."""
    top = max(values)
    return top + math.log(math.fsum(math.exp(value - top) for value in values))
