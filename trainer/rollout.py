"""Batched sampling from the masked policy with a KV cache.

Sampling runs without gradients (dropout off); the loss's log-probs come from one
teacher-forced pass over the finished batch (policy.policy_log_probs), the same pass
that replayed samples take. A tool (the calculator) may write tokens into a sample: they
are fed to the model like sampled ones and flagged in `forced`, and the objective treats
them as deterministic transitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.policy import PolicySpec, bias_rows, pack

# A tool sees the sample's tokens so far and returns the tokens it writes next (or none).
Tool = Callable[[list[int]], list[int] | None]


def tool_forced(tool: Tool | None, latent: list[int]) -> list[bool]:
    """Which tokens of a given latent the tool writes, flagged where sampling with it would
    have: a teacher-forced latent (labelled data, SFT targets) reads like a sampled one."""
    forced, k = [False] * len(latent), 0
    while tool is not None and k < len(latent):
        written = tool(latent[: k + 1])
        if written and latent[k + 1: k + 1 + len(written)] == written:
            forced[k + 1: k + 1 + len(written)] = [True] * len(written)
            k += len(written)
        k += 1
    return forced


@dataclass
class Rollout:
    """Sampled latents: tokens [B, max_len] (padding past each length), lengths [B]
    (tokens before the terminator), forced [B, max_len] (written by the tool), the word
    bias each prompt was sampled with (None: none), and log_q [B]: the log-probability of
    each latent and its stop under the distribution it was drawn from (None when not sampled)."""

    prompts: list[list[int]]
    tokens: torch.Tensor
    lengths: torch.Tensor
    forced: torch.Tensor
    bias: list[dict[int, float]] | None = None
    log_q: torch.Tensor | None = None

    def latents(self) -> list[list[int]]:
        return [self.tokens[b, : int(n)].tolist() for b, n in enumerate(self.lengths)]

    def written(self) -> torch.Tensor:
        """[B, max_len]: the tokens the policy wrote (inside each latent, not the tool's)."""
        return (torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]) & ~self.forced

    @classmethod
    def teacher_forced(cls, prompts: list[list[int]], latents: list[list[int]], pad_id: int,
                       tool: Tool | None = None) -> Rollout:
        """Given latents (labelled rationales, SFT targets) as a rollout, the tool's tokens flagged
        `forced` where sampling with it would have written them (tool_forced)."""
        tokens = torch.full((len(latents), max(map(len, latents), default=0)), pad_id, dtype=torch.long)
        forced = torch.zeros(tokens.shape, dtype=torch.bool)
        for row, latent in enumerate(latents):
            tokens[row, : len(latent)] = torch.tensor(latent, dtype=torch.long)
            forced[row, : len(latent)] = torch.tensor(tool_forced(tool, latent), dtype=torch.bool)
        return cls(prompts, tokens, torch.tensor([len(z) for z in latents]), forced)


