"""The random-number task's reward on hand-made strings, its length default, and the targets and
settings its config refuses."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from adapters.models import load_tokenizer
from jobs.configs import ConfigError
from jobs.validate import load as jobs_load
from trainer.config import config_errors, load_config
from trainer.tasks.rng import RngConfig, RngTask


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    return load_tokenizer(demo_model)


def task(tokenizer, **config) -> RngTask:
    return RngTask(RngConfig(**config), tokenizer)


def test_max_len_defaults_to_the_widest_number_of_the_support():
    assert RngConfig().max_len == 2  # uniform 0..99
    assert RngConfig(target={"kind": "binomial", "n": 150, "p": 0.5}).max_len == 3
    assert RngConfig.model_validate(RngConfig().model_dump()).max_len == 2  # a manifest's copy round-trips
    with pytest.raises(ValidationError, match="max_len 1 cannot spell 99"):
        RngConfig(max_len=1)


def test_reward_is_the_target_probability_of_canonical_numbers_else_the_floor(tokenizer):
    uniform = task(tokenizer)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert math.isclose(uniform.log_reward(ids("42")), math.log(0.01))
    assert math.isclose(uniform.log_reward(ids("0")), math.log(0.01))
    for invalid in ("05", "00", "100"):  # leading zeros; outside the support
        assert uniform.log_reward(ids(invalid)) == -10.0
    binomial = task(tokenizer, target={"kind": "binomial", "n": 99, "p": 0.3})
    assert math.isclose(binomial.log_reward(ids("30")), math.log(math.comb(99, 30) * 0.3**30 * 0.7**69))
    assert binomial.log_reward(ids("2")) == -10.0  # the far tail (log-pmf -28.7) never ranks below invalid strings
    assert task(tokenizer, floor_log_reward=-12.0).log_reward(ids("05")) == -12.0


def test_targets_whose_tail_underflows_get_the_floor(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    skewed = task(tokenizer, target={"kind": "binomial", "n": 120, "p": 0.001})
    assert 0.0 in skewed.pmf.values() and skewed.log_reward(ids("110")) == -10.0  # log(0) once raised
    wide = RngConfig(target={"kind": "binomial", "n": 2000, "p": 0.5}, max_len=4).target.pmf()  # comb(2000, k) p^k overflowed
    assert math.isclose(sum(wide.values()), 1.0) and max(wide, key=wide.get) == 1000


def test_a_digits_only_task_masks_every_non_digit_token(tokenizer):
    mask = task(tokenizer).mask()
    assert mask.mode == "allow"
    assert all(tokenizer.decode([i]).isdigit() for i in mask.token_ids)
    assert len(mask.token_ids) >= 10 and task(tokenizer, digits_only=False).mask().token_ids == []


@pytest.mark.parametrize("target, field, said, schema_field", [
    ({"kind": "uniform", "low": 0, "high": 1_000_000_000}, "task.target.high", "less than or equal to 9999",
     "task.target.high"),
    ({"kind": "binomial", "n": 10**12}, "task.target.n", "less than or equal to 9999", "task.target.n"),
    ({"kind": "poisson", "max": 10**12}, "task.target.max", "less than or equal to 9999", "task.target.max"),
    ({"kind": "weights", "weights": {10**9: 1.0}}, "task.target.weights.1000000000 (key)", "less than or equal",
     "task.target.weights"),
    ({"kind": "uniform", "low": 5, "high": 2}, "task.target", "low 5 is above high 2", "task.target"),
    ({"kind": "uniform", "low": -50, "high": -1}, "task.target.low", "greater than or equal to 0", "task.target.low"),
    ({"kind": "weights", "weights": {}}, "task.target.weights", "at least 1 item", "task.target.weights"),
    ({"kind": "weights", "weights": {-3: 1.0, 5: 2.0}}, "task.target.weights.-3 (key)", "greater than or equal to 0",
     "task.target.weights"),
    ({"kind": "binomial", "n": -1}, "task.target.n", "greater than or equal to 0", "task.target.n"),
])
def test_targets_the_task_cannot_write_are_refused_naming_the_field(target, field, said, schema_field):
    """A support of numbers of 0..9999 (the task writes digits, never '-'): a typo such as 10^9 is
    refused before any pmf is built, and an empty support is named, not `max() arg is empty`; the
    schema the service checks at submit refuses the same."""
    with pytest.raises(ValidationError) as refused:
        load_config("rng", {"task.target": target})
    lines = config_errors(refused.value)
    assert any(line.startswith(f"{field}: ") and said in line for line in lines), lines
    if schema_field is not None:
        with pytest.raises(ConfigError) as schema:
            jobs_load("rng", {"task.target": target})
        assert any(line.startswith(f"{schema_field}: ") for line in schema.value.errors), schema.value.errors


def test_the_widest_supports_still_validate():
    assert RngConfig(target={"kind": "uniform", "low": 0, "high": 9999}).max_len == 4
    far = RngConfig(target={"kind": "poisson", "rate": 1e6, "max": 99}).target.pmf()  # every weight once underflowed
    assert math.isclose(sum(far.values()), 1.0) and max(far, key=far.get) == 99
    huge = RngConfig(target={"kind": "weights", "weights": {1: 1e308, 2: 1e308}}).target.pmf()  # their sum is inf
    assert huge == {1: 0.5, 2: 0.5}


def test_eval_samples_must_be_positive():
    for bad in (0, -5):
        with pytest.raises(ValidationError) as refused:
            load_config("rng", [f"task.eval_samples={bad}"])
        assert config_errors(refused.value) == ["task.eval_samples: Input should be greater than 0"]


def test_braces_in_the_rng_prompt_are_text(tokenizer):
    """The rng prompt fills no fields: its braces are written as they stand, never a placeholder."""
    text = "Pick {0} or { or {foo}:"
    assert task(tokenizer, prompt=text).prompt().ids == task(tokenizer).context_ids(text)
