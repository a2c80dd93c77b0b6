"""The calculator tool of the arithmetic task, shared by training rollouts and serving.

A rationale is a chain of binary steps, e.g. " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6". The policy
writes each "<a> <op> <b> =" and the calculator writes the value after the "=". Policy text is
untrusted (a sampled sequence can be anything), so a step is parsed by one anchored regex and
computed with integer arithmetic; nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANSWER_TAG = "Answer:"
"""Ends the question; the rationale starts right after it."""

_MAX_STEP_CHARS = 64
"""Refuse long inputs before matching, so a degenerate sample costs nothing."""

# a: the running value, any integer from earlier steps (at most 6 digits);
# b: normally one digit, leniently any integer with at most 3 digits.
_STEP_RE = re.compile(r"\s*(-?[0-9]{1,6})\s*([+-])\s*(-?[0-9]{1,3})\s*")


class CalculatorError(ValueError):
    """The text is not a single calculator step "a + b" or "a - b"."""


def evaluate(expression: str) -> int:
    """Value of one binary step such as "6 - 4" or "-6 + 3".

    Raises CalculatorError for anything else (other operators, several operators,
    parentheses, letters, empty or over-long input).
    """
    match = _STEP_RE.fullmatch(expression) if len(expression) <= _MAX_STEP_CHARS else None
    if match is None:
        shown = expression if len(expression) <= 40 else expression[:40] + "..."
        raise CalculatorError(f"not a calculator step 'a + b' or 'a - b': {shown!r}")
    left, operator, right = int(match[1]), match[2], int(match[3])
    return left + right if operator == "+" else left - right


def tool_output(text_so_far: str) -> str | None:
    """Text the calculator inserts after generation reaches the "=" of a step, else None.

    Called after every generated token. The step is the text after the last comma (or after
    "Answer:" for the first step), so earlier steps and the prompt never interfere. A text that
    does not end with "=", or whose last step is malformed, gets no tool call: the policy then
    continues on its own and the reward judges the result.
    """
    if not text_so_far.endswith("="):
        return None
    start = text_so_far.rfind(",") + 1
    tag = text_so_far.rfind(ANSWER_TAG)
    if tag >= 0:
        start = max(start, tag + len(ANSWER_TAG))
    try:
        value = evaluate(text_so_far[start:-1])
    except CalculatorError:
        return None
    return f" {value}"


class TokenCalculator:
    """The calculator on token ids, as training rollouts and both serving engines call it: after a
    token whose text ends with "=" (one of ``triggers``), the step's value as the ids that continue
    the latent; None after any other token or a malformed step."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.triggers = frozenset(i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("="))

    def __call__(self, tokens: list[int]) -> list[int] | None:
        """``tokens``: the latent so far (not the prompt)."""
        from adapters.models import piece_ids  # transformers: only where a tokenizer is at hand

        if not tokens or tokens[-1] not in self.triggers:
            return None
        text = tool_output(self.tokenizer.decode(tokens))
        return None if text is None else piece_ids(self.tokenizer, text)