def sequence_log_prob(log_pf: torch.Tensor, log_pterm: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """log q(z1..zn ⊤) of each sample from per-state log-probs, tool-written tokens excluded: [B],
    on the log-probs' device."""
    device = log_pf.device
    rows, lengths = torch.arange(len(rollout.lengths), device=device), rollout.lengths.to(device)
    return torch.where(rollout.written().to(device), log_pf, 0.0).sum(1) + log_pterm[rows, lengths]


def sampler(model: torch.nn.Module, spec: PolicySpec, pad_id: int, generator: torch.Generator,
            tool: Tool | None = None) -> Callable[..., Rollout]:
    """A task's Sampler (tasks.base) for evaluation: one latent per prompt from `model`, untempered."""
    return lambda prompts, bias=None: sample(model, spec, prompts, pad_id, 1.0, generator, tool, bias)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    spec: PolicySpec,
    prompts: list[list[int]],
    pad_id: int,
    temperatures: torch.Tensor | float = 1.0,
    generator: torch.Generator | None = None,
    tool: Tool | None = None,
    bias: list[dict[int, float]] | None = None,
) -> Rollout:
    """Sample one latent per prompt; `temperatures` (scalar or [B]) tempers the masked
    logits for exploration, `bias` is each prompt's word bias. The samples' log q (tool
    tokens cost nothing) is no-grad: the loss takes its log-probs from a teacher-forced pass.

    The model runs on its device; the samples are kept on the host (the tool and the stop rules
    read them token by token), and `generator` is a host one: each step's uniforms are drawn
    there, so the same seed draws the same samples on any device, up to float rounding."""
    was_training = model.training
    model.eval()
    device, batch, max_len = model.device, len(prompts), spec.max_len
    temps = torch.as_tensor(temperatures, dtype=torch.float32).expand(batch).unsqueeze(-1).to(device)
    tokens = torch.full((batch, max_len), pad_id, dtype=torch.long)
    forced = torch.zeros((batch, max_len), dtype=torch.bool)
    lengths = torch.full((batch,), -1, dtype=torch.long)
    log_q = torch.zeros(batch, dtype=torch.float64)
    pending: list[list[int]] = [[] for _ in range(batch)]

    distinct, rows_of = _distinct(prompts)
    inputs = pack(distinct, tokens[: len(distinct), :0], pad_id, device)
    out = model(**inputs, use_cache=True)
    rows_of = rows_of.to(device)
    cache, mask = out.past_key_values, inputs["attention_mask"][rows_of]
    cache.batch_select_indices(rows_of)
    position = inputs["position_ids"][rows_of, -1]
    logits = out.logits[rows_of, -1].float()
    states = spec.bias(logits.shape[-1], device)
    rows = bias_rows(bias, logits.shape[-1], device)

    for step in range(max_len + 1):
        barred = spec.stop_penalty(spec.barred(tokens[:, :step])[:, step].to(device), logits.shape[-1])
        log_probs = torch.log_softmax((logits + states[step] + rows + barred) / temps, dim=-1)
        choice = _draw(log_probs, torch.rand(batch, 1, generator=generator, dtype=torch.float64))
        picked = log_probs.gather(1, choice.unsqueeze(-1)).squeeze(-1)
        host = torch.stack([choice.double(), picked.double(), log_probs[:, spec.terminator_id].double()]).cpu()
        choice, picked, stop = host[0].long(), host[1].tolist(), host[2].tolist()  # one transfer a step
        for b in range(batch):
            if lengths[b] >= 0:
                continue
            if step == max_len or (not pending[b] and choice[b] == spec.terminator_id):
                lengths[b] = step
                log_q[b] += stop[b]
                continue
            if pending[b]:
                choice[b], forced[b, step] = pending[b].pop(0), True
            else:
                log_q[b] += picked[b]
            tokens[b, step] = choice[b]
            if tool is not None and not forced[b, step]:
                pending[b] = list(tool(tokens[b, : step + 1].tolist()) or [])
        if (lengths >= 0).all():
            break
        choice = torch.where(lengths >= 0, torch.full_like(choice, pad_id), choice)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position + 1
        out = model(input_ids=choice.unsqueeze(-1).to(device), attention_mask=mask, position_ids=position.unsqueeze(-1),
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    model.train(was_training)
    return Rollout(prompts=prompts, tokens=tokens, lengths=lengths, forced=forced, bias=bias, log_q=log_q)


def _draw(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row, a draw from exp(log_probs): the first token whose cumulative probability
    exceeds u times the total, for host uniforms u [B, 1]. A token of probability zero adds nothing
    to the sum, so it is never the first to exceed it; rounding at the top end falls back to the
    last token with mass. On the log-probs' device."""
    cdf = log_probs.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    if not torch.isfinite(total).all():  # torch.multinomial refused these too
        raise FloatingPointError("the policy's probabilities are not finite (NaN logits?)")
    choice = torch.searchsorted(cdf, uniforms.to(cdf.device) * total, right=True).squeeze(-1)
    return torch.minimum(choice, (cdf < total).sum(-1))


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The distinct prompts and, per row, the index of its prompt among them: a prompt
    drawn n times (n samples of one question) is read once and its KV cache copied."""
    index: dict[tuple[int, ...], int] = {}
    rows_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], torch.tensor(rows_of, dtype=torch.long)
