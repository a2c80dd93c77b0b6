"""Calculator tool, question/answer parsing and answer aggregation of the arithmetic task."""

import math

import pytest

from adapters.calculator import CalculatorError, evaluate, tool_output
from adapters.reasoning import (
    Question,
    aggregate,
    parse_answer,
    parse_question,
    solve,
    steps,
)
from world import corpus


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("6 - 0", 6),
        ("6 - 4", 2),
        ("2 - 8", -6),
        ("-6 + 3", -3),
        ("-6 - 9", -15),
        ("123456 + 9", 123465),
        ("  7+2 ", 9),
        ("7 - -3", 10),  # lenient: b may be any integer with at most 3 digits
        ("0 + 999", 999),
    ],
)
def test_evaluate_valid_steps(expression: str, value: int) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "1 ** 9",
        "2 * 3",
        "8 / 2",
        "(1+2)",
        "",
        "   ",
        "1 + ",
        "+ 1",
        "1 + 2 + 3",
        "1 + 2 =",
        "x + 1",
        "1.5 + 1",
        "1 + 1234",
        "1234567 + 1",
        "9" * 100,
        "1 + " + "9" * 100,
        " " * 100 + "1 + 1",
        "１ + 1",  # full-width digit
    ],
)
def test_evaluate_refuses_everything_else(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate(expression)


def test_calculator_error_names_the_input_and_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"2 \* 3"):
        evaluate("2 * 3")


def test_calculator_error_message_is_truncated_for_long_input() -> None:
    with pytest.raises(CalculatorError) as error:
        evaluate("9" * 100)
    assert len(str(error.value)) < 120


@pytest.mark.parametrize(
    ("text", "inserted"),
    [
        ("Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 =", " 6"),
        ("Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6, 6 - 4 =", " 2"),
        ("Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6, 6 - 4 = 2, 2 - 8 =", " -6"),
        (" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6, -6 + 3 =", " -3"),
        (" 6 - 0 =", " 6"),  # the rationale alone, first step
        ("Answer:6-0=", " 6"),
        # a few-shot prompt before the question does not interfere
        ("Question: 1 + 2 = ? Answer: 1 + 2 = 3. The answer is 3.\n\nQuestion: 5 + 4 = ? Answer: 5 + 4 =", " 9"),
    ],
)
def test_tool_output_after_a_step(text: str, inserted: str) -> None:
    assert tool_output(text) == inserted


@pytest.mark.parametrize(
    "text",
    [
        "Question: 6 - 0 - 4 - 8 = ? Answer:",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 -",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6,",
        "Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = ",  # the value is written right after "="
        "Question: 6 - 0 - 4 - 8 =",  # the question itself is no step
        "",
    ],
)
def test_tool_output_none_mid_step(text: str) -> None:
    assert tool_output(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "Answer: =",
        "Answer: 6 - =",
        "Answer: 6 * 0 =",
        "Answer: 6 - 0 = 6 - 4 =",  # missing comma: several operators
        "Answer: 6 - 0 = 6, __import__('os') =",
        "Answer: 6 - 0 = 6, 6 -- 4 =",
        "Answer: 6 - 0 = 6. The answer is 6 - 0 =",
        "Answer: " + "9" * 100 + " + 1 =",
    ],
)
def test_tool_output_none_when_malformed(text: str) -> None:
    assert tool_output(text) is None


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (". The answer is -6.", -6),
        (" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6. The answer is -6.", -6),
        ("The answer is 12.", 12),
        ("the answer  is   - 6 .", -6),
        ("The answer is 7", 7),
        ("The answer is 7\n", 7),
        ("The answer is 3.\n\nQuestion: 1 + 1 = ? Answer: 1 + 1 = 2. The answer is 2.", 3),
    ],
)
def test_parse_answer_reads_the_first_answer(text: str, answer: int) -> None:
    assert parse_answer(text) == answer


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 6 - 0 = 6, 6 - 4 = 2",
        "The answer is",
        "The answer is .",
        "The answer is six.",
        "The answer is 12.5.",
        "The answer is 5 apples.",
        "The answer is 1234567.",
        "The answer is x. The answer is 3.",  # only the first occurrence counts
    ],
)
def test_parse_answer_none_when_absent_or_malformed(text: str) -> None:
    assert parse_answer(text) is None


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Question: 3 + 4 = ? Answer:", 7),
        ("Question: 1 - 9 = ? Answer:", -8),
        ("Question: 5 + 1 - 8 = ? Answer:", -2),
        ("Question: 6 - 0 - 4 - 8 = ? Answer:", -6),
        ("Question: 9 + 9 + 9 + 9 + 9 = ? Answer:", 45),
        ("Question: 0 - 9 - 9 - 9 - 9 = ? Answer:", -36),
    ],
)
def test_solve(text: str, answer: int) -> None:
    assert solve(text) == answer
    assert solve(parse_question(text)) == answer


