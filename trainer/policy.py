"""The policy q(Z | prompt): a causal LM (with or without its LoRA) plus the task's masks.

A state is the prompt plus z1..zi; every state may stop with the terminator, unless the
task lets it stop only after certain tokens (`stop_after`, e.g. a sentence end). The masks
(vocabulary penalty, no stop before min_len or away from `stop_after`, must stop at max_len)
and a prompt's word bias are part of the policy: sampling, the loss's log-probs and serving
all apply the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters.manifest import VocabMask
from adapters.models import left_pad

MUST_STOP_PENALTY = -1e4  # at max_len every other token is (numerically) impossible


@dataclass(frozen=True)
class PolicySpec:
    """What a task fixes about its policy; it travels in the adapter manifest."""

    terminator_id: int
    min_len: int
    max_len: int
    mask: VocabMask
    stop_after: frozenset[int] = field(default_factory=frozenset)  # empty: stop after any token

    def bias(self, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Logit bias for every state index 0..max_len: [max_len + 1, vocab]."""
        base = self.mask.bias(vocab_size, self.terminator_id).to(device)
        bias = base.expand(self.max_len + 1, vocab_size).clone()
        bias[: self.min_len, self.terminator_id] += self.mask.penalty
        bias[self.max_len] = MUST_STOP_PENALTY
        bias[self.max_len, self.terminator_id] = 0.0
        return bias

    def barred(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which states 0..L of each row `stop_after` bars from stopping ([B, L + 1], bool):
        from min_len (before it, `bias` bars them already) to max_len (which must stop), those
        whose last token is not in it."""
        batch, width = tokens.shape
        if not self.stop_after:
            return torch.zeros((batch, width + 1), dtype=torch.bool, device=tokens.device)
        allowed = torch.isin(tokens, torch.tensor(sorted(self.stop_after), device=tokens.device))
        barred = torch.cat([torch.ones((batch, 1), dtype=torch.bool, device=tokens.device), ~allowed], dim=1)
        barred[:, : self.min_len] = False
        barred[:, self.max_len:] = False
        return barred

    def stop_penalty(self, barred: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The logit bias that bars those states' stop: `barred` [...] -> [..., vocab]."""
        one_hot = torch.nn.functional.one_hot(torch.tensor(self.terminator_id, device=barred.device), vocab_size)
        return one_hot * barred[..., None] * self.mask.penalty


def pack(prompts: list[list[int]], tokens: torch.Tensor, pad_id: int,
         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-pad prompts and append the latent tokens, so state i of every row sits at
    column P - 1 + i. Position ids skip the padding, as if each row were alone. Built on the
    host, handed over on ``device`` (the model's)."""
    padded = left_pad(prompts, pad_id)
    tokens = tokens.cpu()
    ids = torch.cat([padded["input_ids"], tokens], dim=1)
    mask = torch.cat([padded["attention_mask"], torch.ones_like(tokens, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def state_logits(model: torch.nn.Module, prompts: list[list[int]], tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token logits at every state 0..L of every row: [B, L + 1, V].

    Causal attention means state i sees only the prompt and z1..zi, so tokens past a
    row's length (padding) cannot change the states that count.
    """
    inputs = pack(prompts, tokens, pad_id, model.device)
    width = inputs["input_ids"].shape[1] - tokens.shape[1]
    logits = model(**inputs, use_cache=False).logits
    return logits[:, width - 1:].float()


def bias_rows(rows: list[dict[int, float]] | None, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor | float:
    """Each row's word bias (Prompt.bias) as a [B, vocab] tensor; 0 when no row has one."""
    if not rows or not any(rows):
        return 0.0
    bias = torch.zeros((len(rows), vocab_size), device=device)
    for row, entries in enumerate(rows):
        if entries:
            bias[row, list(entries)] = torch.tensor(list(entries.values()), device=device)
    return bias


def masked_log_probs(logits: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log q(. | state) of the masked policy; `bias` is PolicySpec.bias for these states,
    `rows` the prompts' word biases (bias_rows)."""
    if isinstance(rows, torch.Tensor):
        rows = rows[:, None]
    return torch.log_softmax(logits + bias[: logits.shape[1]] + rows, dim=-1)


def transition_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor, terminator_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_{i+1} | s_i) [B, L], log q(⊤ | s_i) [B, L + 1]) from per-state log-probs."""
    log_pf = log_probs[:, :-1].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_pterm = log_probs[..., terminator_id]
    return log_pf, log_pterm


def policy_log_probs(model: torch.nn.Module, spec: PolicySpec, prompts: list[list[int]], tokens: torch.Tensor, pad_id: int,
                     bias: list[dict[int, float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of the masked, untempered policy, with gradients; `bias`: each
    prompt's word bias. On the model's device."""
    logits = state_logits(model, prompts, tokens, pad_id)
    tokens, vocab = tokens.to(logits.device), logits.shape[-1]
    logits = logits + spec.stop_penalty(spec.barred(tokens), vocab)
    log_probs = masked_log_probs(logits, spec.bias(vocab, logits.device), bias_rows(bias, vocab, logits.device))
    return transition_log_probs(log_probs, tokens, spec.terminator_id)
