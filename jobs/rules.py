"""Rules that tie fields of one config section together, declared once with the section.

JSON schema cannot compare two fields, so a section declares such rules in its schema
(`rules(...)` as its json_schema_extra): pydantic checks them when the trainer loads a config
(`Ruled`), and jobs.validate checks the same declaration at submit, reading an absent field's
default from the schema. Both sides refuse the same configs in the same words.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

KEYWORD = "x-rules"
MESSAGE = "x-message"  # what a `pattern` means, said at submit instead of the regular expression


def rules(*, ordered: Sequence[tuple[str, str]] = (), sum_to_one: Sequence[str] = ()) -> dict[str, Any]:
    """A section's json_schema_extra: each (a, b) of `ordered` needs a <= b, the fields of
    `sum_to_one` must add up to 1."""
    return {KEYWORD: {"ordered": [list(pair) for pair in ordered], "sum_to_one": list(sum_to_one)}}


def pattern(regex: str, message: str) -> dict[str, str]:
    """A text field's json_schema_extra: the schema refuses text not matching `regex` with `message`."""
    return {"pattern": regex, MESSAGE: message}


def broken(declared: Mapping[str, Any], value: Callable[[str], Any]) -> Iterator[str]:
    """A message for each rule of `declared` that the section's values break; `value(field)` is
    a field's value. A rule over a field that is unset or not a number (an error of its own) holds."""
    for low, high in declared.get("ordered", ()):
        a, b = value(low), value(high)
        if _number(a) and _number(b) and a > b:
            yield f"{low} {a} is above {high} {b}"
    if fields := declared.get("sum_to_one"):
        values = [value(field) for field in fields]
        if all(map(_number, values)) and abs(sum(values) - 1) > 1e-6:
            yield f"{' + '.join(fields)} must be 1, got {sum(values):g}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Ruled(BaseModel):
    """A config section that checks the rules its model_config's json_schema_extra declares.
    Strict, as the schema is: `steps: true` is no number (pydantic would read it as 1)."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="after")
    def _rules_hold(self) -> Ruled:
        return self.check_rules()

    def check_rules(self) -> Ruled:
        extra = self.model_config.get("json_schema_extra")
        declared = extra.get(KEYWORD, {}) if isinstance(extra, Mapping) else {}
        if problems := list(broken(declared, lambda field: getattr(self, field))):
            raise ValueError("; ".join(problems))
        return self