def test_parse_and_format_question_round_trip() -> None:
    text = "Question: 6 - 0 - 4 - 8 = ? Answer:"
    question = parse_question(text)
    assert question == Question(operands=(6, 0, 4, 8), operators=("-", "-", "-"))
    assert Question((6, 0, 4, 8), ("-", "-", "-")).text == text == corpus.question([6, 0, 4, 8], ["-", "-", "-"])
    assert parse_question("  6-0-4-8 ").text == text  # the bare expression is accepted too


@pytest.mark.parametrize(
    "text",
    [
        "Question: 6 = ? Answer:",
        "Question: 1 + 2 + 3 + 4 + 5 + 6 = ? Answer:",
        "Question: 12 + 3 = ? Answer:",
        "Question: 2 * 3 = ? Answer:",
        "Question: 2 + -3 = ? Answer:",
        "Question: = ? Answer:",
        "What is 2 + 3?",
    ],
)
def test_parse_question_refuses_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_question(text)


def test_parse_question_refuses_long_near_misses() -> None:
    """Runs of spaces between optional parts once made a failing match cubic (hours here)."""
    for text in ("1 + 1" + " " * 100_000 + "x", "Question:" + " " * 100_000 + "1 + 2 =" + " " * 100_000 + "x"):
        with pytest.raises(ValueError):
            parse_question(text)


@pytest.mark.parametrize(
    ("operands", "operators"),
    [([1], []), ([1, 2], []), ([1, 10], ["+"]), ([1, -1], ["+"]), ([1, 2], ["*"]), ([True, 2], ["+"])],
)
def test_a_question_refuses_invalid_parts(operands: list[int], operators: list[str]) -> None:
    with pytest.raises(ValueError):
        Question(tuple(operands), tuple(operators))


def test_steps_of_a_rationale() -> None:
    assert steps(" 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6") == [("6 - 0", 6), ("6 - 4", 2), ("2 - 8", -6)]
    # malformed step keeps its text with no value; a trailing part without "=" is no step
    assert steps(" 6 * 0 = 0, 0 - 4 = -4, 3 -") == [("6 * 0", None), ("0 - 4", -4)]
    assert steps("") == []


def test_vote_majority_and_none_excluded() -> None:
    result = aggregate([3, None, 5, 3, None])
    assert result.answer == 3
    assert result.counts == {3: 2, 5: 1}
    assert result.distribution == pytest.approx({3: 2 / 3, 5: 1 / 3})


def test_vote_tie_goes_to_first_occurrence() -> None:
    assert aggregate([5, 3, 3, 5]).answer == 5
    assert aggregate([None, 3, 5, 5, 3]).answer == 3


def test_weighted_can_overturn_the_majority() -> None:
    # three samples say 1 but each with p(Y|XZ)=e^-5; one says 2 with p=e^-1
    result = aggregate([1, 1, 1, 2], weights=[-5.0, -5.0, -5.0, -1.0], method="weighted")
    assert result.answer == 2
    assert result.counts == {1: 3, 2: 1}
    mass_1, mass_2 = 3 * math.exp(-5.0), math.exp(-1.0)
    assert result.distribution == pytest.approx({1: mass_1 / (mass_1 + mass_2), 2: mass_2 / (mass_1 + mass_2)})
    assert aggregate([1, 1, 1, 2], weights=[-5.0, -5.0, -5.0, -1.0]).answer == 1  # "vote" ignores them


def test_weighted_is_numerically_stable_and_ignores_none_weights() -> None:
    result = aggregate([4, 7, None], weights=[-2000.0, -2000.0 + math.log(3), float("nan")], method="weighted")
    assert result.answer == 7
    assert result.distribution == pytest.approx({4: 0.25, 7: 0.75})
    assert math.fsum(result.distribution.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["vote", "weighted"])
def test_all_none(method: str) -> None:
    result = aggregate([None, None], weights=[-1.0, -2.0], method=method)  # type: ignore[arg-type]
    assert result.answer is None
    assert result.distribution == {}
    assert result.counts == {}


def test_aggregate_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        aggregate([1, 2], weights=[-1.0])
    with pytest.raises(ValueError):
        aggregate([1, 2], method="weighted")
    with pytest.raises(ValueError):
        aggregate([1, 2], weights=[-1.0, float("inf")], method="weighted")
    with pytest.raises(ValueError):
        aggregate([1, 2], method="median")  # type: ignore[arg-type]


def test_aggregate_checks_arguments_even_when_nothing_was_read() -> None:
    with pytest.raises(ValueError):
        aggregate([None], method="weighted")
    with pytest.raises(ValueError):
        aggregate([None], method="median")  # type: ignore[arg-type]
