"""The random-number task's reward on hand-made strings, and its length default."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from adapters.models import load_tokenizer
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
