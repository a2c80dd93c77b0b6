"""A reward-maximising baseline on the same LoRA: RLOO, REINFORCE with a leave-one-out
baseline, maximising the task's log-reward minus β·KL to the base model.

Each sample's reward is r = log R(Z ⊤) - β (log q(Z ⊤) - log p_base(Z ⊤)), the last term a
one-sample estimate of KL(q || p_base) (tool-written tokens count in neither). Each of the
k samples of a prompt is baselined by the mean of the other k - 1, and the loss is
-mean((r - baseline) · log q(Z ⊤)). Maximising a reward drives the policy onto its best
modes (only β holds it back, towards the base model's own biases), where the GFlowNet
samples in proportion to the reward: the benchmarks show the difference.

Sampling, checkpoints, resume and storage are the GFlowNet trainer's (trainer.loop); only
the loss of a batch differs, so the adapter is stored and served like any other of its task.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from pydantic import Field, model_validator

from adapters.manifest import Manifest
from adapters.store import AdapterStore
from jobs.configs import Overrides, config_data
from trainer.config import TrainConfig
from trainer.loop import Trainer
from trainer.policy import policy_log_probs
from trainer.rollout import sample, sequence_log_prob
from trainer.tasks import Prompt


class RLConfig(TrainConfig):
    """A training config plus the KL coefficient β. Of the GFlowNet's settings RLOO uses the
    batch (prompts_per_step x samples_per_prompt, all on-policy at temperature 1), the
    optimiser, LoRA and steps; behaviour, replay, reward_temperature and subtb_lambda are
    not used."""

    kl_coef: float = Field(0.05, ge=0, description="β: weight of the KL penalty to the base model")

    @model_validator(mode="after")
    def _leave_one_out(self) -> "RLConfig":
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be at least 2 for a leave-one-out baseline")
        return self


def load_rl_config(source: str | Path | dict, overrides: Overrides = ()) -> RLConfig:
    """An RLConfig from a YAML path, a bundled config's name (e.g. 'rng') or a dict, with
    `a.b=value` overrides (e.g. ["name=rng-rl", "kl_coef=0.1"])."""
    return RLConfig.model_validate(config_data(source, overrides))


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each reward minus the mean of the other samples of its prompt: [P, k] -> [P, k]."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


class RLTrainer(Trainer):
    method = "rloo"
    config: RLConfig

    def batch_loss(self, prompts: list[Prompt], temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.config.samples_per_prompt
        batch = [p for p in prompts for _ in range(k)]
        rollout = sample(self.model, self.spec, [p.ids for p in batch], self.pad_id, 1.0, self.generator, self.tool,
                         [p.bias for p in batch])
        log_r = self.floor_barred(self.task.log_rewards(self.scorer, batch, rollout), rollout.tokens)
        final = log_r[torch.arange(len(batch)), rollout.lengths]
        log_q = sequence_log_prob(*policy_log_probs(self.model, self.spec, rollout.prompts, rollout.tokens,
                                                    self.pad_id, rollout.bias), rollout)
        log_base = sequence_log_prob(*self.scorer.latent(rollout, self.spec.terminator_id), rollout)
        kl = log_q.detach().cpu() - log_base  # rewards and the base's log-probs are on the host
        advantages = rloo_advantages((final - self.config.kl_coef * kl).view(len(prompts), k))
        loss = -(advantages.flatten().to(log_q.device) * log_q).mean()
        return loss, {"log_reward": final.mean().item(), "length": rollout.lengths.float().mean().item(),
                      "kl": kl.mean().item()}


def train_rl(config: RLConfig, store: AdapterStore, run_dir: Path | None = None, quiet: bool = False) -> Manifest:
    """Train the RLOO adapter and store it; `run_dir` keeps checkpoints (a run resumes
    there), by default a temporary directory."""
    if run_dir is not None:
        return RLTrainer(config, run_dir, store, quiet=quiet).run()
    with tempfile.TemporaryDirectory(prefix="gfn-rl-") as tmp:
        return RLTrainer(config, Path(tmp), store, quiet=quiet).run()
