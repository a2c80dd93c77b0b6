"""The RLOO baseline: its advantages and sequence log-probabilities, and a short run that
raises the reward and stores an adapter served like any other of its task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from adapters.store import AdapterStore
from trainer.evaluate import LoadedPolicy
from trainer.rl import load_rl_config, rloo_advantages, train_rl
from trainer.rollout import Rollout, sequence_log_prob
from trainer.tasks.rng import draw_numbers


def test_rloo_advantages_leave_one_out() -> None:
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]])
    assert torch.allclose(rloo_advantages(rewards), expected)


def test_sequence_log_prob_skips_tool_tokens_and_padding() -> None:
    rollout = Rollout(prompts=[[1], [1]], tokens=torch.zeros(2, 3, dtype=torch.long), lengths=torch.tensor([3, 1]),
                      forced=torch.tensor([[False, True, False], [False, False, False]]))
    log_pf = torch.tensor([[-1.0, -2.0, -4.0], [-8.0, float("nan"), float("nan")]])
    log_pterm = torch.tensor([[-9.0, -9.0, -9.0, -0.5], [-9.0, -0.25, -9.0, -9.0]])
    assert sequence_log_prob(log_pf, log_pterm, rollout).tolist() == [-5.5, -8.25]


def test_config_needs_two_samples_per_prompt() -> None:
    with pytest.raises(ValidationError, match="samples_per_prompt"):
        load_rl_config("rng", ["samples_per_prompt=1"])


def test_rloo_raises_the_reward_and_stores_a_servable_adapter(demo_model: Path, tmp_path: Path) -> None:
    # one target value: log R is 0 for "7" and -15 for anything else
    config = load_rl_config("rng", {"name": "rng-rl", "base_model": str(demo_model), "steps": 25,
                                    "prompts_per_step": 1, "samples_per_prompt": 32, "evaluate": False,
                                    "optim.lr": 5e-3, "optim.warmup_steps": 1, "kl_coef": 0.01,
                                    "task.target": {"kind": "weights", "weights": {7: 1.0}}})
    store = AdapterStore(tmp_path / "adapters")
    manifest = train_rl(config, store, run_dir=tmp_path / "run", quiet=True)
    assert manifest.training["method"] == "rloo" and manifest.task == "rng"
    assert manifest.mask.mode == "allow" and manifest.terminator_id == 0
    history = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 25 and '"kl"' in history[0]
    policy = LoadedPolicy(store, manifest.name, manifest.version)
    generator = torch.Generator().manual_seed(0)
    tuned = draw_numbers(policy.task, policy.sampler(generator), 400)
    base = draw_numbers(policy.task, policy.sampler(generator, adapter=False), 400)
    assert tuned.count(7) > base.count(7) + 40
